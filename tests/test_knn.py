"""The chunked neighbour search equals a brute-force full search, ties and padding included."""

from __future__ import annotations

import pytest
import torch
from conftest import STRUCTURES, random_chain, random_rotation

from ipa_export.model import knn as knn_module
from ipa_export.model.knn import knn, smallest
from ipa_export.structures.reader import read_backbone


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


def test_large_chain_same_neighbours_as_a_full_search():
    # GEMM candidates + exact re-ranking: the same neighbour sets and distances as a full
    # direct-difference search on a 600-residue chain, chunked, with padding.
    g = torch.Generator().manual_seed(3)
    coords = torch.zeros(2, 600, 3)
    coords[0] = random_chain(600, g) + 500.0  # far from the origin
    coords[1, :450] = random_chain(450, g)
    mask = torch.zeros(2, 600, dtype=torch.bool)
    mask[0] = True
    mask[1, :450] = True
    distances, indices = knn(coords, mask, 10, 128)
    full = torch.cdist(coords.double(), coords.double())
    full = full.masked_fill(~(mask[:, None, :] & mask[:, :, None]) | torch.eye(600, dtype=torch.bool), float("inf"))
    want = full.topk(10, dim=-1, largest=False)
    valid = mask[..., None].expand_as(indices)
    assert torch.equal(indices.sort(-1).values[valid], want.indices.sort(-1).values[valid])
    torch.testing.assert_close(distances.sort(-1).values[valid].double(), want.values[valid], atol=1e-4, rtol=0)
    # Nearest first, by the distances returned (no tie tolerance by default).
    assert (distances[..., 1:] >= distances[..., :-1])[valid[..., 1:]].all()
    assert (indices[~valid] == -1).all()


def test_tie_tolerance_groups_are_ordered_by_index_and_decide_the_kth_slot():
    # The centre of a rotated 3 x 3 x 3 grid has six face neighbours at 3.8 A, tied up to the
    # rounding of the rotation. With a tie tolerance, k = 4 must take the four lowest-indexed
    # ones, in index order, whatever rounding made one of them the "nearest".
    r = torch.arange(3.0) * 3.8
    grid = torch.stack(torch.meshgrid(r, r, r, indexing="ij"), -1).reshape(1, 27, 3)
    faces = [4, 10, 12, 14, 16, 22]  # the centre is 13
    mask = torch.ones(1, 27, dtype=torch.bool)
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        q = random_rotation(g)
        _, indices = knn(grid @ q.T, mask, 4, tie_tolerance=1e-4)
        assert indices[0, 13].tolist() == faces[:4]


def test_grad_jacrev_jvp_vmap_through_the_search():
    g = torch.Generator().manual_seed(0)
    coords = random_chain(16, g)[None]
    mask = torch.ones(1, 16, dtype=torch.bool)

    def total(x):
        return knn(x, mask, 5)[0].sum()

    grad = torch.func.grad(total)(coords)
    # d/dx_i of sum_j |x_i - x_j| over the selected pairs, computed directly.
    _, indices = knn(coords, mask, 5)
    x = coords.double().requires_grad_()
    (x[0, :, None] - x[0, indices[0]]).norm(dim=-1).sum().backward()
    torch.testing.assert_close(grad.double(), x.grad, atol=1e-5, rtol=1e-5)
    jacobian = torch.func.jacrev(lambda x: knn(x, mask, 5)[0])(coords)
    torch.testing.assert_close(jacobian.sum((0, 1, 2)), grad)
    tangent = torch.randn(coords.shape, generator=g)
    _, jvp = torch.func.jvp(total, (coords,), (tangent,))
    torch.testing.assert_close(jvp, (grad * tangent).sum())
    stacked = torch.stack([coords, coords.flip(1), 2 * coords])
    batched_d, batched_i = torch.func.vmap(lambda x: knn(x, mask, 5))(stacked)
    for b in range(3):
        d, i = knn(stacked[b], mask, 5)
        assert torch.equal(batched_i[b], i) and torch.equal(batched_d[b], d)


def test_padded_positions_may_hold_anything():
    g = torch.Generator().manual_seed(5)
    coords = torch.zeros(1, 30, 3)
    coords[0, :20] = random_chain(20, g)
    mask = torch.zeros(1, 30, dtype=torch.bool)
    mask[0, :20] = True
    want = knn(coords, mask, 10)
    coords[0, 20:] = float("nan")
    got = knn(coords, mask, 10)
    assert torch.equal(got[1], want[1]) and torch.equal(got[0][:, :20], want[0][:, :20])


def test_block_preselection_returns_the_smallest_values_ties_included():
    count, length, block = 18, 6000, knn_module.BLOCK_COLUMNS
    g = torch.Generator().manual_seed(0)
    d2 = torch.randint(100, 140, (5, length), generator=g).float()  # many equal values
    for row in range(3):  # the smallest values one per block: every chosen block is needed
        blocks = torch.randperm(length // block, generator=g)[:count]
        d2[row, blocks * block + row] = torch.arange(1.0, count + 1)
    d2[1, 5 * block] = d2[1].amax()  # ... and a tie at the count-th place, in another block
    d2[1, blocks[-1] * block + 1] = float(count)
    d2[2, -3:] = 0.0  # in the partial last block
    d2[3] = 7.0  # all equal
    d2[4, 100:] = float("inf")  # excluded columns
    for n in (count, count + 5):
        values, columns = smallest(d2, n)
        want = torch.topk(d2, n, dim=-1, largest=False).values
        assert torch.equal(values.sort(-1).values, want.sort(-1).values)
        assert torch.equal(d2.gather(-1, columns), values)
        assert (columns.sort(-1).values.diff(dim=-1) > 0).all()  # distinct columns


def test_block_preselection_gives_the_same_neighbours_as_one_topk_per_row(monkeypatch):
    # 5,400 residues, long enough for the block pre-selection: a rotated lattice (ties at
    # every distance) and a random chain with padding.
    n = 5400
    assert 4 * (10 + knn_module.EXTRA_CANDIDATES) * knn_module.BLOCK_COLUMNS <= n
    g = torch.Generator().manual_seed(2)
    r = torch.arange(18.0), torch.arange(15.0), torch.arange(20.0)
    lattice = 3.8 * torch.stack(torch.meshgrid(*r, indexing="ij"), -1).reshape(n, 3)
    coords = torch.zeros(2, n, 3)
    coords[0] = lattice[torch.randperm(n, generator=g)] @ random_rotation(g).float().T
    coords[1, :5000] = random_chain(5000, g)
    mask = torch.ones(2, n, dtype=torch.bool)
    mask[1, 5000:] = False
    got = knn(coords, mask, 10)
    monkeypatch.setattr(knn_module, "BLOCK_COLUMNS", n)  # every row through one topk, as before
    want = knn(coords, mask, 10)
    assert torch.equal(got[1], want[1])
    assert torch.equal(got[0], want[0])


def reference_knn(coords: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """flash_ipa's search, as written there: ``torch.norm(x - y)``, 1e6 on the diagonal, topk."""
    dist = torch.norm(coords[:, :, None, :] - coords[:, None, :, :], dim=-1)
    dist = dist + torch.eye(coords.shape[1])[None] * 1e6
    return torch.topk(dist, k=k, dim=-1, largest=False)


@pytest.mark.parametrize("name", sorted(p.name for p in STRUCTURES.glob("*.pdb.gz")))
def test_real_chains_get_the_reference_neighbours_in_its_order(name):
    # Real chains (coordinates given to 1e-3 A) have neighbour distances that differ by less
    # than 1e-5 A: the order is the reference's, by the fp32 distances it computes, at any chunking.
    ca = read_backbone(STRUCTURES / name).ca[None]
    want_distances, want = reference_knn(ca, 10)
    mask = torch.ones(ca.shape[:2], dtype=torch.bool)
    for chunk_size in (37, 256):
        distances, indices = knn(ca, mask, 10, chunk_size)
        assert torch.equal(indices, want)
        assert torch.equal(distances, want_distances)


def test_near_ties_go_by_distance_by_default_and_by_index_within_the_tolerance():
    # Residue 0's two nearest neighbours are 5 and 9, 1e-5 A apart, the later index nearer.
    coords = torch.zeros(1, 12, 3)
    coords[0, :, 0] = torch.arange(12.0) * 10.0 + 30.0  # the rest far away
    coords[0, 0] = torch.tensor([0.0, 0.0, 0.0])
    coords[0, 5] = torch.tensor([4.00001, 0.0, 0.0])
    coords[0, 9] = torch.tensor([0.0, 4.0, 0.0])
    mask = torch.ones(1, 12, dtype=torch.bool)
    distances, indices = knn(coords, mask, 3)
    assert distances[0, 0, 0] < distances[0, 0, 1]  # the gap survives fp32
    assert indices[0, 0, :2].tolist() == [9, 5]
    _, banded = knn(coords, mask, 3, tie_tolerance=1e-4)
    assert banded[0, 0, :2].tolist() == [5, 9]
