"""Atomic, exclusive writes that never remove what they did not create: the one module of
the package that creates, renames and deletes paths on disk.

A directory is written into a temporary sibling ``.<name>.ipa-export-tmp-<pid>-<hex>`` and
renamed into place. Replacing an existing directory renames it to
``.<name>.ipa-export-old-<pid>-<hex>`` first, then the new one into place, then removes the
old one. Every rename and every look at the siblings happens under an advisory lock on the
parent directory (``flock``); each writer also holds a lock on its own temporary directory
while it works, so that a second writer can tell a live writer (it refuses: "another process
is writing") from the leftovers of a killed one (cleaned up, and a previous directory left
under ``-old-`` by a kill between the two renames is put back). On systems without
``fcntl`` (Windows) there are no locks: concurrent writers are not detected and leftovers
are kept.

Nothing is removed unless its name is this module's and it holds only names the caller
owns. A target that exists must be an empty directory, or a directory the caller owns
(``marker`` present and nothing but ``owned`` names) and ``overwrite=True``.

:func:`sha256_of` is the one streamed SHA-256 of a file's bytes (run identities, input
fingerprints, a converted checkpoint's provenance).
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import secrets
import shutil
from collections.abc import Collection, Iterable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import BinaryIO

from ..errors import InputError

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger(__name__)

TAG = "ipa-export"  #: in the name of every temporary path this module creates


@contextmanager
def atomic_directory(
    target: str | os.PathLike,
    *,
    owned: Collection[str],
    marker: str,
    overwrite: bool = False,
    protect: Iterable[str | os.PathLike] = (),
    kind: str = "export",
) -> Iterator[Path]:
    """Yield an empty temporary directory next to ``target``; on success it becomes
    ``target`` (replacing an existing one only with ``overwrite=True``); on any error it is
    removed and ``target`` is left as it was.

    ``owned``: the names a ``kind`` directory holds; ``marker``: the one every such
    directory holds. Raises FileExistsError for a target that is not an empty or ``kind``
    directory (even with ``overwrite``), an existing one without ``overwrite``, or one
    another process is writing; InputError (a ValueError) for a target that is (or holds) the current
    directory or one of the ``protect`` paths (the inputs of the write).
    """
    target = Path(os.path.abspath(target))  # "." and ".." resolved; symlinks are not followed
    _refuse_inputs(target, protect)
    created = _make_parents(target.parent)
    try:
        with ExitStack() as held:
            with _locked(target.parent):
                _recover(target, owned)
                _check_target(target, owned, marker, overwrite, kind)
                tmp = _sibling(target, "tmp")
                os.mkdir(tmp, 0o700)
                held.enter_context(_locked(tmp))
            try:
                yield tmp
                make_shareable(tmp)
                with _locked(target.parent):
                    _check_target(target, owned, marker, overwrite, kind)
                    old = _install(tmp, target, held)
            except OSError as error:
                shutil.rmtree(tmp, ignore_errors=True)
                if isinstance(error, (FileExistsError, FileNotFoundError, PermissionError)):
                    raise
                message = f"{target}: not written, nothing was left behind ({_describe(error)})"
                raise (OSError(error.errno, message) if error.errno else OSError(message)) from error
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            if old is not None:
                shutil.rmtree(old)
    except BaseException:
        for directory in created:
            _rmdir_if_empty(directory)
        raise


@contextmanager
def atomic_file(path: str | os.PathLike, *, private: bool = False) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success it replaces ``path`` (a file)
    atomically, readable as the umask allows (``private``: by its owner only, 0600); on any
    error it is removed. Leftovers of killed writers are removed."""
    path = Path(os.path.abspath(path))
    if path.is_dir():
        raise IsADirectoryError(f"{path}: is a directory, expected a file path")
    path.parent.mkdir(parents=True, exist_ok=True)
    with ExitStack() as held:
        with _locked(path.parent):
            _recover(path, owned=())
            tmp = _sibling(path, "tmp")
            os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
            held.enter_context(_locked(tmp))
        try:
            yield tmp
            if not private:
                make_shareable(tmp)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def remove_files(paths: Iterable[str | os.PathLike]) -> None:
    """Remove the files ``paths`` (missing ones are fine). Callers pass only files the package
    wrote, named by their own format (e.g. an embeddings directory's shards)."""
    for path in paths:
        Path(path).unlink(missing_ok=True)


def make_shareable(path: Path) -> None:
    """Give ``path`` (and what a directory holds) the modes the umask gives new files:
    temporaries are created private (0700/0600)."""
    umask = os.umask(0)
    os.umask(umask)
    for p in (path, *path.rglob("*")) if path.is_dir() else (path,):
        p.chmod((0o777 if p.is_dir() else 0o666) & ~umask)


# --- the protocol ----------------------------------------------------------------------------


def _sibling(target: Path, state: str) -> Path:
    return target.parent / f".{target.name}.{TAG}-{state}-{os.getpid()}-{secrets.token_hex(4)}"


def _siblings(target: Path) -> list[tuple[str, Path]]:
    """(state, path) of this module's temporaries of ``target``: "old" first, newest first."""
    pattern = re.compile(rf"\.{re.escape(target.name)}\.{TAG}-(tmp|old)-\d+-[0-9a-f]{{8}}")
    found = [(m.group(1), target.parent / name) for name in os.listdir(target.parent) if (m := pattern.fullmatch(name))]
    return sorted(found, key=lambda sp: (sp[0] != "old", -os.lstat(sp[1]).st_mtime))


def _recover(target: Path, owned: Collection[str]) -> None:
    """Under the parent's lock: refuse if another writer is live; put back a previous
    ``target`` that a killed overwrite left under "-old-"; remove killed writers' temporaries."""
    if fcntl is None:  # pragma: no cover - Windows: cannot tell live writers from leftovers
        return
    for state, path in _siblings(target):
        with ExitStack() as stack:
            try:
                stack.enter_context(_locked(path, blocking=False))
            except BlockingIOError:
                raise FileExistsError(
                    f"{target}: another process is writing it ({path.name} is locked); wait for it to finish"
                ) from None
            except (FileNotFoundError, PermissionError):
                continue
            if state == "old" and not os.path.lexists(target):
                os.rename(path, target)
                log.warning("%s: put back the previous version that an interrupted overwrite left in %s", target, path)
            elif path.is_dir() and not path.is_symlink() and set(os.listdir(path)) <= set(owned):
                shutil.rmtree(path)
                log.info("removed %s, left by an interrupted write", path)
            elif path.is_file() and not path.is_symlink():
                path.unlink()
                log.info("removed %s, left by an interrupted write", path)
            else:
                log.warning("%s: left in place, it holds files this package did not write", path)
    if owned:
        _recover_legacy(target, owned)


def _recover_legacy(target: Path, owned: Collection[str]) -> None:
    """The leftovers of killed writes by ipa_export <= 0.2 (no locks; mkdtemp names): a
    ``.<name>.old-*/<name>`` previous export is put back if ``target`` is missing, then such
    directories and ``.<name>.tmp-*`` ones are removed if they hold only ``owned`` names."""
    pattern = re.compile(rf"\.{re.escape(target.name)}\.(tmp|old)-[a-z0-9_]{{8}}")
    for name in sorted(os.listdir(target.parent)):
        if not (m := pattern.fullmatch(name)) or not (path := target.parent / name).is_dir() or path.is_symlink():
            continue
        inner = path / target.name if m.group(1) == "old" else path
        if (m.group(1) == "old" and os.listdir(path) != [target.name]) or not set(os.listdir(inner)) <= set(owned):
            log.warning("%s: left in place, it holds files this package did not write", path)
            continue
        if m.group(1) == "old" and not os.path.lexists(target):
            os.rename(inner, target)
            log.warning("%s: put back the previous version that an interrupted overwrite left in %s", target, path)
        shutil.rmtree(path)
        log.info("removed %s, left by an interrupted write of an earlier ipa_export", path)


def _check_target(target: Path, owned: Collection[str], marker: str, overwrite: bool, kind: str) -> None:
    if target.is_symlink():
        raise FileExistsError(f"{target}: is a symbolic link; pass the directory itself")
    if not target.exists():
        return
    if not target.is_dir():
        raise FileExistsError(f"{target}: exists and is not a directory")
    entries = sorted(os.listdir(target))
    if not entries:
        return
    foreign = [e for e in entries if e not in owned]
    if foreign or marker not in entries:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise FileExistsError(
            f"{target}: not an {kind} directory (it holds {shown or 'no ' + marker}); refusing to replace it, "
            f"even with overwrite: choose a new or empty directory"
        )
    if not overwrite:
        raise FileExistsError(f"{target}: already exists (pass overwrite=True / --overwrite to replace it)")


def _install(tmp: Path, target: Path, held: ExitStack) -> Path | None:
    """Rename ``tmp`` to ``target``; an existing non-empty ``target`` is first renamed to an
    "-old-" sibling (locked by this process until it is removed), which is returned."""
    if target.is_dir() and os.listdir(target):
        old = _sibling(target, "old")
        try:
            held.enter_context(_locked(target, blocking=False))
        except BlockingIOError:
            raise FileExistsError(f"{target}: another process is writing it; wait for it to finish") from None
        os.rename(target, old)
        try:
            os.rename(tmp, target)
        except BaseException:
            os.rename(old, target)
            raise
        return old
    os.rename(tmp, target)  # replaces an empty directory atomically
    return None


def _describe(error: OSError) -> str:
    """An OSError in one line, without the temporary path it names."""
    return (error.strerror if error.errno else None) or str(error).splitlines()[0]


def _refuse_inputs(target: Path, protect: Iterable[str | os.PathLike]) -> None:
    real = os.path.realpath(target)
    if _inside(os.path.realpath(os.getcwd()), real):
        raise InputError(f"{target}: is the current directory (or holds it); write to another directory")
    for path in protect:
        if _inside(os.path.realpath(path), real):
            raise InputError(f"{target}: holds the input {path}; write to another directory")


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def _make_parents(directory: Path) -> list[Path]:
    """Create ``directory`` and missing parents; returns those created, deepest first."""
    missing = []
    while not directory.exists():
        missing.append(directory)
        directory = directory.parent
    for d in reversed(missing):
        d.mkdir(exist_ok=True)
    return missing


def _rmdir_if_empty(directory: Path) -> None:
    try:
        directory.rmdir()
    except OSError:
        pass


@contextmanager
def _locked(path: Path, *, blocking: bool = True) -> Iterator[None]:
    """An exclusive advisory lock (flock) on a file or directory, held until exit; a
    non-blocking one (on a temporary or target, never followed if a link) raises
    BlockingIOError when another process holds it."""
    if fcntl is None:  # pragma: no cover - Windows
        yield
        return
    fd = os.open(path, os.O_RDONLY | (0 if blocking else os.O_NOFOLLOW))
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        yield
    finally:
        os.close(fd)


def sha256_of(f: BinaryIO) -> tuple[str, int]:
    """``(hex SHA-256, size in bytes)`` of what the binary file ``f`` holds from its position,
    read in 1 MB blocks (a file of any size in bounded memory)."""
    digest, size = hashlib.sha256(), 0
    for block in iter(lambda: f.read(1 << 20), b""):
        digest.update(block)
        size += len(block)
    return digest.hexdigest(), size
