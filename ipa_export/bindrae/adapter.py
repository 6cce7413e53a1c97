"""The BINDRAE adapter API of the usage document, as drop-in replacements.

``create_edge_embedder`` and ``create_flashipa_module`` take the same arguments and
defaults as BINDRAE's, return modules whose state dicts have BINDRAE's keys (so Stage-1
checkpoints load with ``strict=True``), and give the same outputs (fp32 reference math).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..config import EncoderConfig
from ..errors import InputTypeError
from ..model.attention import backend_for
from ..model.edge_embedder import EdgeEmbedder
from ..model.frames import Frames
from ..model.stack import FlashIPAStack
from ..model.validation import Shapes, check_stack_inputs, check_structure_inputs
from .keys import STAGE1_EDGE, STAGE1_IPA, stage1_modules

MODULE_NAMES = {"s": "s", "rotations": "frames.rotations", "translations": "frames.translations", "mask": "mask"}


@dataclass
class ProjectEdgeConfig:
    """BINDRAE's edge-embedder config. ``num_rbf``, ``relpos_k``, ``use_rbf`` and
    ``self_condition`` are accepted for compatibility and have no effect (flash_ipa ignores
    them: the distogram always has 22 bins over k = 10 neighbours)."""

    c_s: int = 384
    c_p: int = 128
    z_factor_rank: int = 2
    num_rbf: int = 16
    mode: str = "flash_1d_bias"
    feat_dim: int = 64
    relpos_k: int = 64
    use_rbf: bool = True
    self_condition: bool = True

    def to_encoder_config(self) -> EncoderConfig:
        return EncoderConfig(
            c_s=self.c_s, c_p=self.c_p, z_factor_rank=self.z_factor_rank, mode=self.mode, feat_dim=self.feat_dim
        )


@dataclass
class FlashIPAModuleConfig:
    """BINDRAE's FlashIPA module config, plus ``frame_update_clip`` (BINDRAE's behaviour,
    ``"reference"``, by default), ``attention`` and ``attn_dtype``."""

    c_s: int = 384
    c_z: int = 128
    c_hidden: int = 128
    no_heads: int = 8
    depth: int = 3
    no_qk_points: int = 8
    no_v_points: int = 12
    z_factor_rank: int = 2
    dropout: float = 0.1
    max_rot_update_deg: float = 15.0
    max_trans_update: float = 1.5
    frame_update_clip: str = "reference"
    attention: str = "auto"
    attn_dtype: str = "fp32"

    def to_encoder_config(self) -> EncoderConfig:
        fields = {k: v for k, v in dataclasses.asdict(self).items() if k != "c_z"}
        mode = "flash_1d_bias" if self.z_factor_rank else "flash_no_bias"
        return EncoderConfig(c_p=self.c_z, mode=mode, **fields)


class EdgeEmbedderAdapter(nn.Module):
    """BINDRAE's ``EdgeEmbedderAdapter`` over this package's :class:`EdgeEmbedder`."""

    def __init__(self, config: ProjectEdgeConfig):
        super().__init__()
        self.config = config
        self.edge_embedder = EdgeEmbedder(config.to_encoder_config())  # BINDRAE's keys: edge_embedder.<flash_ipa>

    def forward(
        self,
        node_embed: torch.Tensor,
        translations: torch.Tensor,
        node_mask: torch.Tensor,
        trans_sc: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """node_embed [B, N, c_s], translations [B, N, 3] (Angstrom), node_mask [B, N] bool,
        trans_sc [B, N, 3] (default translations) -> ``{"z_f1", "z_f2"}`` [B, N, R, c_p] and
        ``"edge_mask"`` [B, N, N] bool."""
        check_structure_inputs(self.config.c_s, node_embed, translations, node_mask, trans_sc=trans_sc)
        z_f1, z_f2 = self.edge_embedder(node_embed, translations, node_mask, trans_sc)
        return {"z_f1": z_f1, "z_f2": z_f2, "edge_mask": node_mask[:, :, None] & node_mask[:, None, :]}


class FlashIPAModule(FlashIPAStack):
    """BINDRAE's ``FlashIPAModule``: ``forward(s, frames, z_f1, z_f2, mask) -> (s_geo, frames)``
    with frames a ``(rotations [B, N, 3, 3], translations [B, N, 3])`` pair in Angstrom."""

    def __init__(self, config: FlashIPAModuleConfig):
        self.config = config
        self.encoder_config = config.to_encoder_config()
        super().__init__(self.encoder_config)

    def forward(  # type: ignore[override]
        self,
        s: torch.Tensor,
        frames: tuple[torch.Tensor, torch.Tensor],
        z_f1: torch.Tensor,
        z_f2: torch.Tensor,
        mask: torch.Tensor,
    ) -> tuple[torch.Tensor, Frames]:
        config = self.config
        shapes = Shapes(c_s=config.c_s, R=config.z_factor_rank, c_z=config.c_z)
        if not isinstance(frames, tuple) or len(frames) != 2:
            raise InputTypeError(f"frames: expected a (rotations, translations) pair, got {type(frames).__name__}")
        check_stack_inputs(shapes, s, *frames, mask, names=MODULE_NAMES)
        shapes.check("z_f1", z_f1, ("B", "N", "R", "c_z"))
        shapes.check("z_f2", z_f2, ("B", "N", "R", "c_z"))
        s_geo, rigid = super().forward(s, Frames(*frames), z_f1, z_f2, mask, backend_for(self.encoder_config, s.device))
        return torch.where(mask[..., None], s_geo, 0.0), rigid


def create_edge_embedder(
    c_s: int = 384, c_p: int = 128, z_rank: int = 2, num_rbf: int = 16, mode: str = "flash_1d_bias", **kwargs: Any
) -> EdgeEmbedderAdapter:
    """BINDRAE's factory: ``create_edge_embedder(c_s=384, c_p=128, z_rank=2, num_rbf=16)``."""
    config = ProjectEdgeConfig(c_s=c_s, c_p=c_p, z_factor_rank=z_rank, num_rbf=num_rbf, mode=mode, **kwargs)
    return EdgeEmbedderAdapter(config)


def create_flashipa_module(c_s: int = 384, c_z: int = 128, depth: int = 3, **kwargs: Any) -> FlashIPAModule:
    """BINDRAE's factory: ``create_flashipa_module(c_s=384, c_z=128, depth=3)``."""
    return FlashIPAModule(FlashIPAModuleConfig(c_s=c_s, c_z=c_z, depth=depth, **kwargs))


def load_stage1_state_dict(
    state_dict: Mapping[str, torch.Tensor], edge: EdgeEmbedderAdapter, module: FlashIPAModule
) -> None:
    """Load the ``edge_embedder.`` and ``ipa_module.`` parts of a BINDRAE Stage-1
    ``model_state_dict`` into the two adapter modules, strictly."""
    parts = stage1_modules(state_dict)
    edge.load_state_dict(parts[STAGE1_EDGE], strict=True)
    module.load_state_dict(parts[STAGE1_IPA], strict=True)
