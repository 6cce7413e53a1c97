"""The steps of a corpus run, shared by the local and the Ray engine: read the chains of each
source, look up node embeddings, run one padded batch, record failures."""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import EmbedFailure
from ..model import frames
from ..model.validation import check_structure_inputs
from .inputs import Source, record_id
from .node_embed import NodeEmbedSource
from .reader import DEFAULT_MAX_STRUCTURE_BYTES, Backbone, read_chains
from .shards import ERRORS_FILE, TENSOR_COLUMNS, ShardWriter
from .storage import local_copy

__all__ = [
    "Batching",
    "RunOutput",
    "EmbedFailure",
    "EmbedSummary",
    "ErrorLog",
    "Failed",
    "Parsed",
    "embed_batch",
    "node_embeddings",
    "parse_sources",
]


@dataclass
class EmbedSummary:
    """What a run did. ``errors`` failed records this run (see ``_errors.jsonl``)."""

    out: Path | str  #: the output directory (a URL for an object store)
    inputs: int = 0  #: structure files read
    records: int = 0  #: chains embedded by this run
    skipped: int = 0  #: chains already in complete shards (resume)
    errors: int = 0
    residues: int = 0  #: residues embedded by this run
    seconds: float = 0.0
    shards: dict[str, int] = field(default_factory=dict)  #: every complete shard -> rows
    driver_bytes: int = 0  #: bytes of task results the driver received (``engine="ray"``)

    @property
    def exit_code(self) -> int:
        """0 when every chain was embedded, 3 when some failed."""
        return 3 if self.errors else 0


@dataclass(frozen=True)
class Parsed:
    """A chain read and ready to embed, with its record id."""

    id: str
    source: Source
    backbone: Backbone


@dataclass(frozen=True)
class Failed:
    """A failed file (``chain`` "" and ``id`` None when the whole file failed) or chain."""

    source: str
    chain: str
    reason: str
    id: str | None = None


FILE_DONE = object()  #: yielded by parse_sources after each file


class ErrorLog:
    """``_errors.jsonl``, one JSON line per failed record, flushed as it goes."""

    def __init__(self, out: Path):
        self._file = open(out / ERRORS_FILE, "w", encoding="utf-8")  # noqa: SIM115 - closed by close()

    def add(self, failed: Failed) -> None:
        line = {"source": failed.source, "chain": failed.chain, "id": failed.id, "reason": failed.reason}
        self._file.write(json.dumps(line) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def parse_sources(sources: Sequence[Source], done: Mapping[str, str], batching: Batching) -> Iterator[Any]:
    """Read every source: a ``Parsed`` per chain to embed, a ``Failed`` per failure, and
    ``FILE_DONE`` after each file. Chains whose id ``done`` maps to their source are skipped;
    an id ``done`` maps to another source is a clash (a ``Failed``)."""
    max_length = batching.max_length
    for source in sources:
        copy: Path | None = None
        try:
            with local_copy(source.path) as copy:
                chains = read_chains(copy, source.chain, max_bytes=batching.max_structure_bytes)
        except Exception as err:  # any unreadable file is an error record, not a crash
            reason = str(err) if isinstance(err, (OSError, ValueError)) else f"{type(err).__name__}: {err}"
            if copy is not None:  # the file as given, not its temporary local copy
                reason = reason.replace(str(copy), str(source.path))
            yield Failed(source.given, source.chain or "", reason)
            yield FILE_DONE
            continue
        for failure in chains.failures:
            yield Failed(source.given, failure.chain, failure.reason, record_id(source.stem, failure.chain))
        for backbone in chains.backbones:
            rid = record_id(source.stem, backbone.chain)
            if rid in done:
                if done[rid] != source.given:
                    yield Failed(source.given, backbone.chain, _taken(rid, done[rid]), rid)
                continue
            length = len(backbone.sequence)
            if max_length is not None and length > max_length:
                yield Failed(source.given, backbone.chain, f"{length} residues, past max_length={max_length}", rid)
            else:
                yield Parsed(rid, source, backbone)
        yield FILE_DONE


def embed_batch(
    encoder: Any, batch: Sequence[Parsed], node_embeds: Sequence[torch.Tensor], outputs: Sequence[str]
) -> list[dict[str, Any]]:
    """One padded batch through the encoder -> one row dict per chain, tensors cut to length."""
    lengths = [len(p.backbone.sequence) for p in batch]
    size, n = len(batch), max(lengths)
    parameter = next(encoder.parameters())
    node_embed = torch.zeros(size, n, encoder.config.c_s, dtype=parameter.dtype)
    ca = torch.zeros(size, n, 3)
    rotations = torch.eye(3).repeat(size, n, 1, 1)
    mask = torch.zeros(size, n, dtype=torch.bool)
    residue_index = torch.zeros(size, n, dtype=torch.int64)  # strictly increasing, the file's gaps kept
    for i, (item, embed) in enumerate(zip(batch, node_embeds, strict=True)):
        bb, length = item.backbone, lengths[i]
        node_embed[i, :length], mask[i, :length], residue_index[i, :length] = embed, True, bb.residue_index
        rotations[i, :length], ca[i, :length] = frames.from_backbone(bb.n, bb.ca, bb.c)
    device = parameter.device
    inputs = (node_embed, ca, mask, rotations, None, residue_index)
    with torch.inference_mode():
        out = encoder(*(x if x is None else x.to(device) for x in inputs))
    values = {k: v.float().cpu() for k, v in out._asdict().items()}
    rows = []
    for i, (item, length) in enumerate(zip(batch, lengths, strict=True)):
        bb = item.backbone
        row: dict[str, Any] = {"id": item.id, "source": item.source.given, "chain": bb.chain,
                               "sequence": bb.sequence, "residue_ids": bb.residue_ids}  # fmt: skip
        for name in outputs:
            row[name] = values["s"][i, :length].mean(0) if name == "s_mean" else values[name][i, :length]
        rows.append(row)
    return rows


def node_embeddings(encoder: Any, item: Parsed, source: NodeEmbedSource | None) -> torch.Tensor:
    """[L, c_s] node embeddings of one chain, from ``source`` or the export's residue table,
    after the encoder's value checks passed on this chain alone (finite coordinates within
    bounds, proper N-CA-C frames): a failure is a ValueError for this chain only, never for the
    batch it would join."""
    bb = item.backbone
    if source is not None:
        embed = source.get(item.id, len(bb.sequence), encoder.config.c_s)
    else:
        with torch.inference_mode():
            device = next(encoder.parameters()).device
            embed = encoder.embed_residues(bb.aatype.to(device)).float().cpu()
    rotations, ca = frames.from_backbone(bb.n, bb.ca, bb.c)
    mask = torch.ones(1, len(bb.sequence), dtype=torch.bool)
    check_structure_inputs(encoder.config.c_s, embed[None], ca[None], mask, rotations[None])
    return embed


def _taken(rid: str, other: str) -> str:
    return (
        f"record id {rid!r} is already taken by {other}; ids are <file stem>_<chain>: rename one of the files "
        "(or list it in a manifest with a chain column)"
    )


@dataclass(frozen=True)
class Batching:
    """How chains are read and grouped: at most ``batch_size`` chains and ``max_tokens`` padded
    residues per batch; chains past ``max_length`` residues and files past
    ``max_structure_bytes`` of text are error records."""

    max_tokens: int
    batch_size: int
    max_length: int | None = None
    max_structure_bytes: int = DEFAULT_MAX_STRUCTURE_BYTES


class RunOutput:
    """Where a run's results go: shards, ``_errors.jsonl`` and the summary counts. As a context
    manager it completes the current shard on exit, also on an error (its rows are whole
    records), or drops it if it cannot be completed."""

    def __init__(self, out: Path, schema: Any, shard_size: int, first_index: int, summary: EmbedSummary,
                 fail_fast: bool, done: Mapping[str, str], writer: ShardWriter | None = None,
                 errors: ErrorLog | None = None):  # fmt: skip
        """``writer``, ``errors``: instead of shards and ``_errors.jsonl`` in ``out`` (a Ray task's
        one shard and the failures it returns)."""
        self.schema, self.summary, self.fail_fast = schema, summary, fail_fast
        self._sources = dict(done)  # record id -> source, of every row written (ids are unique)
        self.outputs = [f.name for f in schema if f.name in TENSOR_COLUMNS]
        self._writer = ShardWriter(out, schema, shard_size, first_index) if writer is None else writer
        self._errors = ErrorLog(out) if errors is None else errors

    def fail(self, failed: Failed) -> None:
        """Record a failure; with ``fail_fast``, raise :class:`EmbedFailure`."""
        self._errors.add(failed)
        self.summary.errors += 1
        if self.fail_fast:
            raise EmbedFailure(f"{failed.source} (chain {failed.chain or '-'}): {failed.reason}")

    def write(self, table: Any) -> None:
        """Append embedded rows (a table of :attr:`schema`); a row whose id another source took
        is a failure instead."""
        import pyarrow as pa

        ids, sources, chains = (table.column(c).to_pylist() for c in ("id", "source", "chain"))
        keep = [self._sources.setdefault(rid, source) == source for rid, source in zip(ids, sources, strict=True)]
        if not all(keep):
            for rid, source, chain, kept in zip(ids, sources, chains, keep, strict=True):
                if not kept:
                    self.fail(Failed(source, chain, _taken(rid, self._sources[rid]), rid))
            table = table.filter(pa.array(keep))
            if not table.num_rows:
                return
        self._writer.write(table)
        self.summary.records += table.num_rows
        self.summary.residues += sum(table.column("length").to_pylist())

    def __enter__(self) -> RunOutput:
        return self

    def __exit__(self, *exc: Any) -> None:
        try:
            self._writer.finish()
        except Exception:
            self._writer.abort()
            if exc[0] is None:
                raise
        finally:
            self._errors.close()
