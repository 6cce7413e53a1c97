"""Attention with an explicit pair representation: the original IPA path of flash_ipa's
``orig_*`` modes (AlphaFold2 Suppl. Algorithm 22 with a dense ``z`` [B, N, N, c_z]).

The logit of head h between residues i and j is the augmented product of the factorised
path plus ``sqrt(1/3) linear_b(z_ij)_h``, and the pair output is
``o_pair_ih = sum_j a_hij down_z(z_ij)``. Needs the [B, H, N, N] attention weights, so it is
dense (O(H N^2) memory) whatever the configured backend.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def attend_with_pair(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_mask: torch.Tensor,
    pair: torch.Tensor,
    linear_b: nn.Linear,
    down_z: nn.Linear,
) -> tuple[torch.Tensor, torch.Tensor]:
    """q, k [B, H, N, E]; v [B, H, N, E_v]; key_mask [B, N] bool; pair [B, N, N, c_z]
    -> (attention output [B, H, N, E_v], o_pair [B, N, H, c_z // 4]), in fp32 (fp64 for fp64 q)."""
    wide = torch.promote_types(q.dtype, torch.float32)
    bias = math.sqrt(1.0 / 3) * linear_b(pair).permute(0, 3, 1, 2)  # [B, H, N, N]
    logits = (q.to(wide) @ k.to(wide).transpose(-1, -2) + bias.to(wide)).masked_fill(
        ~key_mask[:, None, None, :], float("-inf")
    )
    weights = torch.softmax(logits, dim=-1)
    return weights @ v.to(wide), torch.einsum("bhij,bijd->bihd", weights, down_z(pair).to(wide))
