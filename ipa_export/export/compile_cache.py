"""Compile caches: what one process compiled, saved for the next (``torch.compiler`` artifacts).

:func:`save_compile_cache` writes what this process compiled
(``torch.compiler.save_cache_artifacts``) to a file; :func:`load_compile_cache` loads one in
a new process before the first compiled call, which then skips AOTAutograd and Inductor's
lowering and code generation (Dynamo still traces and, on CPU, the generated C++ is still
built). Loading a cache runs the code it holds (it is unpickled, and its entries are written
into torch's caches), so caches are never read from an export or a Hub snapshot: they live
in this package's per-user cache directory (:func:`cache_root`, private to the user),
keyed by the export's content hash, the torch version and the device type
(:func:`compile_cache_file`), and are written only by this machine. A file anywhere else is
loaded only with ``trusted=True``.

>>> encoder = IPAEncoder.from_pretrained("export", compile=True)   # doctest: +SKIP
>>> encoder(node_embed, translations, node_mask)                    # doctest: +SKIP
>>> save_compile_cache(compile_cache_file("export", "cpu"))         # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import time
from pathlib import Path
from typing import Any

import torch

from ..errors import UntrustedFileError
from .files import atomic_file

log = logging.getLogger(__name__)

CACHE_ENV = "IPA_EXPORT_CACHE"  #: environment variable naming the cache directory (see cache_root)


def cache_root() -> Path:
    """This package's per-user cache directory: ``$IPA_EXPORT_CACHE``, else
    ``$XDG_CACHE_HOME/ipa_export``, else ``~/.cache/ipa_export``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "ipa_export"


def compile_cache_file(directory: str | os.PathLike, device: str | torch.device = "cpu") -> Path:
    """The compile cache of the export in ``directory`` for this torch version and a device
    type: ``<cache_root()>/compile/<content hash>-torch<version>-<device type>.bin``, where the
    content hash (sha256) covers the names and bytes of the export's files, so a cache
    never serves another export, even one at the same path."""
    digest = hashlib.sha256()
    for path in sorted(Path(directory).iterdir()):
        if path.is_file():
            digest.update(f"{path.name}\0{path.stat().st_size}\0".encode())
            with open(path, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 22), b""):
                    digest.update(chunk)
    version = re.sub(r"[^A-Za-z0-9.+_-]", "_", torch.__version__)
    return cache_root() / "compile" / f"{digest.hexdigest()[:32]}-torch{version}-{torch.device(device).type}.bin"


def save_compile_cache(path: str | os.PathLike) -> Any:
    """Write every compile artifact of this process so far to ``path`` (atomically,
    creating parent directories; readable by the user only), by convention
    :func:`compile_cache_file`. Returns torch's ``CacheInfo``, or ``None`` when there was
    nothing to save or this torch has no ``torch.compiler.save_cache_artifacts``."""
    if not hasattr(torch.compiler, "save_cache_artifacts"):
        log.warning("torch %s has no torch.compiler.save_cache_artifacts: compile cache not saved", torch.__version__)
        return None
    saved = torch.compiler.save_cache_artifacts()
    if saved is None:
        log.info("no compile artifacts to save: call the compiled encoder first")
        return None
    data, info = saved
    path = Path(path)
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    with atomic_file(path, private=True) as tmp:
        tmp.write_bytes(data)
    log.info("saved compile cache %s (%d bytes)", path, len(data))
    return info


def load_compile_cache(path: str | os.PathLike, *, trusted: bool = False) -> Any:
    """Load a file written by :func:`save_compile_cache` into this process's compile
    caches; call it before the first compiled call. Returns torch's ``CacheInfo``, or
    ``None`` if the file could not be used (logged) or this torch has no
    ``torch.compiler.load_cache_artifacts``. Raises FileNotFoundError if ``path`` is missing.

    Loading runs the code the cache holds. A file in :func:`cache_root` is loaded only if
    this user owns it and its directory and nobody else can write them; any other file only
    with ``trusted=True``: pass it only for a file you made. Refusals raise
    :class:`~ipa_export.errors.UntrustedFileError` (a PermissionError)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no compile cache there")
    _check_trusted(path, trusted)
    if not hasattr(torch.compiler, "load_cache_artifacts"):
        log.warning("torch %s has no torch.compiler.load_cache_artifacts: %s not loaded", torch.__version__, path)
        return None
    start = time.perf_counter()
    info = torch.compiler.load_cache_artifacts(path.read_bytes())
    if info is None:
        log.warning("%s: not a compile cache this torch can load; compiling from scratch", path)
    else:
        log.info("loaded compile cache %s in %.2f s", path, time.perf_counter() - start)
    return info


def _check_trusted(path: Path, trusted: bool) -> None:
    """Refuse a cache outside :func:`cache_root` unless ``trusted``, and one inside it that
    another user owns or can write."""
    root = os.path.realpath(cache_root())
    real = os.path.realpath(path)
    if os.path.commonpath([root, real]) != root:
        if trusted:
            return
        raise UntrustedFileError(
            f"{path}: refusing to load a compile cache from outside this user's cache directory {root}: "
            "loading one runs the code it holds. Pass trusted=True (from_pretrained: trust_compile_cache=True) "
            "only for a file you made"
        )
    if hasattr(os, "getuid"):
        for p in (real, os.path.dirname(real)):
            status = os.stat(p)
            if status.st_uid != os.getuid() or status.st_mode & 0o022:
                raise UntrustedFileError(
                    f"{p}: refusing to load a compile cache that another user owns or can write "
                    f"(owner uid {status.st_uid}, mode {status.st_mode & 0o777:o}); remove it"
                )


def load_export_compile_cache(
    directory: str | os.PathLike,
    device: str | torch.device | None,
    compile_cache: bool | str | os.PathLike,
    trusted: bool = False,
) -> None:
    """The compile cache ``from_pretrained(..., compile=True)`` loads: ``True``, this export's
    :func:`compile_cache_file` in the user's cache when present; a path, that file (only with
    ``trusted``); ``False``, none. Nothing in ``directory`` other than its files' bytes is used."""
    if compile_cache is True:
        path = compile_cache_file(directory, device or "cpu")
        if path.is_file():
            load_compile_cache(path)
    elif compile_cache is not False:
        load_compile_cache(compile_cache, trusted=trusted)
