"""The encoder's configuration: one flat, JSON-serialisable dataclass with validation."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Literal

from .dtypes import dtype_names
from .errors import ConfigCompatibilityError, InputError

ATTENTION_BACKENDS = ("auto", "sdpa", "flash_attn", "dense")
#: attention dtypes, by the short name the config stores (any name of :mod:`ipa_export.dtypes` is accepted)
ATTN_DTYPES = ("fp32", "bf16", "fp16")
_ATTN_DTYPE_NAMES = ("float32", "bfloat16", "float16")
EDGE_MODES = ("flash_1d_bias", "flash_no_bias", "flash_2d_factorize_bias")
FRAME_UPDATE_CLIPS = ("reference", "clip")
#: fields added after format_version 2 was released: a config without them gets their defaults
ADDED_FIELDS = ("max_len", "distance_features", "num_rbf", "knn_tie_tolerance")
DISTANCE_FEATURES = ("one_hot", "rbf")
#: Documented maxima of the config's sizes and limits, so that a hostile config is rejected
#: before anything is built; raise them explicitly with :func:`raised_limits`.
MAXIMA: Mapping[str, float] = MappingProxyType(
    {
        "c_s": 8192,
        "c_p": 2048,
        "z_factor_rank": 64,
        "feat_dim": 1024,
        "knn_k": 256,
        "knn_tie_tolerance": 1.0,
        "num_bins": 1024,
        "num_rbf": 1024,
        "max_len": 16384,
        "c_hidden": 1024,
        "no_heads": 64,
        "no_qk_points": 64,
        "no_v_points": 64,
        "depth": 64,
        "num_residue_types": 4096,
        "max_rot_update_deg": 180.0,
        "max_trans_update": 1000.0,
    }
)
_RAISED: ContextVar[Mapping[str, float]] = ContextVar("ipa_export_raised_limits", default=MappingProxyType({}))


@contextmanager
def raised_limits(**maxima: float) -> Iterator[None]:
    """Raise :data:`MAXIMA` for the configs built inside the ``with`` block (this thread or
    task only), e.g. ``with raised_limits(depth=128): IPAEncoder.from_pretrained(path)``."""
    unknown = sorted(set(maxima) - set(MAXIMA))
    if unknown:
        raise InputError(f"raised_limits: no maximum for {unknown}; the fields with one are {sorted(MAXIMA)}")
    token = _RAISED.set(MappingProxyType({**_RAISED.get(), **maxima}))
    try:
        yield
    finally:
        _RAISED.reset(token)


def maximum(name: str) -> float:
    """The maximum of config field ``name`` in force (:data:`MAXIMA` or a raised one)."""
    return _RAISED.get().get(name, MAXIMA[name])


@dataclass(frozen=True)
class EncoderConfig:
    """Hyper-parameters of an :class:`~ipa_export.IPAEncoder` (EdgeEmbedder + FlashIPA stack).

    Defaults are the BINDRAE Stage-1 configuration of the usage document.
    """

    # Edge embedder (FlashIPA EdgeEmbedder, 1d mode)
    c_s: int = 384  #: width of the node (single) representation
    c_p: int = 128  #: width of each edge factor; the IPA's c_z
    z_factor_rank: int = 2  #: rank R of the factorised pair bias (0 with mode "flash_no_bias")
    #: flash_ipa's edge mode: kNN factors ("flash_1d_bias"), no pair bias ("flash_no_bias"), or
    #: dense [N, N] pair features factorised to rank R ("flash_2d_factorize_bias", needs max_len)
    mode: Literal["flash_1d_bias", "flash_no_bias", "flash_2d_factorize_bias"] = "flash_1d_bias"
    feat_dim: int = 64  #: width of the sin/cos index embeddings
    knn_k: int = 10  #: neighbours per residue in the distogram features
    #: neighbour distances closer than this (Angstrom) count as tied and go by residue index;
    #: 0 (the reference): only exactly equal distances. > 0 (e.g. 1e-4) for idealised geometry
    #: whose distances are equal in exact arithmetic, so that they stay rotation-invariant
    knn_tie_tolerance: float = 0.0
    num_bins: int = 22  #: distogram bins between 1e-3 and 20 Angstrom
    max_len: int = 0  #: longest protein of mode "flash_2d_factorize_bias" (its factoriser's width); else 0
    #: neighbour distances as one-hot bins (the reference; BINDRAE and flash_ipa weights) or as
    #: num_rbf Gaussian radial basis functions over the same range ("rbf": smooth, differentiable
    #: in the coordinates; mode "flash_1d_bias" only; not weight-compatible with "one_hot")
    distance_features: Literal["one_hot", "rbf"] = "one_hot"
    num_rbf: int = 16  #: Gaussians with distance_features "rbf" (unused with "one_hot")
    # FlashIPA stack
    c_hidden: int = 128  #: per-head scalar width; hidden width of the frame-update head
    no_heads: int = 8
    no_qk_points: int = 8
    no_v_points: int = 12
    depth: int = 3  #: number of IPA blocks
    dropout: float = 0.1  #: training only
    max_rot_update_deg: float = 15.0
    max_trans_update: float = 1.5  #: Angstrom
    frame_update_clip: Literal["reference", "clip"] = "reference"
    # Inference
    attention: Literal["auto", "sdpa", "flash_attn", "dense"] = "auto"
    #: attention precision: "fp32", "bf16" or "fp16" (given as any name of :mod:`ipa_export.dtypes`
    #: or a torch.dtype, stored as this short name)
    attn_dtype: Literal["fp32", "bf16", "fp16"] = "fp32"
    # Optional residue-type embedding table (0 = none), for embedding bare structures
    num_residue_types: int = 0

    def __post_init__(self) -> None:
        problems = _type_problems(dataclasses.asdict(self)) or self._range_problems()
        if not problems:
            object.__setattr__(self, "attn_dtype", attn_dtype_name(self.attn_dtype))
        if problems:
            raise ConfigCompatibilityError(problems)

    def _range_problems(self) -> list[str]:
        p: list[str] = []
        for name in ("c_s", "c_p", "feat_dim", "knn_k", "c_hidden", "no_heads", "no_qk_points", "no_v_points", "depth"):
            if getattr(self, name) <= 0:
                p.append(f"{name}: must be positive, got {getattr(self, name)}")
        if self.num_bins < 2:
            p.append(f"num_bins: must be >= 2, got {self.num_bins}")
        if self.c_p % 4:
            p.append(f"c_p: must be divisible by 4 (the IPA projects it to c_p // 4), got {self.c_p}")
        if self.feat_dim % 2:
            p.append(f"feat_dim: must be even (sin and cos halves), got {self.feat_dim}")
        if self.z_factor_rank < 0:
            p.append(f"z_factor_rank: must be >= 0, got {self.z_factor_rank}")
        elif (self.mode == "flash_no_bias") != (self.z_factor_rank == 0):
            p.append(
                f"z_factor_rank: mode {self.mode!r} needs "
                + ("z_factor_rank 0" if self.mode == "flash_no_bias" else "z_factor_rank >= 1")
                + f", got {self.z_factor_rank}"
            )
        if (self.mode == "flash_2d_factorize_bias") != (self.max_len > 0) or self.max_len < 0:
            p.append(
                f"max_len: mode {self.mode!r} needs "
                + ("max_len >= 1" if self.mode == "flash_2d_factorize_bias" else "max_len 0")
                + f", got {self.max_len}"
            )
        if self.num_rbf < 2:
            p.append(f"num_rbf: must be >= 2, got {self.num_rbf}")
        if self.distance_features == "rbf" and self.mode != "flash_1d_bias":
            p.append(f"distance_features: 'rbf' needs mode 'flash_1d_bias', got mode {self.mode!r}")
        if not 0.0 <= self.dropout < 1.0:
            p.append(f"dropout: must be in [0, 1), got {self.dropout}")
        if self.knn_tie_tolerance < 0:
            p.append(f"knn_tie_tolerance: must be >= 0 Angstrom, got {self.knn_tie_tolerance}")
        for name in ("max_rot_update_deg", "max_trans_update"):
            if getattr(self, name) <= 0:
                p.append(f"{name}: must be positive, got {getattr(self, name)}")
        if self.num_residue_types < 0:
            p.append(f"num_residue_types: must be >= 0, got {self.num_residue_types}")
        for name in MAXIMA:
            if getattr(self, name) > maximum(name):
                p.append(
                    f"{name}: must be <= {maximum(name):g} (the documented maximum; raise it with "
                    f"ipa_export.config.raised_limits({name}=...)), got {getattr(self, name)}"
                )
        return p

    @property
    def num_distance_features(self) -> int:
        """Width of one distance's features: ``num_bins`` (one-hot) or ``num_rbf`` (RBF)."""
        return self.num_rbf if self.distance_features == "rbf" else self.num_bins

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, require_all: bool = True) -> EncoderConfig:
        """Build from a mapping, reporting unknown, missing and mistyped fields together."""
        problems = [f"{k}: unknown field" for k in data if k not in _FIELDS]
        if require_all:
            problems += [f"{k}: missing field" for k in _FIELDS if k not in data and k not in ADDED_FIELDS]
        problems += _type_problems({k: v for k, v in data.items() if k in _FIELDS})
        if problems:
            raise ConfigCompatibilityError(problems)
        return cls(**{k: float(v) if isinstance(_FIELDS[k].default, float) else v for k, v in data.items()})

    def replace(self, **changes: Any) -> EncoderConfig:
        return dataclasses.replace(self, **changes)


_FIELDS = {f.name: f for f in dataclasses.fields(EncoderConfig)}
_CHOICES = {
    "mode": EDGE_MODES,
    "frame_update_clip": FRAME_UPDATE_CLIPS,
    "attention": ATTENTION_BACKENDS,
    "distance_features": DISTANCE_FEATURES,
}


def attn_dtype_name(value: object) -> str:
    """``value`` (a name of float32, bfloat16 or float16 in :mod:`ipa_export.dtypes`, or the
    torch.dtype) as the short name ``attn_dtype`` stores: ``"bfloat16"`` -> ``"bf16"``."""
    return dtype_names(value, argument="attn_dtype", allowed=_ATTN_DTYPE_NAMES).short


def _type_problems(values: Mapping[str, Any]) -> list[str]:
    problems = []
    for name, value in values.items():
        default = _FIELDS[name].default
        if name == "attn_dtype":
            try:
                attn_dtype_name(value)
            except InputError as error:
                problems.append(str(error))
        elif name in _CHOICES:
            if value not in _CHOICES[name]:
                problems.append(f"{name}: must be one of {list(_CHOICES[name])}, got {value!r}")
        elif isinstance(default, int):
            if isinstance(value, bool) or not isinstance(value, int):
                problems.append(f"{name}: must be an integer, got {type(value).__name__} {value!r}")
        elif isinstance(default, float):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                problems.append(f"{name}: must be a number, got {type(value).__name__} {value!r}")
            elif not (abs(value) < 1e300 and math.isfinite(value)):  # a huge int overflows float()
                problems.append(f"{name}: must be a finite number, got {value!r}")
    return problems
