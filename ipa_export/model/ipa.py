"""Invariant Point Attention with a factorised pair bias, in FlashIPA's augmented form.

AlphaFold2 Suppl. Algorithm 22 with the pair bias of FlashIPA (Liu et al. 2025). The
logit of head h between residues i and j is

    q_i.k_j / sqrt(3 C)  -  w_h/2 sum_p |q^_ip - k^_jp|^2  +  sum_r b1[i,h,r] b2[j,h,r]

with w_h = softplus(head_weights_h) sqrt(1 / (3 P_qk 9/2)), q^ and k^ the query and key
points in global coordinates, b1 = linear_b(z_f1) and b2 = linear_b(z_f2). Expanding
-|q^ - k^|^2/2 = q^.k^ - |k^|^2/2 - |q^|^2/2 and dropping |q^|^2 (constant along the softmax
axis) folds the three terms into one dot product of augmented vectors:

    q_aug = [q / sqrt(3 C),  w_h q^,  1,                 b1]     # [C + 3 P_qk + 1 + R]
    k_aug = [k,              k^,      -w_h |k^|^2 / 2,   b2]
    v_aug = [v,  v^ (3 P_v),  down_z(z_f2) (R c_z/4)]

so attention needs no [N, N] tensor. Points are taken relative to each protein's centroid
(identical logits in exact arithmetic) to keep |k^|^2 small and the expansion precise.

Low-precision attention (``attn_dtype`` bf16 or fp16) goes through
:func:`.low_precision.anchored_attention`, which keeps the point terms near fp32 accuracy.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..config import EncoderConfig
from ..dtypes import parse_dtype
from . import frames
from .attention import attend, concat_padded, head_limited, head_sizes
from .low_precision import anchored_attention, compensated_product, point_terms
from .pair_attention import attend_with_pair

POINT_NORM_EPS = 1e-8


class InvariantPointAttention(nn.Module):
    """Parameter names and layouts follow flash_ipa's ``InvariantPointAttention``."""

    def __init__(self, config: EncoderConfig, c_z: int | None = None):
        """``c_z``: width of the pair input; default ``config.c_p``, or 0 (no ``linear_b`` and
        ``down_z``, as flash_ipa without a pair term) when ``config.z_factor_rank`` is 0."""
        super().__init__()
        c_z = (config.c_p if config.z_factor_rank else 0) if c_z is None else c_z
        c_s, hidden, heads = config.c_s, config.c_hidden, config.no_heads
        self.c_z = c_z
        self.c_hidden, self.heads = hidden, heads
        self.qk_points, self.v_points = config.no_qk_points, config.no_v_points
        self.attn_dtype = parse_dtype(config.attn_dtype)
        self.linear_q = nn.Linear(c_s, heads * hidden)
        self.linear_kv = nn.Linear(c_s, 2 * heads * hidden)
        self.linear_q_points = nn.Linear(c_s, heads * self.qk_points * 3)
        self.linear_kv_points = nn.Linear(c_s, heads * (self.qk_points + self.v_points) * 3)
        if c_z:
            self.linear_b = nn.Linear(c_z, heads)
            self.down_z = nn.Linear(c_z, c_z // 4)
        self.head_weights = nn.Parameter(torch.full((heads,), 0.541324854612918))  # softplus^-1(1)
        self.linear_out = nn.Linear(heads * (hidden + 4 * self.v_points + c_z // 4), c_s)

    def _points(
        self, linear: nn.Linear, s: torch.Tensor, rotations: torch.Tensor, translations: torch.Tensor
    ) -> torch.Tensor:
        """[B, N, c_s] -> [B, N, H, P, 3] points in global coordinates. The linear output
        is read as x, y, z blocks of H * P, as in the reference."""
        local = torch.stack(linear(s).to(rotations.dtype).chunk(3, dim=-1), dim=-1)  # [B, N, H*P, 3], geometry dtype
        return frames.apply(rotations[:, :, None], translations[:, :, None], local).unflatten(2, (self.heads, -1))

    def forward(
        self,
        s: torch.Tensor,
        rotations: torch.Tensor,
        translations: torch.Tensor,
        z_f1: torch.Tensor,
        z_f2: torch.Tensor,
        mask: torch.Tensor,
        backend: str,
        pair: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """s [B, N, c_s]; frames [B, N, 3, 3] and [B, N, 3]; z_f1, z_f2 [B, N, R, c_z];
        mask [B, N] bool; backend a resolved attention backend; pair [B, N, N, c_z] an optional
        explicit pair representation (attended densely, see :mod:`.pair_attention`).
        Returns the update [B, N, c_s]."""
        batch, length, _ = s.shape
        heads, hidden = self.heads, self.c_hidden
        geometry = frames.geometry_dtype(s.dtype)  # fp32 (fp64 for an fp64 model)
        rotations, translations = rotations.to(geometry), translations.to(geometry)
        translations = translations - frames.masked_mean(translations, mask)[:, None]  # centred

        q = self.linear_q(s).unflatten(-1, (heads, hidden))  # [B, N, H, C]
        k, v = self.linear_kv(s).unflatten(-1, (heads, 2 * hidden)).split(hidden, dim=-1)
        q_pts = self._points(self.linear_q_points, s, rotations, translations)  # [B, N, H, P_qk, 3]
        k_pts, v_pts = self._points(self.linear_kv_points, s, rotations, translations).split(
            [self.qk_points, self.v_points], dim=-2
        )
        if self.c_z:
            b1 = self.linear_b(z_f1).transpose(-1, -2)  # [B, N, H, R]
            b2 = self.linear_b(z_f2).transpose(-1, -2)
            pair_1, pair_2 = self.down_z(z_f1), self.down_z(z_f2)  # [B, N, R, c_z/4]
        else:  # no pair term: rank-0 factors
            b1 = b2 = s.new_zeros(batch, length, heads, 0)
            pair_1 = pair_2 = s.new_zeros(batch, length, 0, 0)

        weight = F.softplus(self.head_weights.to(geometry)) * math.sqrt(1.0 / (3 * self.qk_points * 9.0 / 2))  # [H]
        weight = weight[:, None]
        q = q / math.sqrt(3 * hidden)
        v_pair = pair_2.flatten(-2)[:, :, None].expand(-1, -1, heads, -1)  # [B, N, H, R c_z/4]
        if pair is None and self.attn_dtype.itemsize < 4:
            b1_terms, b2_terms = compensated_product(b1, b2, self.attn_dtype)  # the pair bias b1.b2 is large
            scalar, o_pts = anchored_attention(
                torch.cat([q, *b1_terms], dim=-1), torch.cat([k, *b2_terms], dim=-1), q_pts, k_pts, weight,
                torch.cat([v, v_pair], dim=-1), v_pts - translations[:, :, None, None], translations, mask,
                self.attn_dtype, backend,
            )  # fmt: skip
            o, o_pair = scalar.split([hidden, v_pair.shape[-1]], dim=-1)
            o_pts = frames.invert_rotate(rotations[:, :, None, None], o_pts)  # [B, N, H, P_v, 3], local frame
        else:  # fp32, or the dense pair path (computes in fp32)
            k_norms = -0.5 * weight * k_pts.square().sum((-1, -2))[..., None]  # [B, N, H, 1]
            q_terms, k_terms = point_terms(weight * q_pts.flatten(-2), k_pts.flatten(-2), k_norms, geometry)
            q_parts, k_parts = [q, *q_terms, b1], [k, *k_terms, b2]
            v_aug = torch.cat([v, v_pts.flatten(-2), v_pair], dim=-1).transpose(1, 2)
            if pair is None:  # q/k written at the kernel's head size: attend copies nothing to pad them
                qk_width = sum(part.shape[-1] for part in q_parts)
                head, _ = head_sizes(qk_width, v_aug.shape[-1], head_limited(backend, s.device))
                q_aug, k_aug = (concat_padded(parts, head).transpose(1, 2) for parts in (q_parts, k_parts))
                attn_dtype = geometry if self.attn_dtype == torch.float32 else self.attn_dtype
                out = attend(*(x.to(attn_dtype) for x in (q_aug, k_aug, v_aug)), mask, backend)
            else:
                q_aug, k_aug = (torch.cat(parts, dim=-1).transpose(1, 2) for parts in (q_parts, k_parts))
                out, dense_pair = attend_with_pair(q_aug, k_aug, v_aug, mask, pair, self.linear_b, self.down_z)
            out = out.transpose(1, 2).to(geometry)  # [B, N, H, E_v]
            o, o_pts, o_pair = out.split([hidden, 3 * self.v_points, v_pair.shape[-1]], dim=-1)
            o_pts = frames.invert_apply(
                rotations[:, :, None, None], translations[:, :, None, None], o_pts.unflatten(-1, (self.v_points, 3))
            )  # [B, N, H, P_v, 3], local frame
        rank = pair_2.shape[-2]
        o_pts_norm = torch.sqrt(o_pts.square().sum(-1) + POINT_NORM_EPS)  # [B, N, H, P_v]
        pair_1 = pair_1.to(geometry)[:, :, None]  # [B, N, 1, R, d]
        o_pair = (pair_1 * o_pair.unflatten(-1, (rank, pair_1.shape[-1]))).sum(-2)  # [B, N, H, d]
        if pair is not None:
            o_pair = o_pair + dense_pair
        features = [o.flatten(2), *o_pts.flatten(2, 3).unbind(-1), o_pts_norm.flatten(2), o_pair.flatten(2)]
        return self.linear_out(torch.cat(features, dim=-1).to(s.dtype))
