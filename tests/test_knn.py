"""The chunked neighbour search equals a brute-force full search, ties and padding included."""

from __future__ import annotations

import pytest
import torch
from conftest import random_chain

from ipa_export.model.knn import knn


def brute_force(coords: torch.Tensor, mask: torch.Tensor, k: int):
    """Full [B, N, N] distances, lexicographic (distance, index) order, with Python sorting."""
    batch, length, _ = coords.shape
    dist = torch.linalg.vector_norm(coords[:, :, None] - coords[:, None, :], dim=-1)
    distances = torch.full((batch, length, k), float("inf"))
    indices = torch.full((batch, length, k), -1, dtype=torch.long)
    for b in range(batch):
        for i in range(length):
            if not mask[b, i]:
                continue
            others = sorted((dist[b, i, j].item(), j) for j in range(length) if j != i and mask[b, j])[:k]
            for slot, (d, j) in enumerate(others):
                distances[b, i, slot], indices[b, i, slot] = d, j
    return distances, indices


@pytest.mark.parametrize("chunk_size", [1, 7, 64, 10_000])
def test_chunked_equals_brute_force_with_padding(chunk_size):
    g = torch.Generator().manual_seed(0)
    coords = torch.stack([random_chain(45, g), random_chain(45, g)])
    mask = torch.ones(2, 45, dtype=torch.bool)
    mask[1, 30:] = False
    coords[1, 30:] = 0.0  # padding at the origin, inside the protein
    mask[0, 5] = False  # a gap inside a chain
    got = knn(coords, mask, 10, chunk_size)
    want = brute_force(coords, mask, 10)
    assert torch.equal(got[1], want[1])
    assert torch.equal(got[0], want[0])


def test_ties_are_broken_by_index_whatever_the_chunking():
    # A 6 x 6 x 2 lattice with spacing 1: every residue has many equidistant neighbours.
    grid = torch.stack(torch.meshgrid(torch.arange(6.0), torch.arange(6.0), torch.arange(2.0), indexing="ij"), -1)
    coords = grid.reshape(1, -1, 3)[:, torch.randperm(72, generator=torch.Generator().manual_seed(1))]
    mask = torch.ones(1, 72, dtype=torch.bool)
    want = brute_force(coords, mask, 10)
    for chunk_size in (1, 5, 72):
        got = knn(coords, mask, 10, chunk_size)
        assert torch.equal(got[1], want[1]) and torch.equal(got[0], want[0])


def test_padded_queries_have_no_neighbours():
    coords = torch.randn(1, 20, 3)
    mask = torch.zeros(1, 20, dtype=torch.bool)
    mask[0, :12] = True
    distances, indices = knn(coords, mask, 10)
    assert (indices[0, 12:] == -1).all() and torch.isinf(distances[0, 12:]).all()
    assert (indices[0, :12] < 12).all()
