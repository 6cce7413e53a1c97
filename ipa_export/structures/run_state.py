"""What an embeddings directory holds besides its rows: the writer's lock and the fingerprints
of the inputs its rows were computed from.

``DIR/_lock`` is held (``flock``, exclusive) by the one run writing ``DIR``, for the whole run,
and names its pid; the kernel releases it when that process ends, however it ends, so a
killed run leaves no stale lock (POSIX; on Windows there is no lock). Each input's
:class:`Fingerprint` (size, mtime, SHA-256 of its bytes) is recorded in ``DIR/_run.json``, so
a resumed run can tell a changed input from the one its rows were computed from.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .storage import Location

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: no lock
    fcntl = None  # type: ignore[assignment]

__all__ = ["LOCK_FILE", "Fingerprint", "changed_inputs", "fingerprint", "output_lock"]

LOCK_FILE = "_lock"


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
    digest = hashlib.sha256()
    if not isinstance(path, Path):
        size = 0
        with Location(path, "inputs").open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
                size += len(block)
        return Fingerprint(given, path, size, 0, digest.hexdigest())
    with open(path, "rb") as f:
        stat = os.fstat(f.fileno())
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return Fingerprint(given, str(path.resolve()), stat.st_size, stat.st_mtime_ns, digest.hexdigest())


def changed_inputs(recorded: Mapping[str, Mapping[str, Any]], current: Iterable[Fingerprint]) -> list[str]:
    """The ``given`` names of ``current`` inputs whose SHA-256 differs from the one
    ``recorded`` (``_run.json``'s ``inputs``: given -> fingerprint fields) for them."""
    return [now.given for now in current if now.given in recorded and recorded[now.given].get("sha256") != now.sha256]
