"""The state of an embeddings directory besides its rows: the writer's lock, the run's
identity, resume, and the manifest.

``DIR/_lock`` is held (``flock``, exclusive) by the one run writing ``DIR``, for the whole run,
and names its pid; the kernel releases it when that process ends, however it ends, so a
killed run leaves no stale lock (POSIX; on Windows there is no lock). ``DIR/_run.json`` records
the run's identity (:func:`run_identity`: what its values depend on) and each input's
:class:`Fingerprint` (size, mtime, SHA-256 of its bytes), so a resumed run
(:func:`prepare_output`) can tell another run's shards and a changed input from the ones its
rows were computed from. ``DIR/_manifest.json`` is written last (:func:`write_manifest`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .._version import __version__
from ..export.files import atomic_file, remove_files, sha256_of
from .inputs import Source
from .shards import (
    ERRORS_FILE,
    MANIFEST_FILE,
    RUN_FILE,
    SHARD_PATTERN,
    drop_rows,
    shard_identity,
    shard_paths,
    shard_sources,
)
from .storage import Location

if TYPE_CHECKING:
    from .pipeline import EmbedSummary

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: no lock
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "IDENTITY_KEYS",
    "LOCK_FILE",
    "Fingerprint",
    "changed_inputs",
    "fingerprint",
    "output_lock",
    "prepare_output",
    "run_identity",
    "shard_rows",
    "write_manifest",
]

LOCK_FILE = "_lock"
log = logging.getLogger(__name__)

#: what the values of a run depend on: a resumed run must match them
IDENTITY_KEYS = ("weights_sha256", "config_sha256", "dtype", "outputs", "node_embed")


@contextmanager
def output_lock(out: Path) -> Iterator[None]:
    """Hold ``out/_lock`` exclusively until exit (``out`` is created if missing). Raises
    FileExistsError naming the holder's pid when another process holds it. On an error in the
    ``with`` body the lock file and ``out`` are removed again if this call created them."""
    created_dir = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    path = out / LOCK_FILE
    created_file = not os.path.lexists(path)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    try:
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                pid = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
                created_file = created_dir = False
                raise FileExistsError(
                    f"out: another embed is writing {out} (pid {pid}); wait for it to finish, or write to another "
                    "directory"
                ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    except BaseException:
        if created_file:
            path.unlink(missing_ok=True)
        if created_dir:
            with suppress(OSError):
                out.rmdir()
        raise
    finally:
        os.close(fd)


@dataclass(frozen=True)
class Fingerprint:
    """One input as read: ``given`` as the user wrote it, ``path`` resolved, ``size`` in
    bytes, ``mtime_ns``, and the SHA-256 of its bytes (as stored, before any decompression)."""

    given: str
    path: str
    size: int
    mtime_ns: int
    sha256: str


def fingerprint(path: Path | str, given: str) -> Fingerprint:
    """Size, mtime and streamed SHA-256 (1 MB blocks) of ``path`` (a file-system URL: size and
    SHA-256 of the bytes read through it, mtime 0)."""
    if not isinstance(path, Path):
        with Location(path, "inputs").open("rb") as f:
            digest, size = sha256_of(f)
        return Fingerprint(given, path, size, 0, digest)
    with open(path, "rb") as f:
        stat = os.fstat(f.fileno())
        digest, _ = sha256_of(f)
    return Fingerprint(given, str(path.resolve()), stat.st_size, stat.st_mtime_ns, digest)


def changed_inputs(recorded: Mapping[str, Mapping[str, Any]], current: Iterable[Fingerprint]) -> list[str]:
    """The ``given`` names of ``current`` inputs whose SHA-256 differs from the one
    ``recorded`` (``_run.json``'s ``inputs``: given -> fingerprint fields) for them."""
    return [now.given for now in current if now.given in recorded and recorded[now.given].get("sha256") != now.sha256]


def run_identity(
    export: str | os.PathLike, encoder: Any, outputs: Sequence[str], node_embed: str | os.PathLike | None
) -> dict[str, Any]:
    """What the values of a run depend on; a resumed run must match (``IDENTITY_KEYS``)."""
    with open(Path(encoder.export_directory) / "model.safetensors", "rb") as f:
        weights, _ = sha256_of(f)
    config = json.dumps(encoder.config.to_dict(), sort_keys=True)
    return {
        "format": "ipa_export.embeddings",
        "format_version": 1,
        "export": str(export),
        "weights_sha256": weights,
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
    differs = [k for k in IDENTITY_KEYS if previous is not None and previous.get(k) != identity[k]]
    differs += sorted(
        {k for p in shards for k in IDENTITY_KEYS if (shard_identity(p) or {}).get(k) != identity[k]} - set(differs)
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


def shard_rows(path: Path) -> int:
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
