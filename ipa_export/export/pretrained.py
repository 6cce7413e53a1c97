"""``save_pretrained`` / ``from_pretrained`` / ``push_to_hub`` for any module with a config.

A small contract, as in huggingface_hub's ``ModelHubMixin``: the class has a ``config``
attribute, a ``config_class`` with ``to_dict``/``from_dict``, and is built by
``cls(config)``. The architecture name written to ``config.json`` is the class name, and the
tensors an export must hold are those of ``cls(config)`` built on the meta device.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import torch

from ..dtypes import parse_dtype
from ..errors import FrozenModuleWarning, InputError, warn_at_caller
from ..execution import inspecting_values
from .format import read_header, read_weights, write_export, writing_export
from .hub import push_export, resolve_export

T = TypeVar("T", bound="ExportMixin")


class ExportMixin:
    """Adds the export methods to an ``nn.Module`` subclass with ``config`` / ``config_class``,
    and freezing: a frozen model (as ``from_pretrained`` returns it) stays in eval mode, without
    gradients, even under its own or a parent's ``.train()`` or ``.requires_grad_(True)``, until
    :meth:`unfreeze`. A subclass calls :meth:`keep_frozen` at the start of its forward."""

    config_class: ClassVar[type]
    config: Any
    _frozen: bool = False
    _warned_frozen: bool = False
    _warned_requires_grad: bool = False

    def extra_repr(self) -> str:
        """``print(model)`` says whether it is frozen."""
        return f"frozen={self._frozen}"

    @property
    def is_frozen(self) -> bool:
        """Whether ``.train()`` is ignored (see :meth:`freeze`)."""
        return self._frozen

    def freeze(self: T) -> T:
        """Eval mode and ``requires_grad=False``; later ``.train()`` calls keep eval mode (and
        warn once) until :meth:`unfreeze`. Returns ``self``."""
        self._frozen = True
        super().train(False)  # type: ignore[misc]
        self.requires_grad_(False)  # type: ignore[attr-defined]
        return self

    def unfreeze(self: T) -> T:
        """Undo :meth:`freeze`: gradients on, and ``.train()`` works again (the mode is left as it
        is: call ``.train()`` to turn dropout on). Returns ``self``."""
        self._frozen = False
        self.requires_grad_(True)  # type: ignore[attr-defined]
        return self

    def train(self: T, mode: bool = True) -> T:
        """``nn.Module.train``, except that a frozen model stays in eval mode (warning once)."""
        if mode and self._frozen:
            if not self._warned_frozen:
                self._warned_frozen = True
                warn_at_caller(
                    FrozenModuleWarning(
                        f"{type(self).__name__} is frozen (loaded with from_pretrained): .train() keeps it in eval "
                        "mode, dropout off and gradients off. To fine-tune it, call .unfreeze() first, or load it "
                        "with from_pretrained(..., trainable=True)"
                    )
                )
            mode = False
            self.keep_frozen()
        return super().train(mode)  # type: ignore[misc]

    def requires_grad_(self: T, requires_grad: bool = True) -> T:
        """``nn.Module.requires_grad_``, except that a frozen model keeps its weights without
        gradients (warning once): call :meth:`unfreeze` to train them."""
        if requires_grad and self._frozen:
            self._warn_requires_grad()
            return self
        return super().requires_grad_(requires_grad)  # type: ignore[misc]

    def keep_frozen(self) -> None:
        """While frozen, turn gradients back off on any parameter that a parent's
        ``requires_grad_(True)`` (or a direct assignment) turned on, warning once. Runs in
        :meth:`train` and the forward pass (plain eager mode; not while ``torch.compile`` traces
        or inside ``torch.func`` transforms), so before any gradient reaches the weights."""
        if not inspecting_values() or not self._frozen:
            return  # (the flag read last: a compiled graph does not guard on it)
        thawed = [p for p in self.parameters() if p.requires_grad]  # type: ignore[attr-defined]
        if thawed:
            self._warn_requires_grad()
            for p in thawed:
                p.requires_grad_(False)

    def _warn_requires_grad(self) -> None:
        if not self._warned_requires_grad:
            self._warned_requires_grad = True
            warn_at_caller(
                FrozenModuleWarning(
                    f"{type(self).__name__} is frozen (loaded with from_pretrained): requires_grad_(True) on it or on "
                    "a module holding it leaves its weights without gradients, so optimizers leave them unchanged. "
                    "To fine-tune it, call .unfreeze() first, or load it with from_pretrained(..., trainable=True)"
                )
            )

    def save_pretrained(
        self,
        directory: str | os.PathLike,
        *,
        overwrite: bool = False,
        provenance: Mapping[str, Any] | None = None,
        license: str = "apache-2.0",
    ) -> Path:
        """Write the export to ``directory`` atomically: into a temporary sibling first, then
        renamed into place. ``directory`` must be new or empty, or an export replaced only with
        ``overwrite=True``; a directory holding anything else is never replaced. A concurrent
        writer to the same directory fails (FileExistsError). ``provenance`` (source, sha256,
        date, ...) goes into the model card."""
        with writing_export(directory, overwrite=overwrite) as tmp:
            write_export(self, tmp, provenance=provenance, license=license)
        return Path(directory)

    @classmethod
    def from_pretrained(
        cls: type[T],
        path_or_repo_id: str | os.PathLike,
        *,
        revision: str | None = None,
        cache_dir: str | os.PathLike | None = None,
        local_files_only: bool = False,
        token: str | bool | None = None,
        device: str | torch.device | None = None,
        dtype: torch.dtype | str | None = None,
        expected: Mapping[str, Any] | None = None,
        config_overrides: Mapping[str, Any] | None = None,
        trainable: bool = False,
        torch_dtype: torch.dtype | str | None = None,
    ) -> T:
        """Load a frozen model (eval mode, no gradients, see :meth:`freeze`) from a local export
        directory or a Hub repository id (resolved with huggingface_hub, offline from its cache
        when ``HF_HUB_OFFLINE=1`` or ``local_files_only=True``). ``trainable=True`` loads it
        unfrozen instead (eval mode, gradients on: call ``.train()`` to fine-tune).

        ``device``: where to load the weights (``"cpu"``, ``"cuda:0"``, ...; checked to exist).
        ``dtype`` (alias ``torch_dtype``, as in transformers): a floating ``torch.dtype`` or its
        name (``"bfloat16"``, ``"bf16"``, ...: :mod:`ipa_export.dtypes`) to cast the weights to;
        ``"auto"`` or None keeps the stored dtype. ``expected`` lists config values the caller was built for, e.g.
        ``{"c_s": 384}``; ``config_overrides`` replaces stored config values that do not change
        the weights. The export's directory is kept as ``model.export_directory``.
        """
        dtype = _load_dtype(dtype, torch_dtype)
        device = _load_device(device)
        directory = resolve_export(
            path_or_repo_id, revision=revision, cache_dir=cache_dir, local_files_only=local_files_only, token=token
        )
        header = read_header(directory, cls, expected=expected)
        config = header.config.replace(**config_overrides) if config_overrides else header.config
        with torch.device("meta"):
            model = cls(config)  # type: ignore[call-arg]
        model.load_state_dict(read_weights(header, device or "cpu"), strict=True, assign=True)  # type: ignore[attr-defined]
        if dtype is not None:
            model.to(dtype)  # type: ignore[attr-defined]
        if trainable:
            model.eval().requires_grad_(True)  # type: ignore[attr-defined]
        else:
            model.freeze()
        model.export_directory = directory
        return model

    @property
    def device(self) -> torch.device:
        """The device of the parameters."""
        return next(self.parameters()).device  # type: ignore[attr-defined]

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the floating-point parameters."""
        return next(p for p in self.parameters() if p.is_floating_point()).dtype  # type: ignore[attr-defined]

    def num_parameters(self, only_trainable: bool = False, exclude_embeddings: bool = False) -> int:
        """Number of parameters: only those with ``requires_grad`` (0 while frozen) with
        ``only_trainable``; without ``nn.Embedding`` tables with ``exclude_embeddings``."""
        skip = set()
        if exclude_embeddings:
            skip = {id(p) for m in self.modules() if isinstance(m, torch.nn.Embedding) for p in m.parameters()}  # type: ignore[attr-defined]
        return sum(
            p.numel()
            for p in self.parameters()  # type: ignore[attr-defined]
            if id(p) not in skip and (p.requires_grad or not only_trainable)
        )

    def push_to_hub(self, repo_id: str, **kwargs: Any) -> str:
        """Save to a temporary directory and upload it; see :func:`~ipa_export.export.hub.push_export`."""
        with tempfile.TemporaryDirectory() as tmp:
            self.save_pretrained(Path(tmp) / "export")
            return push_export(Path(tmp) / "export", repo_id, type(self), **kwargs)


def _load_dtype(dtype: torch.dtype | str | None, torch_dtype: torch.dtype | str | None) -> torch.dtype | None:
    """``from_pretrained``'s ``dtype`` / ``torch_dtype`` as a floating torch.dtype (None: keep the stored one)."""
    if torch_dtype is not None and dtype is not None and _as_dtype(dtype) != _as_dtype(torch_dtype):
        raise InputError(
            f"torch_dtype: an alias of dtype; got dtype={dtype!r} and torch_dtype={torch_dtype!r}, which "
            "disagree: pass only dtype"
        )
    return _as_dtype(dtype if dtype is not None else torch_dtype)


def _as_dtype(value: torch.dtype | str | None) -> torch.dtype | None:
    if value is None or value == "auto":
        return None
    return parse_dtype(value, also=", or 'auto' for the stored dtype")


def _load_device(device: str | torch.device | None) -> torch.device:
    """``from_pretrained``'s ``device``, checked to exist here (default: cpu)."""
    try:
        parsed = torch.device(device if device is not None else "cpu")
    except (RuntimeError, TypeError) as error:
        raise InputError(
            f"device: expected a torch.device or a string like 'cpu' or 'cuda:0', got {device!r}"
        ) from error
    if parsed.type == "meta":
        raise InputError("device: 'meta' holds no weights; load on 'cpu' or a GPU (build cls(config) on meta instead)")
    if parsed.type == "cpu":
        return parsed
    backend = getattr(torch, parsed.type, None)
    if backend is None or not hasattr(backend, "is_available") or not backend.is_available():
        why = "this torch build has no CUDA" if parsed.type == "cuda" and torch.version.cuda is None else "no device"
        raise InputError(
            f"device: {str(device)!r} is not available here (torch.{parsed.type}.is_available() is False: {why}); "
            "pass device='cpu', or run on a machine (and torch build) with that device"
        )
    count = backend.device_count() if hasattr(backend, "device_count") else 1
    if parsed.index is not None and parsed.index >= count:
        raise InputError(
            f"device: {str(device)!r} does not exist here: {count} {parsed.type} device(s), index 0..{count - 1}"
        )
    return parsed
