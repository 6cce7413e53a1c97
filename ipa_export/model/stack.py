"""The FlashIPA stack: ``depth`` x [IPA, frame update, feed-forward] and a final LayerNorm.

Parameter names follow BINDRAE's ``FlashIPAModule`` (``ipa_blocks.{i}.ipa``,
``.backbone_update.net``, ``.ffn.net``, ``final_norm``), so its state dicts load as they are.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..config import EncoderConfig
from ..execution import transforms_active
from . import frames
from .frames import Frames
from .ipa import InvariantPointAttention


def scale_update(update: torch.Tensor, limit: float, mode: str) -> torch.Tensor:
    """Scale [..., 3] vectors by their norm relative to ``limit``.

    ``"clip"``: ``x * min(limit / |x|, 1)``, a true clip to norm ``limit``.
    ``"reference"``: ``x * min(|x| / limit, 1)``, what BINDRAE computes and its weights were
    trained with: it shrinks updates shorter than ``limit`` and leaves longer ones unchanged.
    """
    norm = torch.linalg.vector_norm(update, dim=-1, keepdim=True)
    if mode == "reference":
        return update * torch.clamp(norm / limit, max=1.0)
    return update * torch.clamp(limit / norm.clamp(min=1e-12), max=1.0)


class BackboneUpdate(nn.Module):
    """s [B, N, c_s] -> axis-angle (radians) and translation (Angstrom) updates, each [B, N, 3]."""

    def __init__(self, config: EncoderConfig):
        super().__init__()
        self.net = nn.Sequential(
            nn.LayerNorm(config.c_s), nn.Linear(config.c_s, config.c_hidden), nn.GELU(), nn.Linear(config.c_hidden, 6)
        )
        self.max_rotation = math.radians(config.max_rot_update_deg)
        self.max_translation = config.max_trans_update
        self.clip = config.frame_update_clip

    def forward(self, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        axis_angle, translation = self.net(s).to(frames.geometry_dtype(s.dtype)).split(3, dim=-1)
        return (
            scale_update(axis_angle, self.max_rotation, self.clip),
            scale_update(translation, self.max_translation, self.clip),
        )


class FeedForward(nn.Module):
    """LayerNorm -> Linear(c_s, 4 c_s) -> GELU -> Dropout -> Linear(4 c_s, c_s)."""

    def __init__(self, config: EncoderConfig):
        super().__init__()
        self.net = nn.Sequential(
            nn.LayerNorm(config.c_s),
            nn.Linear(config.c_s, 4 * config.c_s),
            nn.GELU(),
            nn.Dropout(config.dropout),
            nn.Linear(4 * config.c_s, config.c_s),
        )

    def forward(self, s: torch.Tensor) -> torch.Tensor:
        return self.net(s)


class IPABlock(nn.Module):
    """s += IPA(s); frames <- frames ∘ update(s); s += FFN(s). Padded residues keep their frames."""

    def __init__(self, config: EncoderConfig):
        super().__init__()
        self.ipa = InvariantPointAttention(config)
        self.backbone_update = BackboneUpdate(config)
        self.ffn = FeedForward(config)
        self.dropout = nn.Dropout(config.dropout)

    def forward(
        self, s: torch.Tensor, rigid: Frames, z_f1: torch.Tensor, z_f2: torch.Tensor, mask: torch.Tensor, backend: str
    ) -> tuple[torch.Tensor, Frames]:
        s = s + self.dropout(self.ipa(s, *rigid, z_f1, z_f2, mask, backend))
        axis_angle, translation = self.backbone_update(s)
        valid = mask[..., None]
        update = Frames(
            frames.axis_angle_to_matrix(torch.where(valid, axis_angle, 0.0)), torch.where(valid, translation, 0.0)
        )
        rigid = frames.compose(rigid, update)
        s = s + self.dropout(self.ffn(s))
        return s, rigid


def ignore_padding(
    mask: torch.Tensor, s: torch.Tensor, rigid: Frames, z_f1: torch.Tensor, z_f2: torch.Tensor
) -> tuple[torch.Tensor, Frames, torch.Tensor, torch.Tensor]:
    """Zero features and identity frames (fp32, fp64 for an fp64 model) at padded positions,
    whatever they held (even NaN)."""
    valid = mask[..., None]
    geometry = frames.geometry_dtype(s.dtype)
    eye = torch.eye(3, device=s.device, dtype=geometry)
    rigid = Frames(
        torch.where(valid[..., None], rigid[0].to(geometry), eye), torch.where(valid, rigid[1].to(geometry), 0.0)
    )
    z_f1, z_f2 = (torch.where(valid[..., None], z, 0.0) for z in (z_f1, z_f2))
    return torch.where(valid, s, 0.0), rigid, z_f1, z_f2


class FlashIPAStack(nn.Module):
    """``depth`` IPA blocks sharing the same edge factors, then a final LayerNorm.

    With ``gradient_checkpointing = True`` each block's activations are recomputed in the
    backward pass instead of stored (only while gradients are recorded, and not inside
    ``torch.func`` transforms or forward-mode AD, which do not support the saved-tensor hooks
    that recomputation uses: there the blocks store their activations, with the same results)."""

    def __init__(self, config: EncoderConfig):
        super().__init__()
        self.ipa_blocks = nn.ModuleList(IPABlock(config) for _ in range(config.depth))
        self.final_norm = nn.LayerNorm(config.c_s)
        self.gradient_checkpointing = False

    def forward(
        self,
        s: torch.Tensor,
        rigid: Frames,
        z_f1: torch.Tensor,
        z_f2: torch.Tensor,
        mask: torch.Tensor,
        backend: str,
        hidden_states: list[tuple[torch.Tensor, Frames]] | None = None,
    ) -> tuple[torch.Tensor, Frames]:
        """s [B, N, c_s]; rigid (rotations [B, N, 3, 3], translations [B, N, 3]);
        z_f1, z_f2 [B, N, R, c_z]; mask [B, N] bool -> (s [B, N, c_s], frames).

        Inputs at padded positions are ignored (replaced by zeros and identity frames), so
        padded output frames are the identity rotation and zero translation. A list passed
        as ``hidden_states`` receives each block's ``(s, frames)`` (s before the final norm)."""
        s, rigid, z_f1, z_f2 = ignore_padding(mask, s, rigid, z_f1, z_f2)
        recompute = self.gradient_checkpointing and torch.is_grad_enabled() and not transforms_active()
        for block in self.ipa_blocks:
            if recompute:
                s, rigid = checkpoint(block, s, rigid, z_f1, z_f2, mask, backend, use_reentrant=False)
            else:
                s, rigid = block(s, rigid, z_f1, z_f2, mask, backend)
            if hidden_states is not None:
                hidden_states.append((s, rigid))
        return self.final_norm(s), rigid
