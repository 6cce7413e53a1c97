"""Dense 2-D pair features and their rank-R factoriser: flash_ipa's ``orig_2d_bias`` and
``flash_2d_factorize_bias`` edge modes.

For residues i, j the features are

    [p_i, p_j, relpos(i - j), distogram(|t_i - t_j|), distogram(|sc_i - sc_j|)]

with ``p = linear_s_p(s)`` [feat_dim] and ``relpos = linear_relpos(index embedding of i - j)``
[feat_dim], mapped by the edge MLP (shared with the 1-D mode) to ``z`` [B, N, N, c_p]. The
factoriser compresses ``z`` along each length axis with weights per absolute position
(flash_ipa's ``LinearFactorizer``). Both need O(N^2) memory.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..config import EncoderConfig
from ..errors import InputError
from .edge_embedder import distogram, edge_mlp, index_embedding
from .frames import geometry_dtype
from .knn import pair_distances


def pair_distogram(coords: torch.Tensor, node_mask: torch.Tensor, num_bins: int) -> torch.Tensor:
    """[B, N, 3] (Angstrom), [B, N] bool -> [B, N, N, num_bins] one-hot bins of |x_i - x_j|.

    Distances are exact differences (a matmul-based ``cdist`` moves the zero self-distance
    into the first bin); padded coordinates are ignored."""
    coords = torch.where(node_mask[..., None], coords.to(geometry_dtype(coords.dtype)), 0.0)
    return distogram(pair_distances(coords, coords[:, None]), num_bins)


class PairEmbedder(nn.Module):
    """Node embeddings and C-alpha coordinates to a dense pair representation [B, N, N, c_p].

    Parameter names are flash_ipa's (``linear_s_p``, ``linear_relpos``, ``edge_embedder``)."""

    def __init__(self, config: EncoderConfig):
        super().__init__()
        self.feat_dim, self.num_bins = config.feat_dim, config.num_bins
        self.linear_s_p = nn.Linear(config.c_s, config.feat_dim)
        self.linear_relpos = nn.Linear(config.feat_dim, config.feat_dim)
        self.edge_embedder = edge_mlp(config)

    def pair_features(
        self,
        node_embed: torch.Tensor,
        translations: torch.Tensor,
        node_mask: torch.Tensor,
        trans_sc: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """node_embed [B, N, c_s]; translations, trans_sc [B, N, 3] (Angstrom; trans_sc defaults
        to translations); node_mask [B, N] bool; positions [B, N] int64 (see
        :func:`~ipa_export.model.edge_embedder.residue_positions`; default the slots)
        -> z [B, N, N, c_p], zero unless both residues are valid."""
        batch, length, _ = node_embed.shape
        dtype = node_embed.dtype  # geometry in fp32, layers in the model's dtype
        f, bins = self.feat_dim, self.num_bins
        # The MLP's first layer on [p_i, p_j, relpos_ij, t_ij, sc_ij] is a sum over its column blocks,
        # so the [B, N, N, 3 f + 2 bins] input is never built: per-residue terms are broadcast and
        # linear_relpos is folded into the relpos block.
        first = self.edge_embedder[0]
        w_i, w_j, w_rel, w_t, w_sc = first.weight.split([f, f, f, bins, bins], dim=1)
        p = self.linear_s_p(node_embed)  # [B, N, f]
        if positions is None:
            positions = torch.arange(length, device=node_embed.device).expand(batch, length)
        offsets = positions[:, :, None] - positions[:, None, :]  # [B, N, N]
        relpos = torch.nn.functional.linear(
            index_embedding(offsets, f).to(dtype),
            w_rel @ self.linear_relpos.weight,
            w_rel @ self.linear_relpos.bias + first.bias,
        )  # [B, N, N, c_p]
        t_bins = pair_distogram(translations, node_mask, bins).to(dtype)
        sc_bins = t_bins if trans_sc is None else pair_distogram(trans_sc, node_mask, bins).to(dtype)
        hidden = relpos + (p @ w_i.T)[:, :, None] + (p @ w_j.T)[:, None] + t_bins @ w_t.T + sc_bins @ w_sc.T
        valid = node_mask[:, :, None] & node_mask[:, None, :]
        return torch.where(valid[..., None], self.edge_embedder[1:](hidden), 0.0)


class Factorizer(nn.Module):
    """A pair representation [B, N, N, c] to two rank-R factors [B, N, R, c_out]
    (flash_ipa's ``LinearFactorizer``; its parameter names)::

        z_f1[j] = LN_c(W_in LN_R(sum_i W_len[:, i] z[i, j])) / sqrt(R)    # column j, over rows
        z_f2[i] = LN_c(W_in LN_R(sum_j W_len[:, j] z[i, j])) / sqrt(R)    # row i, over columns

    ``W_len`` [R, max_len] weighs absolute positions, so N <= max_len; ``LN_R`` normalises
    over the R ranks of each channel, ``LN_c`` over the channels. The pair bias that the IPA
    forms from them, ``linear_b(z_f1[i]) . linear_b(z_f2[j])``, thus pairs column i with row j,
    as in flash_ipa.
    """

    def __init__(self, max_len: int, c_in: int, rank: int, c_out: int):
        super().__init__()
        self.max_len, self.rank = max_len, rank
        self.length_compressor = nn.Linear(max_len, rank, bias=False)
        self.inner_compressor = nn.Linear(c_in, c_out, bias=False)
        self.length_norm = nn.LayerNorm(rank)
        self.inner_norm = nn.LayerNorm(c_out)

    def forward(self, pair: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """pair [B, N, N, c_in] -> (z_f1, z_f2) [B, N, R, c_out]."""
        length = pair.shape[1]
        if length > self.max_len:
            raise InputError(
                f"pair: N = {length} residues exceeds the factoriser's max_len {self.max_len} "
                "(its length weights cover max_len positions); crop the protein or use a model with a larger max_len"
            )
        weight = self.length_compressor.weight[:, :length].to(pair.dtype)  # [R, N]
        columns = torch.einsum("ri,bijc->bjrc", weight, pair)
        rows = torch.einsum("rj,bijc->birc", weight, pair)
        return self._project(columns), self._project(rows)

    def _project(self, x: torch.Tensor) -> torch.Tensor:
        """[B, N, R, c_in] -> [B, N, R, c_out]."""
        x = self.length_norm(x.transpose(-1, -2)).transpose(-1, -2)
        return self.inner_norm(self.inner_compressor(x)) / math.sqrt(self.rank)


class FactorizedPairEmbedder(PairEmbedder):
    """``flash_2d_factorize_bias``: dense pair features factorised to ``z_f1, z_f2`` [B, N, R, c_p].

    Same call as :class:`~ipa_export.model.edge_embedder.EdgeEmbedder`; padded positions of
    the factors are zero, and a protein's factors do not depend on the rest of the batch."""

    def __init__(self, config: EncoderConfig):
        super().__init__(config)
        self.factorizer = Factorizer(config.max_len, config.c_p, config.z_factor_rank, config.c_p)

    def forward(  # type: ignore[override]
        self,
        node_embed: torch.Tensor,
        translations: torch.Tensor,
        node_mask: torch.Tensor,
        trans_sc: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return self.factors(self.pair_features(node_embed, translations, node_mask, trans_sc, positions), node_mask)

    def factors(self, pair: torch.Tensor, node_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """pair [B, N, N, c_p] (zero at padded pairs), node_mask [B, N] bool -> z_f1, z_f2 [B, N, R, c_p]."""
        valid = node_mask[:, :, None, None]
        z_f1, z_f2 = self.factorizer(pair)
        return torch.where(valid, z_f1, 0.0), torch.where(valid, z_f2, 0.0)
