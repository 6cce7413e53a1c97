"""File-system URLs for a corpus run: ``s3://``, ``gs://``, ``hf://``, ``memory://``, ``file://``
beside plain local paths, through fsspec.

A local path (or a ``file://`` URL, turned into one) keeps the package's local code path: locks,
``fsync``, renames. Any other URL is read and written through its fsspec file system; structure
files are copied to a temporary local file to be parsed, and files are written whole (an object
store's put is atomic: a reader sees the previous object or the complete new one).
"""

from __future__ import annotations

import os
import posixpath
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from ..errors import InputError, MissingDependencyError

__all__ = ["Location", "is_url", "local_copy", "url_filesystem"]

_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def is_url(value: str | os.PathLike) -> bool:
    """True for ``scheme://...`` (a Windows drive such as ``C:\\`` is a path)."""
    return isinstance(value, str) and bool(_URL.match(value))


def url_filesystem(url: str, argument: str) -> tuple[Any, str]:
    """(fsspec file system, path within it) for ``url``; ``argument`` names the option in errors."""
    import fsspec

    try:
        return fsspec.core.url_to_fs(url)
    except ImportError as err:
        raise MissingDependencyError(
            f"{argument}: {url}: this file system needs a package that is not installed ({err}); "
            "for s3:// and gs:// pip install 'ipa-export[cloud]'"
        ) from err
    except ValueError as err:
        raise InputError(f"{argument}: {url}: not a file-system URL fsspec knows ({err})") from err


class Location:
    """A file or directory, local (``local`` is its Path) or on an fsspec file system (``fs``,
    ``path``); ``url`` is how it is shown. Children are joined with ``/``."""

    def __init__(self, value: str | os.PathLike, argument: str):
        self.argument = argument
        if is_url(value) and not str(value).startswith("file://"):
            self.url = str(value).rstrip("/")
            self.fs, self.path = url_filesystem(self.url, argument)
            self.local: Path | None = None
        else:
            self.local = Path(unquote(urlsplit(str(value)).path)) if is_url(value) else Path(value)
            self.url, self.fs, self.path = str(self.local), None, str(self.local)

    def __truediv__(self, name: str) -> Location:
        if self.local is not None:
            return Location(self.local / name, self.argument)
        child = Location.__new__(Location)
        child.argument, child.fs, child.local = self.argument, self.fs, None
        scheme, rest = self.url.split("://", 1)
        child.url = f"{scheme}://{posixpath.normpath(f'{rest}/{name}')}"
        child.path = posixpath.normpath(f"{self.path}/{name}")
        return child

    @property
    def name(self) -> str:
        return self.url.rsplit("/", 1)[-1] if self.local is None else self.local.name

    @property
    def parent(self) -> Location:
        if self.local is not None:
            return Location(self.local.parent, self.argument)
        return Location(self.url.rsplit("/", 1)[0], self.argument)

    def is_dir(self) -> bool:
        return self.local.is_dir() if self.local is not None else bool(self.fs.isdir(self.path))

    def is_file(self) -> bool:
        return self.local.is_file() if self.local is not None else bool(self.fs.isfile(self.path))

    def size(self) -> int:
        return self.local.stat().st_size if self.local is not None else int(self.fs.size(self.path))

    def files(self) -> list[Location]:
        """Every file below this remote directory, recursively, sorted by path."""
        assert self.fs is not None, "local directories are searched with Path.rglob"
        found = sorted(self.fs.find(self.path))
        return [self / f[len(self.path.rstrip("/")) + 1 :] for f in found if f.startswith(self.path.rstrip("/") + "/")]

    def names(self) -> list[str]:
        """Names of the entries of this directory (empty when it does not exist)."""
        if self.local is not None:
            return sorted(p.name for p in self.local.iterdir()) if self.local.is_dir() else []
        if not self.fs.isdir(self.path):
            return []
        return sorted(str(p).rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(self.path, detail=False))

    def read_bytes(self) -> bytes:
        return self.local.read_bytes() if self.local is not None else bytes(self.fs.cat_file(self.path))

    def open(self, mode: str = "rb") -> Any:
        return open(self.local, mode) if self.local is not None else self.fs.open(self.path, mode)  # noqa: SIM115

    def put(self, source: Path) -> None:
        """Publish the local file ``source`` here whole (remote locations only: one put)."""
        assert self.fs is not None, "local locations are written with export.files.atomic_file"
        self.fs.makedirs(posixpath.dirname(self.path), exist_ok=True)  # a local:// directory; object stores have none
        self.fs.put_file(str(source), self.path)

    def remove(self) -> None:
        """Remove this remote file if it exists (local files are removed by export.files)."""
        assert self.fs is not None, "local files are removed with export.files.remove_files"
        if self.fs.exists(self.path):
            self.fs.rm_file(self.path)

    def __str__(self) -> str:
        return self.url


@contextmanager
def local_copy(value: str | os.PathLike) -> Iterator[Path]:
    """A local path holding the file ``value``: the path itself, or a temporary copy of a remote
    file with the same name (removed afterwards)."""
    where = Location(value, "inputs")
    if where.local is not None:
        yield where.local
        return
    with tempfile.TemporaryDirectory(prefix="ipa-export-") as directory:
        copy = Path(directory) / where.name
        with where.open("rb") as source, open(copy, "wb") as target:
            shutil.copyfileobj(source, target, 1 << 20)
        yield copy
