"""The corpus job on a Ray cluster (``pip install 'ipa-export[ray]'``): workers write the shards.

The inputs are cut into partitions of consecutive sources (:func:`partitions`). Each partition is
one Ray task (:func:`embed_partition`) that parses, embeds and writes its own shard,
``part-<k>-<digest>.parquet`` (``k``: the partition's index, ``digest``: of its sources), with
the local engine's pipeline, and returns a small JSON summary (rows, residues, failed records).
The driver keeps a few tasks per worker in flight, writes the failures to ``_errors.jsonl``,
and receives O(partitions) bytes whatever the size of the embeddings. A task retried by Ray
(a worker or node died) rewrites the same shard whole, so no id is written twice; a re-run
skips the partitions whose shard is complete and had no failure.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import sys
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ClusterError, MissingDependencyError
from .inputs import Source
from .pipeline import Batching, EmbedSummary, Failed, RunOutput
from .run_state import changed_inputs, fingerprint
from .shards import (
    ERRORS_FILE,
    MANIFEST_FILE,
    RUN_FILE,
    SHARD_PATTERN,
    ShardWriter,
    shard_identity,
    shard_sources,
)
from .storage import Location

__all__ = [
    "Partition",
    "RayJob",
    "RemoteOut",
    "embed_partition",
    "for_workers",
    "partitions",
    "run_ray",
    "worker_sources",
]

log = logging.getLogger(__name__)

PARTITION_FILES = 64  #: most input files per partition (and so per shard)
TASKS_PER_WORKER = 2  #: tasks in flight per worker slot: one running, one queued
PARTITION_KEY = b"ipa_export.partition"  #: Parquet footer metadata of a partition's shard


def _ray() -> Any:
    try:
        import ray
    except ImportError as err:
        raise MissingDependencyError("engine='ray' needs Ray: pip install 'ipa-export[ray]'") from err
    return ray


@dataclass(frozen=True)
class Partition:
    """Consecutive sources of a run, embedded by one task into one shard. ``done``: record id ->
    source of its chains already in other shards (skipped, or a clash if another source's)."""

    index: int
    sources: tuple[Source, ...]
    done: Mapping[str, str] = field(default_factory=dict)

    @property
    def shard(self) -> str:
        """The shard's name: a function of the partition alone, so a retried task rewrites it."""
        listed = json.dumps([[s.given, s.chain or ""] for s in self.sources])
        return f"part-{self.index:05d}-{hashlib.sha256(listed.encode()).hexdigest()[:16]}.parquet"


def partitions(sources: Sequence[Source], files: int) -> list[Partition]:
    """``sources`` cut into partitions of ``files`` consecutive sources."""
    return [Partition(k, tuple(sources[i : i + files])) for k, i in enumerate(range(0, len(sources), files))]


@dataclass(frozen=True)
class RayJob:
    """What every task needs: the export and its loading options, node embeddings, where the
    shards go (a directory or URL), their schema, the batching, and the local engine's run
    function ``run(encoder, sources, done, output, node_source, batching, progress)``."""

    export: str
    load: tuple[tuple[str, Any], ...]
    node_embed: str | None
    out: str
    schema: Any
    batching: Batching
    run: Callable[..., None]


@functools.lru_cache(maxsize=1)
def _loaded(export: str, load: tuple[tuple[str, Any], ...], node_embed: str | None) -> tuple[Any, Any]:
    """The encoder and node-embedding source, once per worker process."""
    from ..model.encoder import IPAEncoder
    from .node_embed import open_node_embed

    encoder = IPAEncoder.from_pretrained(export, **dict(load))
    return encoder, open_node_embed(node_embed) if node_embed is not None else None


class _PartitionWriter(ShardWriter):
    """One shard with a fixed name; the partition's failure count goes in its Parquet footer."""

    def __init__(self, directory: Path, schema: Any, name: str, failures: _Failures):
        super().__init__(directory, schema, shard_size=sys.maxsize)
        self._name, self._failures = name, failures

    @property
    def name(self) -> str:
        return self._name

    def finish(self) -> None:
        if self._shard is not None:
            self._shard.add_metadata({PARTITION_KEY.decode(): json.dumps({"failures": len(self._failures)})})
        super().finish()


class _Failures(list):  # type: ignore[type-arg]
    """The failed records of one partition, returned to the driver (an ErrorLog's interface)."""

    def add(self, failed: Failed) -> None:
        self.append({"source": failed.source, "chain": failed.chain, "reason": failed.reason, "id": failed.id})

    def close(self) -> None:
        pass


def embed_partition(job: RayJob, partition: Partition) -> bytes:
    """Parse, embed and write one partition's shard (published whole, or not at all); return
    the summary as JSON bytes: ``shard``, ``rows``, ``residues``, ``failures`` (records)."""
    encoder, node_source = _loaded(job.export, job.load, job.node_embed)
    out = Location(job.out, "out")
    failures = _Failures()
    summary = EmbedSummary(out=job.out)
    with tempfile.TemporaryDirectory(prefix="ipa-export-shard-") as tmp:
        staging = Path(tmp) if out.local is None else out.local  # a remote shard is written here, then put
        writer = _PartitionWriter(staging, job.schema, partition.shard, failures)
        errors: Any = failures  # an ErrorLog's add/close
        with RunOutput(staging, job.schema, sys.maxsize, 0, summary, False, partition.done, writer, errors) as output:
            job.run(encoder, partition.sources, partition.done, output, node_source, job.batching, False)
        if out.local is None and summary.records:
            (out / partition.shard).put(staging / partition.shard)
    result = {"shard": partition.shard if summary.records else None, "rows": summary.records,
              "residues": summary.residues, "failures": failures}  # fmt: skip
    return json.dumps(result).encode()


def shard_failures(path: Location) -> int | None:
    """The failure count a partition's shard recorded (None: not a partition shard)."""
    import pyarrow.parquet as pq

    with path.open("rb") as f:
        metadata = pq.ParquetFile(f).metadata.metadata or {}
    return json.loads(metadata[PARTITION_KEY])["failures"] if PARTITION_KEY in metadata else None


def _to_run(parts: Sequence[Partition], out: Location, done: Mapping[str, str]) -> list[Partition]:
    """The partitions to (re)run, each with the done ids of its own files from other shards: a
    partition whose shard is complete without failures is skipped; one with failures is
    re-run whole (its shard rewritten), so that failed records are retried."""
    existing = set(out.names())
    rerun: set[str] = set()  # ids in the shards about to be rewritten
    selected = []
    for part in parts:
        if part.shard in existing:
            if shard_failures(out / part.shard) == 0:
                continue
            with (out / part.shard).open("rb") as f:
                rerun.update(shard_sources([f]))
        selected.append(part)
    by_stem: dict[str, set[int]] = {}
    for i, part in enumerate(selected):
        for source in part.sources:
            by_stem.setdefault(source.stem, set()).add(i)
    own: dict[int, dict[str, str]] = {}
    for rid in done.keys() - rerun:  # an id is <stem>_<chain> or <stem>: try each cut at an underscore
        for stem in [rid] + [rid[:i] for i, ch in enumerate(rid) if ch == "_"]:
            for i in by_stem.get(stem, ()):
                own.setdefault(i, {})[rid] = done[rid]
    return [Partition(p.index, p.sources, own.get(i, {})) for i, p in enumerate(selected)]


def run_ray(
    job: RayJob,
    sources: Sequence[Source],
    done: Mapping[str, str],
    output: RunOutput,
    ray_address: str | None,
    files_per_partition: int = PARTITION_FILES,
) -> None:
    """Run the job on Ray (``ray_address``: an existing cluster; None: the instance already
    initialised in this process, the cluster of ``RAY_ADDRESS``, or a new one on this machine).
    Failures go to ``output``; its summary gets the counts and ``driver_bytes`` (bytes of task
    results received)."""
    ray = _ray()
    started = not ray.is_initialized()
    if started:  # a new local instance unless an address is given (or RAY_ADDRESS, as in a Ray job)
        address = ray_address or os.environ.get("RAY_ADDRESS") or "local"
        ray.init(address=address, include_dashboard=False, log_to_driver=False)
    try:
        device = dict(job.load).get("device") or "cpu"
        gpu = str(device).startswith("cuda")
        resources = ray.cluster_resources()
        slots = max(1, int(resources.get("GPU", 0) if gpu else resources.get("CPU", 1)))
        task = ray.remote(num_cpus=1, num_gpus=1 if gpu else 0, max_retries=3)(embed_partition)
        todo = _to_run(partitions(sources, files_per_partition), Location(job.out, "out"), done)
        log.info("%d partitions to embed on %d worker slots", len(todo), slots)
        job_ref = ray.put(job)
        in_flight: dict[Any, Partition] = {}
        try:
            while todo or in_flight:
                while todo and len(in_flight) < TASKS_PER_WORKER * slots:
                    part = todo.pop(0)
                    in_flight[task.remote(job_ref, part)] = part
                ready, _ = ray.wait(list(in_flight), num_returns=1)
                part = in_flight.pop(ready[0])
                try:
                    payload = ray.get(ready[0])
                except ray.exceptions.RayError as err:
                    first = part.sources[0].given
                    raise ClusterError(
                        f"engine='ray': partition {part.index} ({len(part.sources)} files from {first}) failed on "
                        f"the cluster after Ray's retries: {err}. Complete shards are kept: re-run the same "
                        "command to resume"
                    ) from err
                _record(payload, output)
        finally:
            for ref in in_flight:
                ray.cancel(ref, force=True)
    finally:
        if started:
            ray.shutdown()


def _record(payload: bytes, output: RunOutput) -> None:
    """Add one task's summary to the run's counts and error log."""
    result: Mapping[str, Any] = json.loads(payload)
    output.summary.driver_bytes += len(payload)
    output.summary.records += result["rows"]
    output.summary.residues += result["residues"]
    for f in result["failures"]:
        output.fail(Failed(f["source"], f["chain"], f["reason"], f["id"]))


def for_workers(value: str | os.PathLike, argument: str) -> str:
    """A path as workers in other directories (or on other nodes with the same file system)
    find it: absolute; a URL or a Hub repo id as it is."""
    where = Location(value, argument)
    return os.path.abspath(where.local) if where.local is not None and where.local.exists() else str(value)


def worker_sources(sources: Sequence[Source]) -> list[Source]:
    """``sources`` with absolute local paths (``given`` kept, symlinks not resolved)."""
    return [Source(Path(os.path.abspath(s.path)) if isinstance(s.path, Path) else s.path, s.given, s.chain)
            for s in sources]  # fmt: skip


class RemoteOut:
    """``--out`` on an object store: the workers put the shards there; the driver checks and
    resumes it as :func:`~.run_state.prepare_output` does a local directory, keeps ``_errors.jsonl``
    and ``_manifest.json`` in a local ``staging`` directory and puts them there at the end,
    the manifest last. (No lock: object stores have none; run one embed per ``--out``.)"""

    def __init__(self, where: Location):
        self.where = where
        self._staging = tempfile.TemporaryDirectory(prefix="ipa-export-out-")
        self.staging = Path(self._staging.name)

    def prepare(
        self, identity: Mapping[str, Any], keys: Sequence[str], overwrite: bool, sources: Sequence[Source]
    ) -> dict[str, str]:
        """Check the location against the run ``identity`` (``keys``) and the inputs' recorded
        fingerprints (a changed input is refused: its rows cannot be rewritten in place here);
        record both in ``_run.json``; return record id -> source of the rows done."""
        names = self.where.names()
        shards = [n for n in names if SHARD_PATTERN.fullmatch(n)]
        previous = self._json(RUN_FILE) if RUN_FILE in names else None
        identities = {}
        for name in shards:
            with (self.where / name).open("rb") as f:
                identities[name] = shard_identity(f)
        foreign = [n for n, i in identities.items() if i is None]
        foreign += [ERRORS_FILE] if ERRORS_FILE in names and previous is None else []
        if foreign:
            raise FileExistsError(
                f"out: {self.where} holds files this package did not write ({', '.join(foreign[:5])}); "
                "pass a new or empty location"
            )
        runs = [i for i in (previous, *identities.values()) if i is not None]
        differs = sorted({k for run in runs for k in keys if run.get(k) != identity[k]})
        if differs and not overwrite:
            raise FileExistsError(
                f"out: {self.where} holds embeddings of another run (different {', '.join(differs)}); "
                "pass overwrite=True to replace them, or a new --out location"
            )
        recorded = {} if differs or previous is None else previous.get("inputs") or {}
        current = {s.given: fingerprint(s.path, s.given) for s in sources}
        if changed := changed_inputs(recorded, current.values()):
            raise FileExistsError(
                f"out: {self.where}: {len(changed)} input(s) changed since they were embedded "
                f"({', '.join(changed[:5])}); pass overwrite=True to embed everything again, or a new --out location"
            )
        for name in [*shards, RUN_FILE, ERRORS_FILE, MANIFEST_FILE] if differs else [MANIFEST_FILE]:
            (self.where / name).remove()
        inputs = {**recorded, **{g: {k: v for k, v in vars(f).items() if k != "given"} for g, f in current.items()}}
        self._put(RUN_FILE, json.dumps({**identity, "inputs": inputs}, indent=2) + "\n")
        done: dict[str, str] = {}
        for name in [] if differs else shards:
            with (self.where / name).open("rb") as f:
                done.update(shard_sources([f]))
        return done

    def shards(self) -> dict[str, int]:
        """Rows of every complete shard."""
        import pyarrow.parquet as pq

        rows = {}
        for name in filter(SHARD_PATTERN.fullmatch, self.where.names()):
            with (self.where / name).open("rb") as f:
                rows[name] = pq.ParquetFile(f).metadata.num_rows
        return rows

    def publish(self) -> None:
        """Put ``_errors.jsonl``, then ``_manifest.json``, from the staging directory."""
        for name in (ERRORS_FILE, MANIFEST_FILE):
            (self.where / name).put(self.staging / name)
        self._staging.cleanup()

    def _json(self, name: str) -> dict[str, Any] | None:
        try:
            value = json.loads((self.where / name).read_bytes())
        except ValueError:
            return None
        return value if isinstance(value, dict) else None

    def _put(self, name: str, text: str) -> None:
        (self.staging / name).write_text(text)
        (self.where / name).put(self.staging / name)
