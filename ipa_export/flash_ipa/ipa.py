"""flash_ipa's ``IPAConfig`` and ``InvariantPointAttention`` (``flash_ipa.ipa``), on this
package's IPA.

``use_flash_attn=True`` is flash_ipa's flash path: the factorised pair bias of ``z_factor_1``,
``z_factor_2`` (``z`` is ignored), on the ``auto`` attention backend in ``attn_dtype``.
``use_flash_attn=False`` is its original path: the explicit pair representation ``z`` (or, if
``z`` is None, the factors), on the ``dense`` backend in fp32. As in flash_ipa, the explicit
bias is scaled by sqrt(1/3) and the factorised one is not: trained weights depend on it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..config import EncoderConfig, attn_dtype_name
from ..errors import InputError, InputTypeError
from ..model import ipa as ours
from ..model.attention import backend_for
from ..model.validation import Shapes, check_stack_inputs
from .edge_embedder import as_mask

TRUNCATED_NORMAL_STD = 0.87962566103423978  # std of a unit normal truncated to [-2, 2]
IPA_NAMES = {"s": "s", "rotations": "r rotations", "translations": "r translations", "mask": "mask"}


@dataclass
class IPAConfig:
    """flash_ipa's IPA config: same fields and defaults. ``use_packed``, ``seq_tfmr_*`` and
    ``num_blocks`` have no effect on the IPA (the last three configure flash_ipa's model)."""

    use_flash_attn: bool = True
    #: attention precision of the flash path: "fp16", "bf16" or "fp32" (or another name of these
    #: dtypes in :mod:`ipa_export.dtypes`, or the torch.dtype)
    attn_dtype: str = "bf16"
    use_packed: bool = True
    c_s: int = 256
    c_z: int = 128  #: pair width; 0 for the no_bias modes
    c_hidden: int = 128
    no_heads: int = 8
    z_factor_rank: int = 2  #: rank of z_factor_1/2; 0 without factors
    no_qk_points: int = 8
    no_v_points: int = 12
    seq_tfmr_num_heads: int = 4
    seq_tfmr_num_layers: int = 2
    num_blocks: int = 6


def rigid_tensors(r: object) -> tuple[torch.Tensor, torch.Tensor]:
    """``(rotations [..., 3, 3], translations [..., 3])`` from a pair (e.g. :class:`~ipa_export.Frames`)
    or from any object with ``get_rots().get_rot_mats()`` and ``get_trans()`` (flash_ipa's and
    OpenFold's ``Rigid``)."""
    if isinstance(r, (tuple, list)) and len(r) == 2:
        return r[0], r[1]
    if callable(getattr(r, "get_rots", None)) and callable(getattr(r, "get_trans", None)):
        return r.get_rots().get_rot_mats(), r.get_trans()  # type: ignore[attr-defined]
    raise InputTypeError(
        "r: expected a (rotations, translations) pair or a Rigid with get_rots().get_rot_mats() and "
        f"get_trans(), got {type(r).__name__}"
    )


class InvariantPointAttention(ours.InvariantPointAttention):
    """flash_ipa's ``InvariantPointAttention``: ``forward(s, z, z_factor_1, z_factor_2, r, mask)``
    returns the update [B, N, c_s], zero at padded positions.

    Parameters carry flash_ipa's names (``linear_b`` and ``down_z`` only when ``c_z > 0``). The
    head size is not limited to 256 and every ``attn_dtype`` works on every device. ``inf`` is
    accepted and has no effect (masked keys get weight exactly 0); ``eps`` must be its default."""

    def __init__(self, ipa_conf: IPAConfig, inf: float = 1e5, eps: float = ours.POINT_NORM_EPS):
        attn_dtype = attn_dtype_name(ipa_conf.attn_dtype)
        if ipa_conf.c_z < 0 or ipa_conf.z_factor_rank < 0:
            raise InputError(f"c_z, z_factor_rank: must be >= 0, got {ipa_conf.c_z}, {ipa_conf.z_factor_rank}")
        if eps != ours.POINT_NORM_EPS:
            raise InputError(f"eps: only {ours.POINT_NORM_EPS} (flash_ipa's default) is supported, got {eps}")
        config = EncoderConfig(
            c_s=ipa_conf.c_s,
            c_hidden=ipa_conf.c_hidden,
            no_heads=ipa_conf.no_heads,
            no_qk_points=ipa_conf.no_qk_points,
            no_v_points=ipa_conf.no_v_points,
            attention="auto" if ipa_conf.use_flash_attn else "dense",
            attn_dtype=attn_dtype if ipa_conf.use_flash_attn else "fp32",
        )
        super().__init__(config, c_z=ipa_conf.c_z)
        self._init_as_flash_ipa()
        self._ipa_conf = ipa_conf
        self.use_flash_attn = ipa_conf.use_flash_attn
        self._encoder_config = config

    def _init_as_flash_ipa(self) -> None:
        """flash_ipa's (OpenFold's) initialisation: LeCun-normal weights (normal truncated at two
        standard deviations, scaled to variance 1 / fan_in) and zero biases; ``linear_out`` all
        zeros, so a new block's update starts at zero."""
        with torch.no_grad():
            for name, layer in self.named_children():
                if not isinstance(layer, nn.Linear):
                    continue
                layer.bias.zero_()
                if name == "linear_out":
                    layer.weight.zero_()
                else:
                    std = (1.0 / layer.in_features) ** 0.5 / TRUNCATED_NORMAL_STD
                    nn.init.trunc_normal_(layer.weight, std=std, a=-2 * std, b=2 * std)

    def forward(  # type: ignore[override]
        self,
        s: torch.Tensor,
        z: torch.Tensor | None,
        z_factor_1: torch.Tensor | None,
        z_factor_2: torch.Tensor | None,
        r: object,
        mask: torch.Tensor,
        _offload_inference: bool = False,
        _z_reference_list: Sequence[torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """s [B, N, c_s]; z [B, N, N, c_z] or None; z_factor_1, z_factor_2 [B, N, R, c_z] or None;
        r frames [B, N] (a pair or a Rigid); mask [B, N] (non-zero = valid) -> [B, N, c_s]."""
        if _offload_inference and _z_reference_list is not None:
            z = _z_reference_list[0]
        rotations, translations = rigid_tensors(r)
        mask = as_mask("mask", mask)
        shapes = Shapes(c_s=self._ipa_conf.c_s, c_z=self.c_z, R=self._ipa_conf.z_factor_rank)
        check_stack_inputs(shapes, s, rotations, translations, mask, names=IPA_NAMES)
        pair, z_f1, z_f2 = self._pair_inputs(s, shapes, z, z_factor_1, z_factor_2)
        backend = backend_for(self._encoder_config, s.device)
        out = super().forward(s, rotations, translations, z_f1, z_f2, mask, backend, pair=pair)
        return torch.where(mask[..., None], out, 0.0)

    def _pair_inputs(
        self,
        s: torch.Tensor,
        shapes: Shapes,
        z: torch.Tensor | None,
        z_f1: torch.Tensor | None,
        z_f2: torch.Tensor | None,
    ) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
        """The explicit pair (or None) and the factors the package IPA takes (rank 0 when unused)."""
        empty = s.new_zeros(s.shape[0], s.shape[1], 0, self.c_z)
        if self.c_z == 0:
            if z is not None or z_f1 is not None or z_f2 is not None:
                raise InputError("z, z_factor_1, z_factor_2: this IPA has no pair term (c_z = 0); pass None")
            return None, empty, empty
        use_z = z is not None and not self.use_flash_attn
        if not use_z:
            if z_f1 is None or z_f2 is None:
                wanted = "z_factor_1 and z_factor_2" + ("" if self.use_flash_attn else " (or z)")
                raise InputError(
                    f"{wanted}: required by an IPA with c_z = {self.c_z} and use_flash_attn={self.use_flash_attn}"
                )
            shapes.check("z_factor_1", z_f1, ("B", "N", "R", "c_z"))
            shapes.check("z_factor_2", z_f2, ("B", "N", "R", "c_z"))
            return None, z_f1, z_f2
        shapes.check("z", z, ("B", "N", "N", "c_z"))
        return z, empty, empty
