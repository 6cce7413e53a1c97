"""Atomic file system writes: the one module that creates, renames and removes paths.

A directory or file is written under a temporary name next to its target and renamed into
place only when complete, so a failed or killed write never leaves a half-written target.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_directory(target: str | os.PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield an empty temporary directory next to ``target`` and rename it to ``target`` on
    success; on any error remove it, leaving ``target`` as it was."""
    target = Path(target)
    if target.exists() and not overwrite:
        raise FileExistsError(f"{target}: already exists (pass overwrite=True / --overwrite to replace it)")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
        make_shareable(tmp)
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            target.rename(old / target.name)
            tmp.rename(target)
            shutil.rmtree(old)
        else:
            tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextmanager
def atomic_file(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``target`` to write to; on success it replaces
    ``target`` (readable as the umask allows), on any error it is removed."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{target.name}.tmp-", dir=target.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        make_shareable(tmp)
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def make_shareable(path: Path) -> None:
    """mkdtemp/mkstemp create private (0700/0600) paths: give ``path`` (and what a directory
    holds) the modes the umask gives new files."""
    umask = os.umask(0)
    os.umask(umask)
    for p in (path, *path.rglob("*")) if path.is_dir() else (path,):
        p.chmod((0o777 if p.is_dir() else 0o666) & ~umask)
