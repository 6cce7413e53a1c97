"""Embed a corpus of structures into Parquet shards: the API (:func:`embed_corpus`) and its
option checks.

A run checks its options, loads the export, takes the output directory's lock and prepares it
for resume (:mod:`.run_state`), then runs an engine: the local one (:mod:`.local_engine`: a
parse thread, length buckets, batches under a residue budget) or Ray (:mod:`.ray_engine`: one
task and one shard per partition of the inputs). A failed file or chain becomes a line of
``_errors.jsonl`` and the run goes on; the manifest is written last.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from contextlib import nullcontext
from typing import Any

import torch

from ..errors import InputError
from ..export.files import remove_files
from .inputs import collect_sources
from .local_engine import run_local
from .node_embed import open_node_embed
from .options import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_MAX_STRUCTURE_BYTES,
    DEFAULT_MAX_TOKENS,
    DEFAULT_OUTPUTS,
    DEFAULT_SHARD_SIZE,
)
from .pipeline import (
    Batching,
    EmbedFailure,
    EmbedSummary,
    RunOutput,
)
from .run_state import IDENTITY_KEYS, output_lock, prepare_output, run_identity, shard_rows, write_manifest
from .shards import (
    ERRORS_FILE,
    RUN_FILE,
    TENSOR_COLUMNS,
    arrow_schema,
    shard_paths,
    tensor_shapes,
)
from .storage import Location

__all__ = ["DEFAULT_OUTPUTS", "EmbedFailure", "EmbedSummary", "embed_corpus"]

log = logging.getLogger(__name__)


def embed_corpus(
    export: str | os.PathLike,
    inputs: Sequence[str | os.PathLike],
    out: str | os.PathLike,
    *,
    manifest: str | os.PathLike | None = None,
    chain: str | None = None,
    outputs: Sequence[str] = DEFAULT_OUTPUTS,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    batch_size: int = DEFAULT_BATCH_SIZE,
    max_length: int | None = None,
    shard_size: int = DEFAULT_SHARD_SIZE,
    node_embed: str | os.PathLike | None = None,
    max_structure_bytes: int = DEFAULT_MAX_STRUCTURE_BYTES,
    device: str | torch.device | None = None,
    dtype: torch.dtype | str | None = None,
    attention: str | None = None,
    attn_dtype: str | None = None,
    compile: bool = False,
    overwrite: bool = False,
    fail_fast: bool = False,
    engine: str = "local",
    ray_address: str | None = None,
    progress: bool | None = None,
) -> EmbedSummary:
    """Embed every protein chain of ``inputs`` (files, directories searched recursively) and of
    ``manifest`` (``path`` or ``path<TAB>chain`` per line) with the export ``export`` into
    Parquet shards in ``out``; see :mod:`ipa_export.structures.shards` for the layout.

    Record ids are ``<file stem>_<chain>``, unique (a clash is refused before any work, or an
    error record); existing complete shards in ``out`` written with the same export, config,
    dtype, outputs and node embeddings are kept and their ids skipped (resume), except the rows
    of an input whose content changed since (SHA-256), which are replaced; other shards are
    refused unless ``overwrite=True``, which removes only files this package wrote. One run at a
    time writes ``out`` (a lock held for the whole run). A structure past
    ``max_structure_bytes`` of text (after decompression) is an error record. ``device``,
    ``dtype``, ``attention``, ``attn_dtype`` (e.g. ``"bf16"``) and ``compile`` are passed to
    ``IPAEncoder.from_pretrained``. Batches hold at most ``batch_size`` chains and
    ``max_tokens`` padded residues (a longer chain goes alone). ``progress``: a bar (True), log
    lines every 30 s (False), or a bar on a terminal only (None). ``engine="ray"`` runs on Ray,
    each worker writing its own shards (``ray_address``: a cluster; None: a local instance).
    ``inputs``, ``manifest``, ``node_embed`` and ``out`` may be file-system URLs (``s3://``,
    ``gs://``, ``memory://``, ...); an object-store ``out`` needs ``engine="ray"``.

    Raises ValueError / FileNotFoundError for bad arguments before any work, and
    :class:`EmbedFailure` at the first failed record with ``fail_fast=True``.
    """
    started = time.perf_counter()
    outputs = _check_options(outputs, max_tokens, batch_size, max_length, shard_size, engine)
    if not isinstance(max_structure_bytes, int) or max_structure_bytes < 1:
        raise InputError(f"max_structure_bytes: expected a positive integer, got {max_structure_bytes!r}")
    sources = collect_sources(inputs, manifest, chain)
    where = Location(out, "out")
    remote = _remote_out(where, engine)
    out = where.local if remote is None else remote.staging
    if out.exists() and not out.is_dir():
        raise InputError(f"out: {out} exists and is not a directory; expected a new or embeddings directory")
    node_source = open_node_embed(node_embed) if node_embed is not None else None
    load = dict(device=device, dtype=dtype, attention=attention, attn_dtype=attn_dtype, compile=compile)
    from ..model.encoder import IPAEncoder

    encoder = IPAEncoder.from_pretrained(export, **load)  # type: ignore[arg-type]
    if node_source is None and not encoder.config.num_residue_types:
        raise InputError(
            "node_embed: required, because this export has no residue-type embedding table "
            "(config.num_residue_types is 0); pass per-chain embeddings keyed by record id (e.g. ESM-2 + adapter), "
            "or convert the checkpoint with `ipa-export convert --residue-embedding-seed SEED` (an untrained "
            "table, for demos)"
        )
    identity = run_identity(export, encoder, outputs, node_embed)
    config = encoder.config
    schema = arrow_schema(tensor_shapes(config.c_s, config.z_factor_rank, config.c_p), outputs, identity)
    batching = Batching(max_tokens, batch_size, max_length, max_structure_bytes)
    with output_lock(out) if remote is None else nullcontext():  # object stores have no lock
        if remote is None:
            done, first_index = prepare_output(out, identity, overwrite, sources)
        else:
            done, first_index = remote.prepare(identity, IDENTITY_KEYS, overwrite, sources), 0
        summary = EmbedSummary(out=out if remote is None else where.url, inputs=len(sources), skipped=len(done))
        try:
            with RunOutput(out, schema, shard_size, first_index, summary, fail_fast, done) as output:
                if engine == "ray":
                    from .ray_engine import PARTITION_FILES, RayJob, for_workers, run_ray, worker_sources

                    del encoder
                    embeds = None if node_embed is None else for_workers(node_embed, "node_embed")
                    job = RayJob(for_workers(export, "export"), tuple(load.items()), embeds,
                                 for_workers(where.url, "out"), schema, batching, run_local)  # fmt: skip
                    run_ray(job, worker_sources(sources), done, output, ray_address, min(shard_size, PARTITION_FILES))
                else:
                    run_local(encoder, sources, done, output, node_source, batching, progress)
        except BaseException:
            if remote is None and not shard_paths(out):  # nothing embedded: leave no state behind
                errors = out / ERRORS_FILE
                remove_files([out / RUN_FILE, *([errors] if errors.is_file() and not errors.stat().st_size else [])])
            raise
        summary.shards = {p.name: shard_rows(p) for p in shard_paths(out)} if remote is None else remote.shards()
        summary.seconds = time.perf_counter() - started
        write_manifest(out, identity, sources, summary)
        if remote is not None:
            remote.publish()
    return summary


def _remote_out(where: Location, engine: str) -> Any:
    """None for a local ``--out`` (a path or ``file://`` URL); a :class:`~.ray_engine.RemoteOut`
    for an object store, which only the Ray engine's workers write to."""
    if where.local is not None:
        return None
    if engine != "ray":
        raise InputError(
            f"out: {where}: an object-store output is written by Ray workers: pass engine='ray' "
            "(a local instance is fine), or write to a local directory"
        )
    from .ray_engine import RemoteOut

    return RemoteOut(where)


def _check_options(
    outputs: Sequence[str], max_tokens: int, batch_size: int, max_length: int | None, shard_size: int, engine: str
) -> tuple[str, ...]:
    outputs = tuple(dict.fromkeys(outputs))
    unknown = [o for o in outputs if o not in TENSOR_COLUMNS]
    if unknown or not outputs:
        raise InputError(f"outputs: unknown {unknown or 'empty list'}; choose from {list(TENSOR_COLUMNS)}")
    for name, value in (("max_tokens", max_tokens), ("batch_size", batch_size), ("shard_size", shard_size)):
        if not isinstance(value, int) or value < 1:
            raise InputError(f"{name}: expected a positive integer, got {value!r}")
    if max_length is not None and (not isinstance(max_length, int) or max_length < 1):
        raise InputError(f"max_length: expected a positive integer, got {max_length!r}")
    if engine not in ("local", "ray"):
        raise InputError(f"engine: expected 'local' or 'ray', got {engine!r}")
    return tuple(o for o in TENSOR_COLUMNS if o in outputs)
