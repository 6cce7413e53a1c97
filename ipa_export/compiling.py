"""``torch.compile``-first inference: one compiled graph for every batch size and length,
and a compile cache kept next to an export.

:func:`compile_encoder` compiles an :class:`~ipa_export.IPAEncoder` with
``fullgraph=True, dynamic=True``. ``dynamic=True`` alone compiles twice: a size-1 batch
dimension is specialised (the "0/1 specialisation"), so batch size 1 and batch sizes >= 2
get separate graphs. To get one graph, a forward pre-hook that runs eagerly, outside the
compiled region, passes each tensor argument on as an alias (``x.view_as(x)``; no copy,
autograd intact, the caller's tensors are not modified) whose batch dimension is marked
*unbacked* with ``min=1`` and one shared ``shape_id``: the compiler then reasons about
the batch size without ever assuming it is, or is not, 1. The length N stays an ordinary
dynamic dimension (lengths >= 2 share one graph). No global config is changed.

On torch versions whose ``mark_unbacked`` lacks ``min``/``shape_id`` the hook is not
installed and the bound is the plain ``dynamic=True`` one: two graphs (batch 1, batch >= 2).
Each distinct call signature (``rotations``/``trans_sc`` given or ``None``), dtype or
device compiles its own graph, as usual.

Compile cache: :func:`save_compile_cache` writes what this process compiled
(``torch.compiler.save_cache_artifacts``) to a file, by convention
``<export>/compile_cache/<torch version>-<device>.bin`` (:func:`compile_cache_file`);
:func:`load_compile_cache` loads one in a new process before compiling, so the first call
skips AOTAutograd and Inductor codegen (Dynamo still traces).
``IPAEncoder.from_pretrained(dir, compile=True)`` loads the export's cache when present.
A cache holds generated code that is executed when used: load only caches you trust.

>>> encoder = IPAEncoder.from_pretrained("export", compile=True)   # doctest: +SKIP
>>> out = encoder(node_embed, translations, node_mask)              # doctest: +SKIP
>>> save_compile_cache(compile_cache_file("export", "cpu"))         # doctest: +SKIP
"""

from __future__ import annotations

import inspect
import logging
import os
import re
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping

import torch
from torch import nn

if TYPE_CHECKING:
    from .encoder import IPAEncoder

log = logging.getLogger(__name__)

COMPILE_CACHE_DIR = "compile_cache"  #: sub-directory of an export that holds compile caches
BATCH_SHAPE_ID = "ipa_export.batch"  #: shape_id shared by every input's batch dimension


def _find_mark_unbacked() -> Callable[..., None] | None:
    """``mark_unbacked`` if this torch has one that takes ``min`` and ``shape_id``."""
    mark = getattr(torch._dynamo, "mark_unbacked", None)
    if mark is None:
        from torch._dynamo import decorators

        mark = getattr(decorators, "mark_unbacked", None)
    if mark is None:
        return None
    try:
        parameters = inspect.signature(mark).parameters
    except (TypeError, ValueError):  # pragma: no cover - C callables
        return None
    return mark if {"min", "shape_id"} <= parameters.keys() else None


_MARK_UNBACKED = _find_mark_unbacked()
#: Compiled graphs per call signature across batch sizes and lengths >= 2: 1 where this
#: torch can mark the batch dimension unbacked, else 2 (batch size 1 and batch size >= 2).
COMPILE_BOUND = 1 if _MARK_UNBACKED is not None else 2


def _unbacked_batch(x: Any) -> Any:
    """An alias of tensor ``x`` with dim 0 marked unbacked (>= 1); anything else as it is."""
    if not isinstance(x, torch.Tensor) or x.dim() == 0 or x.shape[0] == 0:
        return x  # empty batches keep their shape, and the encoder's error
    alias = x.view_as(x)
    assert _MARK_UNBACKED is not None
    _MARK_UNBACKED(alias, 0, shape_id=BATCH_SHAPE_ID, min=1)
    return alias


def _batch_pre_hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
    return tuple(_unbacked_batch(a) for a in args), {k: _unbacked_batch(v) for k, v in kwargs.items()}


def compile_encoder(
    encoder: IPAEncoder,
    *,
    backend: str | Callable[..., Any] = "inductor",
    mode: str | None = None,
    options: Mapping[str, Any] | None = None,
) -> nn.Module:
    """``torch.compile(encoder, fullgraph=True, dynamic=True)`` with one graph for every
    batch size (see the module docstring; :data:`COMPILE_BOUND` graphs per call signature).

    Returns the ``OptimizedModule``: call it like the encoder; attributes (``config``,
    ``attention_backend``, ...) are the encoder's. Compile after ``encoder.eval()``; graphs
    are specialised on the grad mode, so run it under ``torch.no_grad()`` or
    ``torch.inference_mode()`` consistently. ``backend``, ``mode`` and ``options`` are
    passed to ``torch.compile``.
    """
    compiled = torch.compile(
        encoder, fullgraph=True, dynamic=True, backend=backend, mode=mode, options=dict(options) if options else None
    )
    if _MARK_UNBACKED is not None:
        compiled.register_forward_pre_hook(_batch_pre_hook, with_kwargs=True)
    else:  # pragma: no cover - depends on the torch version
        log.info("torch %s cannot mark the batch dimension unbacked: batch size 1 compiles its own graph", torch.__version__)
    return compiled  # type: ignore[return-value]


def compile_cache_file(directory: str | os.PathLike, device: str | torch.device = "cpu") -> Path:
    """The conventional cache file of an export directory for this torch version and a
    device type: ``<directory>/compile_cache/<torch version>-<device type>.bin``."""
    version = re.sub(r"[^A-Za-z0-9.+_-]", "_", torch.__version__)
    return Path(directory) / COMPILE_CACHE_DIR / f"{version}-{torch.device(device).type}.bin"


def save_compile_cache(path: str | os.PathLike) -> Any:
    """Write every compile artifact of this process so far to ``path`` (atomically,
    creating parent directories). Returns torch's ``CacheInfo``, or ``None`` when there was
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
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    log.info("saved compile cache %s (%d bytes)", path, len(data))
    return info


def load_compile_cache(path: str | os.PathLike) -> Any:
    """Load a file written by :func:`save_compile_cache` into this process's compile
    caches; call it before the first compiled call. Returns torch's ``CacheInfo``, or
    ``None`` if the file could not be used (logged) or this torch has no
    ``torch.compiler.load_cache_artifacts``. Raises FileNotFoundError if ``path`` is missing.

    The cache holds generated code that runs when used: load only caches you trust."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no compile cache there")
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


def compile_pretrained(
    encoder: IPAEncoder, directory: str | os.PathLike, device: str | torch.device | None, compile_cache: bool | str | os.PathLike
) -> nn.Module:
    """What ``from_pretrained(..., compile=True)`` returns: load the compile cache
    (``True``: the export's :func:`compile_cache_file` when present; a path: that file;
    ``False``: none), then :func:`compile_encoder`."""
    if compile_cache is not False:
        explicit = compile_cache is not True
        path = Path(compile_cache) if explicit else compile_cache_file(directory, device or "cpu")  # type: ignore[arg-type]
        if explicit or path.is_file():
            load_compile_cache(path)
    return compile_encoder(encoder)
