"""SE(3) invariance, batch invariance and short chains."""

from __future__ import annotations

import functools
import math

import pytest
import torch
from conftest import make_encoder, random_chain, random_rotation, tiny_config
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from ipa_export.model.edge_embedder import DISTOGRAM_MAX, DISTOGRAM_MIN
from ipa_export.model.knn import knn

# fp32 tolerance for chains centred near the origin (|x| <~ 40 A), outputs of order 1:
# |moved - original| <= 1e-4 + 1e-4 |original|.
INVARIANCE_ATOL = INVARIANCE_RTOL = 1e-4
# A discontinuous decision (bin edge, neighbour order) closer than this (Angstrom) may flip
# under fp32 rounding of rotated coordinates (~1e-5 A at 50 A); such inputs are skipped.
DECISION_MARGIN = 1e-4


@functools.cache
def encoder(rank: int, attention: str = "sdpa"):
    mode = "flash_1d_bias" if rank else "flash_no_bias"
    return make_encoder(tiny_config(z_factor_rank=rank, mode=mode, attention=attention), seed=rank)


def decisions_are_stable(coords: torch.Tensor, mask: torch.Tensor, k: int, bins: int) -> bool:
    """True if no kNN membership or distogram bin is within DECISION_MARGIN of flipping."""
    x = coords.double()
    d = torch.cdist(x, x)
    valid = mask[:, :, None] & mask[:, None, :] & ~torch.eye(x.shape[1], dtype=torch.bool)
    d = d.masked_fill(~valid, float("inf"))
    ordered = d.sort(dim=-1).values[..., : k + 1]
    finite_gaps = ordered.diff(dim=-1)[torch.isfinite(ordered[..., 1:])]
    edges = torch.linspace(DISTOGRAM_MIN, DISTOGRAM_MAX, bins, dtype=torch.float64)
    near = ordered[..., :k][torch.isfinite(ordered[..., :k])]
    return bool((finite_gaps > DECISION_MARGIN).all() and ((near[:, None] - edges).abs() > DECISION_MARGIN).all())


def apply_global(q: torch.Tensor, shift: torch.Tensor, rotations: torch.Tensor, translations: torch.Tensor):
    return q @ rotations, translations @ q.T + shift


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    length=st.integers(1, 40),
    rank=st.sampled_from([0, 1, 2, 4]),
    padding=st.integers(0, 6),
    shift_scale=st.floats(0.0, 30.0),
)
def test_se3_invariance(seed, length, rank, padding, shift_scale):
    g = torch.Generator().manual_seed(seed)
    config = tiny_config()
    n = length + padding
    coords = torch.zeros(1, n, 3)
    coords[0, :length] = random_chain(length, g)
    mask = torch.zeros(1, n, dtype=torch.bool)
    mask[0, :length] = True
    assume(decisions_are_stable(coords, mask, config.knn_k, config.num_bins))
    node_embed = torch.randn(1, n, config.c_s, generator=g)
    rotations = random_rotation(g, (1, n))
    q = random_rotation(g)
    shift = shift_scale * torch.randn(3, generator=g)

    model = encoder(rank)
    with torch.no_grad():
        out = model(node_embed, coords, mask, rotations=rotations)
        moved_rotations, moved_translations = apply_global(q, shift, rotations, coords)
        moved = model(node_embed, moved_translations, mask, rotations=moved_rotations)

    close = dict(atol=INVARIANCE_ATOL, rtol=INVARIANCE_RTOL)
    for field in ("s", "z_f1", "z_f2"):
        torch.testing.assert_close(getattr(moved, field), getattr(out, field), **close)
    expected_rotations, expected_translations = apply_global(q, shift, out.rotations, out.translations)
    torch.testing.assert_close(moved.rotations[mask], expected_rotations[mask], **close)
    torch.testing.assert_close(moved.translations[mask], expected_translations[mask], atol=1e-3, rtol=INVARIANCE_RTOL)


@pytest.mark.parametrize("attention", ["dense", "sdpa"])
def test_batch_invariance(attention):
    """A protein alone and inside a padded batch of others gives the same outputs."""
    g = torch.Generator().manual_seed(7)
    config = tiny_config(attention=attention)
    model = make_encoder(config, seed=1)
    lengths = [23, 9, 31]
    n = max(lengths) + 4
    node_embed = torch.randn(len(lengths), n, config.c_s, generator=g)  # random values in the padding too
    coords = torch.zeros(len(lengths), n, 3)
    mask = torch.zeros(len(lengths), n, dtype=torch.bool)
    for b, length in enumerate(lengths):
        coords[b, :length] = random_chain(length, g)
        mask[b, :length] = True
    coords[~mask] = 0.0  # hostile padding: many padded residues at the origin, near real ones
    rotations = random_rotation(g, (len(lengths), n))
    with torch.no_grad():
        batched = model(node_embed, coords, mask, rotations=rotations)
        for b, length in enumerate(lengths):
            alone = model(
                node_embed[b : b + 1, :length],
                coords[b : b + 1, :length],
                mask[b : b + 1, :length],
                rotations=rotations[b : b + 1, :length],
            )
            for field in batched._fields:
                torch.testing.assert_close(
                    getattr(batched, field)[b, :length], getattr(alone, field)[0], atol=1e-5, rtol=1e-5
                )
    assert not batched.s[~mask].any() and not batched.z_f1[~mask].any() and not batched.z_f2[~mask].any()


@pytest.mark.parametrize("length", [1, 2, 5, 10, 11])
def test_short_chains_have_empty_neighbour_slots(length):
    """With fewer than k + 1 residues, each residue gets its length - 1 neighbours and the
    remaining slots are empty: distance inf, index -1 (zero features)."""
    g = torch.Generator().manual_seed(length)
    coords = random_chain(length, g)[None]
    mask = torch.ones(1, length, dtype=torch.bool)
    distances, indices = knn(coords, mask, 10)
    found = min(10, length - 1)
    assert (indices[..., :found] >= 0).all() and (indices[..., found:] == -1).all()
    assert torch.isfinite(distances[..., :found]).all() and torch.isinf(distances[..., found:]).all()
    for i in range(length):  # every other residue is a neighbour when length <= k + 1
        assert sorted(indices[0, i, :found].tolist()) == [j for j in range(length) if j != i]
    config = tiny_config()
    with torch.no_grad():
        out = encoder(2)(torch.randn(1, length, config.c_s, generator=g), coords, mask)
    assert all(torch.isfinite(t).all() for t in out)


def test_short_chain_equals_itself_padded_with_a_longer_protein():
    g = torch.Generator().manual_seed(3)
    config = tiny_config()
    short, long = random_chain(4, g), random_chain(30, g)
    coords = torch.zeros(2, 30, 3)
    coords[0, :4], coords[1] = short, long
    mask = torch.zeros(2, 30, dtype=torch.bool)
    mask[0, :4], mask[1] = True, True
    node_embed = torch.randn(2, 30, config.c_s, generator=g)
    model = encoder(2)
    with torch.no_grad():
        batched = model(node_embed, coords, mask)
        alone = model(node_embed[:1, :4], coords[:1, :4], mask[:1, :4])
    torch.testing.assert_close(batched.s[0, :4], alone.s[0], atol=1e-5, rtol=1e-5)


def ideal_line(n: int = 30, step: float = 3.8) -> torch.Tensor:
    return torch.arange(n, dtype=torch.float64)[:, None] * torch.tensor([step, 0.0, 0.0], dtype=torch.float64)


def ideal_grid(side: int = 4, step: float = 3.8) -> torch.Tensor:
    r = torch.arange(side, dtype=torch.float64) * step
    return torch.stack(torch.meshgrid(r, r, r, indexing="ij"), -1).reshape(-1, 3)


def ideal_helix(n: int = 30, radius: float = 2.3, rise: float = 1.5, turn_deg: float = 100.0) -> torch.Tensor:
    """C-alpha trace of an ideal alpha helix: 100 degrees and 1.5 A per residue on a 2.3 A radius."""
    angle = torch.arange(n, dtype=torch.float64) * math.radians(turn_deg)
    return torch.stack([radius * torch.cos(angle), radius * torch.sin(angle), rise * torch.arange(n)], -1)


@pytest.mark.parametrize("offset", [0.0, 200.0])
@pytest.mark.parametrize("shape", [ideal_line, ideal_grid, ideal_helix])
def test_tie_tolerance_keeps_exactly_tied_geometry_se3_invariant(shape, offset):
    """Idealised geometry has exactly tied distances (i - d and i + d on a line or helix, the
    faces of a grid): with ``knn_tie_tolerance`` on, rounding after a rotation must not reorder
    the tied neighbours, at the origin and 200 A away from it."""
    config = tiny_config(knn_tie_tolerance=1e-4)
    coords = shape()
    coords = (coords - coords.mean(0) + torch.tensor([offset, 0.0, 0.0], dtype=torch.float64)).float()[None]
    n = coords.shape[1]
    assert decisions_are_stable_up_to_ties(coords, config)
    g = torch.Generator().manual_seed(0)
    node_embed = torch.randn(1, n, config.c_s, generator=g)
    mask = torch.ones(1, n, dtype=torch.bool)
    q = torch.stack([random_rotation(g) for _ in range(100)])  # [100, 3, 3]
    rotations = q[:, None].expand(100, n, 3, 3).contiguous()  # identity frames, rotated by q
    model = make_encoder(config, seed=2)
    with torch.no_grad():  # one batch of 100 rotated copies (batch invariance is tested above)
        reference = model(node_embed, coords, mask).s
        moved = model(node_embed.expand(100, -1, -1), coords @ q.transpose(1, 2), mask.expand(100, -1), rotations).s
    worst = (moved - reference).abs().max().item()
    assert worst <= 1e-3


def decisions_are_stable_up_to_ties(coords: torch.Tensor, config) -> bool:
    """No neighbour distance within 1e-2 A of a distogram bin edge (only the ties are at stake)."""
    d = torch.cdist(coords.double(), coords.double())[0]
    d = d.masked_fill(torch.eye(d.shape[0], dtype=torch.bool), float("inf")).sort(-1).values[:, : config.knn_k]
    edges = torch.linspace(DISTOGRAM_MIN, DISTOGRAM_MAX, config.num_bins, dtype=torch.float64)
    return bool(((d[..., None] - edges).abs() > 1e-2).all())
