"""Exact k-nearest-neighbour search in O(N) memory.

Rows are processed in chunks of ``chunk_size`` queries, so the largest temporary is
[B, chunk_size, N] instead of [B, N, N]. Neighbours are ordered by distance, ties by
index (lexicographic on ``(distance, index)``), so the result does not depend on the
chunking. The search is a ``torch.library`` custom op: ``torch.compile`` treats it as
one opaque node, with no graph break and no recompilation for new lengths.
"""

from __future__ import annotations

import torch

DEFAULT_CHUNK_SIZE = 256
_INDEX_BITS = 32


@torch.library.custom_op("ipa_export::knn", mutates_args=())
def knn(
    coords: torch.Tensor, mask: torch.Tensor, k: int, chunk_size: int = DEFAULT_CHUNK_SIZE
) -> tuple[torch.Tensor, torch.Tensor]:
    """The k nearest other valid residues of each residue.

    coords: [B, N, 3] float (Angstrom); mask: [B, N] bool.
    Returns ``(distances [B, N, k] float32, indices [B, N, k] int64)``, nearest first.
    A slot with no neighbour (fewer than k other valid residues, or a padded query)
    has distance ``inf`` and index -1. Distances are ``|x_i - x_j|`` in float32.
    """
    coords = coords.float()
    batch, length, _ = coords.shape
    k_found = min(k, max(length - 1, 0))
    distances = coords.new_full((batch, length, k), float("inf"))
    indices = torch.full((batch, length, k), -1, dtype=torch.long, device=coords.device)
    if k_found == 0:
        return distances, indices
    columns = torch.arange(length, device=coords.device)
    for start in range(0, length, chunk_size):
        rows = columns[start : start + chunk_size]
        dist = torch.linalg.vector_norm(coords[:, rows, None, :] - coords[:, None, :, :], dim=-1)  # [B, n, N]
        excluded = ~mask[:, None, :] | (rows[:, None] == columns)  # padding and self
        dist = dist.masked_fill(excluded, float("inf"))
        # Non-negative float32 bit patterns sort like the floats: pack (distance, index) into one int64 key.
        key = (dist.view(torch.int32).long() << _INDEX_BITS) | columns
        key = torch.topk(key, k_found, dim=-1, largest=False).values
        distances[:, rows, :k_found] = (key >> _INDEX_BITS).int().view(torch.float32)
        indices[:, rows, :k_found] = key & ((1 << _INDEX_BITS) - 1)
    missing = torch.isinf(distances) | ~mask[:, :, None]
    return distances.masked_fill(missing, float("inf")), indices.masked_fill(missing, -1)


@knn.register_fake
def _(
    coords: torch.Tensor, mask: torch.Tensor, k: int, chunk_size: int = DEFAULT_CHUNK_SIZE
) -> tuple[torch.Tensor, torch.Tensor]:
    batch, length, _ = coords.shape
    return coords.new_empty((batch, length, k), dtype=torch.float32), coords.new_empty(
        (batch, length, k), dtype=torch.long
    )
