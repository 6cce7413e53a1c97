"""Floating dtype names: one table, and one parser that every entry point uses.

Each dtype has a canonical name (``"float32"``, as torch and ``config.json`` write it), a short
name (``"fp32"``, as ``EncoderConfig.attn_dtype`` stores it) and aliases; a ``torch.dtype`` and
``"torch.float32"`` are accepted too. Names are read without importing torch.
"""

from __future__ import annotations

import sys
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import TYPE_CHECKING

from .errors import InputError

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class DtypeNames:
    """The names of one floating dtype."""

    name: str  #: canonical, the torch attribute ("float32")
    short: str  #: "fp32"
    aliases: tuple[str, ...]  #: further accepted names ("f32", "float", ...)
    safetensors: str  #: the safetensors header's dtype code ("F32")


FLOAT_DTYPES: tuple[DtypeNames, ...] = (
    DtypeNames("float32", "fp32", ("f32", "float"), "F32"),
    DtypeNames("bfloat16", "bf16", (), "BF16"),
    DtypeNames("float16", "fp16", ("f16", "half"), "F16"),
    DtypeNames("float64", "fp64", ("f64", "double"), "F64"),
)
#: every accepted name (lower case) -> its entry
DTYPE_NAMES: Mapping[str, DtypeNames] = MappingProxyType(
    {alias: entry for entry in FLOAT_DTYPES for alias in (entry.name, entry.short, *entry.aliases)}
)


def dtype_names(
    value: object, *, argument: str = "dtype", allowed: Collection[str] | None = None, also: str = ""
) -> DtypeNames:
    """The table entry of ``value``: a ``torch.dtype`` or any name of :data:`DTYPE_NAMES` (also
    ``"torch.float32"``; case-insensitive), one of ``allowed`` (canonical names; default every
    dtype of the table). The error names ``argument``, lists the accepted names and ends the
    list with ``also`` (e.g. ``", or 'auto' for the stored dtype"``)."""
    torch = sys.modules.get("torch")  # a torch.dtype means torch is imported already
    if torch is not None and isinstance(value, torch.dtype):
        key: str | None = str(value).removeprefix("torch.")
    else:
        key = value.strip().lower().removeprefix("torch.") if isinstance(value, str) else None
    entry = DTYPE_NAMES.get(key) if key is not None else None
    if entry is not None and (allowed is None or entry.name in allowed):
        return entry
    choices = [e for e in FLOAT_DTYPES if allowed is None or e.name in allowed]
    names = ", ".join(" / ".join(repr(n) for n in (e.name, e.short, *e.aliases)) for e in choices)
    raise InputError(f"{argument}: expected a floating torch.dtype or its name ({names}{also}), got {value!r}")


def parse_dtype(
    value: torch.dtype | str, *, argument: str = "dtype", allowed: Collection[str] | None = None, also: str = ""
) -> torch.dtype:
    """``value`` as a ``torch.dtype``: see :func:`dtype_names`, e.g. ``parse_dtype("bf16")`` is
    ``torch.bfloat16``."""
    import torch

    return getattr(torch, dtype_names(value, argument=argument, allowed=allowed, also=also).name)
