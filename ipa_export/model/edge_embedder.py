"""FlashIPA EdgeEmbedder, ``flash_1d_bias`` mode: factorised edge embeddings.

For residue i the embedder builds, per factor n ∈ {1, 2} and rank r, the features
[s_p (feat_dim), index embedding (2 feat_dim), t-distogram (num_bins), sc-distogram (num_bins)]
and maps them through Linear-ReLU-Linear-ReLU-Linear-LayerNorm to c_p. The pair bias
is then ``z_ij = sum_r z_f1[i, r] * z_f2[j, r]``, never materialised. With
``config.distance_features == "rbf"`` the distograms are ``num_rbf`` Gaussian RBFs instead.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..config import EncoderConfig
from ..errors import InputError
from .frames import geometry_dtype
from .knn import knn, knn_indices, neighbour_distances
from .validation import check_neighbours

MAX_INDEX = 2056  # max_len of the sinusoidal index embedding
CHAIN_GAP = 200  #: positions left free between consecutive chains of one protein
DISTOGRAM_MIN, DISTOGRAM_MAX = 1e-3, 20.0  # Angstrom


def index_embedding(
    indices: torch.Tensor, dim: int, max_len: int = MAX_INDEX, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Sinusoidal embedding of integer positions: [...] -> [..., dim] in ``dtype``, sin half first."""
    k = torch.arange(dim // 2, device=indices.device, dtype=dtype)
    angles = indices.to(dtype)[..., None] * math.pi / (max_len ** (2 * k / dim))
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=-1)


def residue_positions(
    node_mask: torch.Tensor, residue_index: torch.Tensor | None = None, chain_index: torch.Tensor | None = None
) -> torch.Tensor:
    """The positions the index embeddings see: [B, N] int64.

    ``residue_index`` [B, N] int (default: the slot, ``arange(N)``) and ``chain_index`` [B, N]
    int in ``[0, N)`` (default: one chain). Chains are laid out in the order of their ids,
    each starting ``CHAIN_GAP`` positions after the previous one ends; within a chain the
    position is the residue number minus the chain's smallest valid residue number. So
    positions depend on residue numbers, never on slots or padding, and one chain with
    residues numbered from its first valid slot gets ``0, 1, 2, ...`` (the reference's
    positions). Padded positions get 0.
    """
    batch, length = node_mask.shape
    if residue_index is None:
        residue_index = torch.arange(length, device=node_mask.device).expand(batch, length)
    residue_index = residue_index.long()
    chain = torch.zeros_like(residue_index) if chain_index is None else torch.where(node_mask, chain_index.long(), 0)
    big = torch.iinfo(torch.int64).max
    lowest = residue_index.new_full((batch, length), big).scatter_reduce(
        1, chain, torch.where(node_mask, residue_index, big), "amin"
    )  # [B, chain id]
    highest = residue_index.new_full((batch, length), -big).scatter_reduce(
        1, chain, torch.where(node_mask, residue_index, -big), "amax"
    )
    extent = torch.where(lowest <= highest, highest - lowest + 1 + CHAIN_GAP, 0)
    start = extent.cumsum(1) - extent
    positions = residue_index - lowest.gather(1, chain) + start.gather(1, chain)
    return torch.where(node_mask, positions, 0)


def distogram(distances: torch.Tensor, num_bins: int) -> torch.Tensor:
    """One-hot distance bins: [...] -> [..., num_bins]. Bin b holds lower_b < d < upper_b
    with ``lower = linspace(1e-3, 20, num_bins)`` and the last bin open up to 1e8 Angstrom;
    ``inf`` (no neighbour) sets no bin."""
    lower = torch.linspace(DISTOGRAM_MIN, DISTOGRAM_MAX, num_bins, device=distances.device, dtype=distances.dtype)
    upper = torch.cat([lower[1:], lower.new_tensor([1e8])])
    d = distances[..., None]
    return ((d > lower) & (d < upper)).to(distances.dtype)


def gaussian_rbf(distances: torch.Tensor, num_rbf: int) -> torch.Tensor:
    """Smooth distance features: [...] -> [..., num_rbf], ``exp(-((d - mu_b) / sigma)^2)`` with
    ``mu = linspace(1e-3, 20, num_rbf)`` Angstrom and ``sigma = (20 - 1e-3) / num_rbf``.
    ``inf`` (no neighbour) gives all zeros, with zero gradient."""
    centres = torch.linspace(DISTOGRAM_MIN, DISTOGRAM_MAX, num_rbf, device=distances.device, dtype=distances.dtype)
    sigma = (DISTOGRAM_MAX - DISTOGRAM_MIN) / num_rbf
    far = torch.where(torch.isfinite(distances), distances, 1e4)  # exp underflows to exactly 0
    return torch.exp(-(((far[..., None] - centres) / sigma) ** 2))


def edge_mlp(config: EncoderConfig) -> nn.Sequential:
    """flash_ipa's edge MLP, shared by every edge mode: [..., 3 feat_dim + 2 distance features] -> [..., c_p]."""
    c_p = config.c_p
    return nn.Sequential(
        nn.Linear(3 * config.feat_dim + 2 * config.num_distance_features, c_p),
        nn.ReLU(),
        nn.Linear(c_p, c_p),
        nn.ReLU(),
        nn.Linear(c_p, c_p),
        nn.LayerNorm(c_p),
    )


class EdgeEmbedder(nn.Module):
    """Node embeddings and C-alpha coordinates to edge factors ``z_f1, z_f2`` [B, N, R, c_p].

    Neighbours are searched among the valid residues of the same protein only, so a
    protein's factors do not depend on the rest of the batch. A protein with fewer than
    ``knn_k + 1`` residues leaves the missing neighbour slots empty (all-zero distogram
    and index features). Padded positions of the output are exactly zero. Precomputed
    neighbours (:meth:`neighbours`) replace the search: the factors are then a continuous
    function of the coordinates (smooth but for the MLP's ReLUs with ``distance_features="rbf"``).
    """

    def __init__(self, config: EncoderConfig):
        super().__init__()
        self.rank, self.k, self.num_distance_features, self.feat_dim = (
            config.z_factor_rank,
            config.knn_k,
            config.num_distance_features,
            config.feat_dim,
        )
        self.rbf = config.distance_features == "rbf"
        self.tie_tolerance = config.knn_tie_tolerance
        f, r, bins = config.feat_dim, config.z_factor_rank, self.num_distance_features
        if r == 0:  # flash_no_bias: no edge parameters at all
            self.c_p = config.c_p
            return
        self.linear_s_p = nn.Linear(config.c_s, 2 * r * f)
        self.linear_relpos = nn.Linear(f, 2 * r * 2 * f)
        self.linear_t_distogram = nn.Linear(self.k * (bins + f), 2 * r * bins)
        self.linear_sc_distogram = nn.Linear(self.k * (bins + f), 2 * r * bins)
        self.edge_embedder = edge_mlp(config)  # flash_ipa's name for the MLP

    def neighbours(self, coords: torch.Tensor, node_mask: torch.Tensor) -> torch.Tensor:
        """The neighbours the forward pass searches: coords [B, N, 3] (Angstrom), node_mask
        [B, N] bool -> indices [B, N, knn_k] int64 of the nearest other valid residues, nearest
        first, -1 for none (padded rows, short proteins). Piecewise constant: no gradient."""
        if self.rank == 0:
            raise InputError("neighbours: this encoder has no neighbour features (mode 'flash_no_bias')")
        geometry = geometry_dtype(self.linear_s_p.weight.dtype)  # as the forward pass's search
        coords = torch.where(node_mask[..., None], coords.detach().to(geometry), 0.0)
        return knn_indices(coords, node_mask, self.k, tie_tolerance=self.tie_tolerance)

    def _neighbour_features(
        self, coords: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, indices: torch.Tensor | None
    ) -> torch.Tensor:
        """[B, N, k * (num_bins + feat_dim)]: per neighbour, nearest first, its distance features
        and the embedding of its position; the neighbours searched, or ``indices`` [B, N, k]."""
        if indices is None:
            distances, indices = knn(coords, mask, self.k, tie_tolerance=self.tie_tolerance)  # [B, N, k]
        else:
            distances = neighbour_distances(coords, indices)
        present = (indices >= 0)[..., None]
        neighbour_positions = positions.gather(1, indices.clamp(min=0).flatten(1)).view_as(indices)
        index_emb = index_embedding(neighbour_positions, self.feat_dim, dtype=coords.dtype) * present
        encode = gaussian_rbf if self.rbf else distogram
        features = encode(distances, self.num_distance_features).to(coords.dtype)  # [B, N, k, bins]
        return torch.cat([features, index_emb], dim=-1).flatten(-2)

    def _factors(self, x: torch.Tensor) -> torch.Tensor:
        """[B, N, 2 * R * d] -> [B, N, 2, R, d] (n-major, then r, then d)."""
        return x.unflatten(-1, (2, self.rank, -1))

    def forward(
        self,
        node_embed: torch.Tensor,
        translations: torch.Tensor,
        node_mask: torch.Tensor,
        trans_sc: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
        *,
        neighbours: torch.Tensor | None = None,
        sc_neighbours: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """node_embed [B, N, c_s], translations and trans_sc [B, N, 3] (Angstrom; trans_sc
        defaults to translations), node_mask [B, N] bool, positions [B, N] int64 (see
        :func:`residue_positions`; default the slots) -> z_f1, z_f2 [B, N, R, c_p].

        ``neighbours`` [B, N, knn_k] int64 (from :meth:`neighbours`) replaces the search on
        ``translations``; with ``trans_sc`` given, ``sc_neighbours`` must then replace the one
        on ``trans_sc``."""
        batch, length, _ = node_embed.shape
        neighbours, sc_neighbours = self._fixed_neighbours(node_mask, trans_sc, neighbours, sc_neighbours)
        if self.rank == 0:
            empty = node_embed.new_zeros(batch, length, 0, self.c_p)
            return empty, empty
        if positions is None:
            positions = torch.arange(length, device=node_embed.device).expand(batch, length)
        geometry = geometry_dtype(node_embed.dtype)
        translations = torch.where(node_mask[..., None], translations.to(geometry), 0.0)
        t_features = self._neighbour_features(translations, node_mask, positions, neighbours)
        if trans_sc is None:  # BINDRAE passes the C-alpha positions again: one kNN search serves both
            sc_features = t_features
        else:
            sc_t = torch.where(node_mask[..., None], trans_sc.to(geometry), 0.0)
            sc_features = self._neighbour_features(sc_t, node_mask, positions, sc_neighbours)
        dtype, f = node_embed.dtype, self.feat_dim  # geometry in fp32 (fp64), the layers in the model's dtype
        features = torch.cat(
            [
                self._factors(self.linear_s_p(node_embed)),
                self._factors(self.linear_relpos(index_embedding(positions, f, dtype=geometry).to(dtype))),
                self._factors(self.linear_t_distogram(t_features.to(dtype))),
                self._factors(self.linear_sc_distogram(sc_features.to(dtype))),
            ],
            dim=-1,
        )  # [B, N, 2, R, 3 feat_dim + 2 num_bins]
        z = torch.where(node_mask[:, :, None, None, None], self.edge_embedder(features), 0.0)
        return z[:, :, 0], z[:, :, 1]

    def _fixed_neighbours(
        self,
        node_mask: torch.Tensor,
        trans_sc: torch.Tensor | None,
        neighbours: torch.Tensor | None,
        sc_neighbours: torch.Tensor | None,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """``neighbours`` and ``sc_neighbours`` checked (see :func:`check_neighbours`), padded rows -1."""
        if self.rank == 0 and (neighbours is not None or sc_neighbours is not None):
            raise InputError("neighbours: this encoder has no neighbour features (mode 'flash_no_bias'); leave it None")
        if sc_neighbours is not None and (neighbours is None or trans_sc is None):
            raise InputError(
                "sc_neighbours: the neighbours of trans_sc, used only with neighbours= and trans_sc=; "
                "without trans_sc the side-chain features reuse neighbours"
            )
        if neighbours is None:
            return None, None
        if trans_sc is not None and sc_neighbours is None:
            raise InputError(
                "sc_neighbours: required with neighbours= when trans_sc is given (else trans_sc's neighbours would "
                "still be searched); pass sc_neighbours=encoder.neighbours(trans_sc, node_mask)"
            )
        neighbours = check_neighbours("neighbours", neighbours, node_mask, self.k)
        if sc_neighbours is not None:
            sc_neighbours = check_neighbours("sc_neighbours", sc_neighbours, node_mask, self.k)
        return neighbours, sc_neighbours
