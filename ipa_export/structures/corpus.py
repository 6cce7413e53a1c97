"""Embed a corpus of structures into Parquet shards: streaming, bucketed, resumable.

One background thread parses structures while the encoder runs; parsed chains wait in length
buckets (:mod:`.batching`) and go through the encoder in batches under a residue budget;
each batch becomes one row group of the current shard (:mod:`.shards`). A failed file or
chain becomes a line of ``_errors.jsonl`` and the run goes on. Memory is bounded by the parse
queue, one partial batch per bucket and one batch of outputs, whatever the corpus size.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import queue
import sys
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import torch

from .._version import __version__
from ..errors import InputError
from ..export.files import atomic_file, remove_files
from .batching import LengthBucketer
from .inputs import Source, collect_sources
from .node_embed import NodeEmbedSource, open_node_embed
from .options import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_MAX_STRUCTURE_BYTES,
    DEFAULT_MAX_TOKENS,
    DEFAULT_OUTPUTS,
    DEFAULT_SHARD_SIZE,
)
from .pipeline import (
    FILE_DONE,
    Batching,
    EmbedFailure,
    EmbedSummary,
    Failed,
    Parsed,
    RunOutput,
    embed_batch,
    node_embeddings,
    parse_sources,
)
from .run_state import changed_inputs, fingerprint, output_lock
from .shards import (
    ERRORS_FILE,
    MANIFEST_FILE,
    RUN_FILE,
    SHARD_PATTERN,
    TENSOR_COLUMNS,
    arrow_schema,
    drop_rows,
    records_table,
    shard_identity,
    shard_paths,
    shard_sources,
    tensor_shapes,
)
from .storage import Location

__all__ = ["DEFAULT_OUTPUTS", "EmbedFailure", "EmbedSummary", "embed_corpus"]

log = logging.getLogger(__name__)

LOG_EVERY_S = 30.0  #: progress log interval when no progress bar is shown
_IDENTITY_KEYS = ("weights_sha256", "config_sha256", "dtype", "outputs", "node_embed")


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
            done, first_index = remote.prepare(identity, _IDENTITY_KEYS, overwrite, sources), 0
        summary = EmbedSummary(out=out if remote is None else where.url, inputs=len(sources), skipped=len(done))
        with RunOutput(out, schema, shard_size, first_index, summary, fail_fast, done) as output:
            if engine == "ray":
                from .ray_engine import PARTITION_FILES, RayJob, for_workers, run_ray, worker_sources

                del encoder
                embeds = None if node_embed is None else for_workers(node_embed, "node_embed")
                job = RayJob(for_workers(export, "export"), tuple(load.items()), embeds,
                             for_workers(where.url, "out"), schema, batching, _run_local)  # fmt: skip
                run_ray(job, worker_sources(sources), done, output, ray_address, min(shard_size, PARTITION_FILES))
            else:
                _run_local(encoder, sources, done, output, node_source, batching, progress)
        summary.shards = {p.name: _rows(p) for p in shard_paths(out)} if remote is None else remote.shards()
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


def run_identity(
    export: str | os.PathLike, encoder: Any, outputs: Sequence[str], node_embed: str | os.PathLike | None
) -> dict[str, Any]:
    """What the values of a run depend on; a resumed run must match (``_IDENTITY_KEYS``)."""
    weights = hashlib.sha256()
    with open(Path(encoder.export_directory) / "model.safetensors", "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            weights.update(block)
    config = json.dumps(encoder.config.to_dict(), sort_keys=True)
    return {
        "format": "ipa_export.embeddings",
        "format_version": 1,
        "export": str(export),
        "weights_sha256": weights.hexdigest(),
        "config_sha256": hashlib.sha256(config.encode()).hexdigest(),
        "config": encoder.config.to_dict(),  # to name the fields that differ from another run's
        "dtype": str(next(encoder.parameters()).dtype).removeprefix("torch."),
        "outputs": list(outputs),
        "node_embed": "residue_table" if node_embed is None else _node_embed_name(node_embed),
        "ipa_export_version": __version__,
    }


def _node_embed_name(node_embed: str | os.PathLike) -> str:
    where = Location(node_embed, "node_embed")
    return str(where.local.resolve()) if where.local is not None else where.url


def prepare_output(
    out: Path, identity: Mapping[str, Any], overwrite: bool, sources: Sequence[Source]
) -> tuple[dict[str, str], int]:
    """Check ``out`` (locked by the caller) and return (record id -> source of the rows in its
    complete shards, index of the next shard).

    A directory holding shards, ``_errors.jsonl``, ``_run.json`` or ``_manifest.json`` this
    package did not write is refused; shards of another export/config are refused unless
    ``overwrite``, which removes the files this package wrote there and nothing else. The
    rows of an input whose SHA-256 differs from the one recorded when it was embedded are
    dropped (re-embedded by this run). ``_run.json`` is then written: the identity and every
    input's fingerprint. (The temporary file of a shard a killed run left unfinished is
    removed by :func:`~ipa_export.export.files.atomic_file` when that shard is written again.)"""
    run_file = out / RUN_FILE
    previous = _read_json(run_file) if run_file.is_file() else None
    shards = shard_paths(out)
    ours = previous is not None and previous.get("format") == "ipa_export.embeddings"
    foreign = [p.name for p in shards if shard_identity(p) is None]
    if not ours:
        foreign += [name for name in (RUN_FILE, ERRORS_FILE, MANIFEST_FILE) if os.path.lexists(out / name)]
    elif (out / MANIFEST_FILE).exists() and (_read_json(out / MANIFEST_FILE) or {}).get("format") != identity["format"]:
        foreign.append(MANIFEST_FILE)
    if foreign:
        raise FileExistsError(
            f"out: {out} holds files this package did not write ({', '.join(foreign[:5])}); "
            "pass a new or empty directory"
        )
    differs = [k for k in _IDENTITY_KEYS if previous is not None and previous.get(k) != identity[k]]
    differs += sorted(
        {k for p in shards for k in _IDENTITY_KEYS if (shard_identity(p) or {}).get(k) != identity[k]} - set(differs)
    )
    if differs and shards and not overwrite:
        raise FileExistsError(
            f"out: {out} holds embeddings of another run (different {_differences(differs, previous, identity)}); "
            "pass overwrite=True to replace them, or a new out directory"
        )
    recorded: dict[str, Any] = {}
    if differs:  # replaced with overwrite, or a run that published no shard: nothing of it is kept
        remove_files([*shards, run_file, out / ERRORS_FILE, out / MANIFEST_FILE])
        shards = []
    elif ours:  # resume: the manifest is rewritten when the run completes
        remove_files([out / MANIFEST_FILE])
        recorded = previous.get("inputs") or {}
    current = {s.given: fingerprint(s.path, s.given) for s in sources}
    done = shard_sources(shards)
    changed = set(changed_inputs(recorded, current.values()))
    if stale := {rid for rid, source in done.items() if source in changed}:
        log.warning("%s: %d input(s) changed since they were embedded; their %d record(s) are embedded again: %s",
                    out, len(changed), len(stale), ", ".join(sorted(changed)[:10]))  # fmt: skip
        drop_rows(shards, stale)
        shards = shard_paths(out)
        done = {rid: source for rid, source in done.items() if rid not in stale}
    inputs = {**recorded, **{g: {k: v for k, v in vars(f).items() if k != "given"} for g, f in current.items()}}
    with atomic_file(run_file) as tmp:
        tmp.write_text(json.dumps({**identity, "inputs": inputs}, indent=2) + "\n")
    next_index = max((int(SHARD_PATTERN.fullmatch(p.name).group(1)) for p in shards), default=-1) + 1  # type: ignore[union-attr]
    return done, next_index


def _differences(keys: Sequence[str], previous: Mapping[str, Any] | None, identity: Mapping[str, Any]) -> str:
    """The ``keys`` of the run identity that differ, with their values where they are readable (the
    config as the fields that differ); hashes by name."""
    previous = previous or {}
    parts = []
    for key in keys:
        if key == "config_sha256" and previous.get("config"):
            then, now = previous["config"], identity["config"]
            parts += [f"{k} {then.get(k)!r} there, {now[k]!r} now" for k in now if then.get(k) != now[k]]
        elif key in ("dtype", "outputs", "node_embed") and key in previous:
            parts.append(f"{key} {previous[key]!r} there, {identity[key]!r} now")
        else:
            parts.append(key)
    return "; ".join(parts)


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def _rows(path: Path) -> int:
    import pyarrow.parquet as pq

    return pq.ParquetFile(path).metadata.num_rows


def write_manifest(out: Path, identity: Mapping[str, Any], sources: Sequence[Source], summary: EmbedSummary) -> None:
    """``_manifest.json``, written last: the run identity, inputs, counts and per-shard rows."""
    manifest = {
        **identity,
        "inputs": [s.given + (f"\t{s.chain}" if s.chain else "") for s in sources],
        "counts": {
            "inputs": summary.inputs,
            "records": sum(summary.shards.values()),
            "embedded_this_run": summary.records,
            "skipped_as_done": summary.skipped,
            "errors": summary.errors,
        },
        "shards": summary.shards,
    }
    with atomic_file(out / MANIFEST_FILE) as tmp:
        tmp.write_text(json.dumps(manifest, indent=2) + "\n")


_END = object()


@contextmanager
def _background(items: Iterator[Any], size: int) -> Iterator[Iterator[Any]]:
    """Run the iterator ``items`` in a thread, ``size`` items ahead of the consumer. On exit (an
    error, Ctrl-C) the thread is stopped and joined: it finishes the item in hand, so no parser
    runs on while the interpreter shuts down."""
    buffer: queue.Queue[Any] = queue.Queue(maxsize=size)
    stop = threading.Event()

    def offer(item: Any) -> bool:
        while not stop.is_set():
            try:
                buffer.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not offer(item):
                    return
        except BaseException as err:  # surfaced in the consumer
            offer(err)
            return
        offer(_END)

    def consume() -> Iterator[Any]:
        while (item := buffer.get()) is not _END:
            if isinstance(item, BaseException):
                raise item
            yield item

    thread = threading.Thread(target=produce, name="ipa-export-parse", daemon=True)
    thread.start()
    try:
        yield consume()
    finally:
        stop.set()
        thread.join()


def _run_local(
    encoder: Any,
    sources: Sequence[Source],
    done: Mapping[str, str],
    output: RunOutput,
    node_source: NodeEmbedSource | None,
    batching: Batching,
    progress: bool | None,
) -> None:
    """Parse in a background thread, bucket, embed and write, in this process."""
    bucketer: LengthBucketer[tuple[Parsed, torch.Tensor]] = LengthBucketer(batching.max_tokens, batching.batch_size)
    meter = _Progress(len(sources), progress)

    def fail(failed: Failed) -> None:
        meter.errors += 1
        output.fail(failed)

    def run(batch: list[tuple[Parsed, torch.Tensor]]) -> None:
        rows = embed_batch(encoder, [b for b, _ in batch], [e for _, e in batch], output.outputs)
        output.write(records_table(rows, output.schema))
        meter.update(chains=len(rows), residues=sum(len(r["sequence"]) for r in rows))

    try:
        with _background(parse_sources(sources, done, batching), 4 * batching.batch_size) as parsed:
            for item in parsed:
                if item is FILE_DONE:
                    meter.update(files=1)
                elif isinstance(item, Failed):
                    fail(item)
                else:
                    try:
                        embed = node_embeddings(encoder, item, node_source)
                    except ValueError as err:
                        fail(Failed(item.source.given, item.backbone.chain, str(err), item.id))
                        continue
                    for batch in bucketer.add((item, embed), len(item.backbone.sequence)):
                        run(batch)
        for batch in bucketer.flush():
            run(batch)
    finally:
        meter.close()


class _Progress:
    """A tqdm bar over structure files (chains, residues/s and errors as postfix) on a terminal,
    or a log line every ``LOG_EVERY_S`` seconds."""

    def __init__(self, total: int, bar: bool | None):
        self.total, self.files, self.chains, self.residues, self.errors = total, 0, 0, 0, 0
        self.start = self._last_log = time.perf_counter()
        if bar is None:
            bar = sys.stderr.isatty()
        self._bar = None
        if bar:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, unit="file", desc="embed", dynamic_ncols=True)

    def update(self, files: int = 0, chains: int = 0, residues: int = 0) -> None:
        self.files, self.chains, self.residues = self.files + files, self.chains + chains, self.residues + residues
        rate = self.residues / max(time.perf_counter() - self.start, 1e-9)
        if self._bar is not None:
            self._bar.set_postfix(chains=self.chains, res_per_s=f"{rate:,.0f}", errors=self.errors, refresh=False)
            self._bar.update(files)
        elif time.perf_counter() - self._last_log >= LOG_EVERY_S:
            self._last_log = time.perf_counter()
            eta = (self.total - self.files) * (self._last_log - self.start) / max(self.files, 1)
            log.info("%d/%d files, %d chains, %.0f residues/s, %d errors, ETA %.0f s",
                     self.files, self.total, self.chains, rate, self.errors, eta)  # fmt: skip

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
