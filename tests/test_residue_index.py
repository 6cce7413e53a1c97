"""residue_index / chain_index: the index features follow residue numbers and chains, never
array slots or padding; the defaults keep the reference's positions (golden parity is in
test_golden.py)."""

from __future__ import annotations

import pytest
import torch
from conftest import make_encoder, random_chain

from ipa_export.model.edge_embedder import CHAIN_GAP

L = 30
FIELDS = ("s", "rotations", "translations", "z_f1", "z_f2")


@pytest.fixture(scope="module")
def encoder():
    return make_encoder()


@pytest.fixture(scope="module")
def protein():
    g = torch.Generator().manual_seed(1)
    return torch.randn(1, L, 32, generator=g), random_chain(L, g)[None]


def place(protein, before: int, after: int, fill: float = 7.0):
    """The protein at slots [before, before + L) of a longer array, junk elsewhere."""
    node, coords = protein
    pad = lambda n, c: torch.full((1, n, c), fill)  # noqa: E731
    mask = torch.cat([torch.zeros(1, before), torch.ones(1, L), torch.zeros(1, after)], 1).bool()
    return (
        torch.cat([pad(before, 32), node, pad(after, 32)], 1),
        torch.cat([pad(before, 3), coords, pad(after, 3)], 1),
        mask,
    )


def assert_same(a, b, sl=slice(None), atol=1e-5):
    for name in FIELDS:
        torch.testing.assert_close(getattr(a, name)[:, sl], getattr(b, name), atol=atol, rtol=0, msg=name)


@pytest.mark.parametrize(("before", "after"), [(17, 0), (1, 5), (40, 13)])
def test_slot_offset_and_left_padding_change_nothing(encoder, protein, before, after):
    with torch.no_grad():
        reference = encoder(*protein, torch.ones(1, L, dtype=torch.bool))
        # default residue_index: the slots, counted from the first valid residue
        assert_same(encoder(*place(protein, before, after)), reference, slice(before, before + L))
        # residue numbers as a file gives them, stored at any slots
        node, coords, mask = place(protein, before, after)
        numbers = torch.arange(before + L + after)[None] + 100 - before
        assert_same(encoder(node, coords, mask, residue_index=numbers), reference, slice(before, before + L))


def test_numbering_gap_equals_masked_slots(encoder, protein):
    """A crop numbered 0-9, 20-39 in 30 slots is the same protein as the same residues at
    slots 0-9, 20-39 of a 40-slot array with slots 10-19 padded."""
    node, coords = protein
    numbers = torch.cat([torch.arange(10), torch.arange(20, 40)])[None]
    mask = torch.ones(1, L, dtype=torch.bool)
    wide_node, wide_coords = torch.zeros(1, 40, 32), torch.zeros(1, 40, 3)
    wide_node[:, numbers[0]], wide_coords[:, numbers[0]] = node, coords
    wide_mask = torch.zeros(1, 40, dtype=torch.bool)
    wide_mask[:, numbers[0]] = True
    with torch.no_grad():
        gapped = encoder(node, coords, mask, residue_index=numbers)
        wide = encoder(wide_node, wide_coords, wide_mask)
        contiguous = encoder(node, coords, mask)
    for name in FIELDS:
        torch.testing.assert_close(getattr(wide, name)[:, numbers[0]], getattr(gapped, name), atol=1e-5, rtol=0)
    assert (gapped.s - contiguous.s).abs().max() > 1e-2  # the gap is seen


def test_chains_are_laid_out_with_a_gap(encoder, protein):
    """Two chains numbered from 1 each: the second starts CHAIN_GAP positions after the
    first ends, whatever order their residues are stored in."""
    node, coords = protein
    mask = torch.ones(1, L, dtype=torch.bool)
    chain = torch.tensor([[0] * 12 + [1] * 18])
    numbers = torch.cat([torch.arange(1, 13), torch.arange(1, 19)])[None]
    expected = torch.cat([torch.arange(12), torch.arange(12 + CHAIN_GAP, 30 + CHAIN_GAP)])[None]
    with torch.no_grad():
        two_chains = encoder(node, coords, mask, residue_index=numbers, chain_index=chain)
        laid_out = encoder(node, coords, mask, residue_index=expected)
        one_chain = encoder(node, coords, mask, residue_index=numbers)
        # chain B stored first, then chain A: same features per residue
        order = torch.cat([torch.arange(12, 30), torch.arange(12)])
        swapped = encoder(
            node[:, order], coords[:, order], mask, residue_index=numbers[:, order], chain_index=chain[:, order]
        )
    assert_same(two_chains, laid_out)
    torch.testing.assert_close(swapped.s, two_chains.s[:, order], atol=1e-5, rtol=0)
    assert (two_chains.s - one_chain.s).abs().max() > 1e-2  # the chain break is seen


def test_default_indices_equal_explicit_ones(encoder, protein):
    mask = torch.ones(1, L, dtype=torch.bool)
    with torch.no_grad():
        default = encoder(*protein, mask)
        explicit = encoder(
            *protein, mask, residue_index=torch.arange(L)[None], chain_index=torch.zeros(1, L, dtype=torch.long)
        )
    for name in FIELDS:
        assert torch.equal(getattr(default, name), getattr(explicit, name)), name


@pytest.mark.parametrize(
    ("changes", "error", "message"),
    [
        (
            {"residue_index": torch.arange(L).float()[None]},
            TypeError,
            r"residue_index: expected an integer tensor, got torch.float32",
        ),
        ({"residue_index": torch.arange(L)}, ValueError, r"residue_index: expected shape \[B=1, N=30\], got \[30\]"),
        (
            {"chain_index": torch.full((1, L), L)},
            ValueError,
            r"chain_index: expected chain ids in \[0, 30\) .* got 30 at \(batch, residue\) \(0, 0\)",
        ),
        ({"chain_index": torch.full((1, L), -1)}, ValueError, r"chain_index: expected chain ids in \[0, 30\)"),
    ],
)
def test_bad_indices_are_rejected(encoder, protein, changes, error, message):
    with pytest.raises(error, match=message):
        encoder(*protein, torch.ones(1, L, dtype=torch.bool), **changes)


def test_padding_bounds_as_the_readme_states_them():
    """Right padding and the rest of the batch change nothing; left padding (a slot offset)
    only the fp32 rounding, within the README's bound, about as much as moving the protein."""
    from pathlib import Path

    from ipa_export import IPAEncoder

    root = Path(__file__).parents[1]
    readme = " ".join((root / "README.md").read_text().lower().split())
    assert "right padding and the batch around a protein change nothing (bit-identical)" in readme
    assert "left padding and slot offsets move `s` by fp32 rounding only: ≤ 5e-4 up to 256 residues" in readme
    encoder = IPAEncoder.from_pretrained(root / "checkpoints" / "bindrae-ipa-tiny")
    g = torch.Generator().manual_seed(0)
    length, pad = 256, 11
    node, ca = torch.randn(1, length, 64, generator=g), random_chain(length, g)[None] + 50.0
    mask = torch.ones(1, length, dtype=torch.bool)
    junk_node, junk_ca = torch.randn(1, pad, 64, generator=g), torch.randn(1, pad, 3, generator=g)
    junk_mask = torch.zeros(1, pad, dtype=torch.bool)
    with torch.no_grad():
        alone = encoder(node, ca, mask).s
        right = encoder(torch.cat([node, junk_node], 1), torch.cat([ca, junk_ca], 1), torch.cat([mask, junk_mask], 1))
        left = encoder(torch.cat([junk_node, node], 1), torch.cat([junk_ca, ca], 1), torch.cat([junk_mask, mask], 1))
        moved = encoder(node, ca + torch.tensor([0.37, -0.21, 0.12]), mask).s
    assert torch.equal(right.s[:, :length], alone)
    error = (left.s[:, pad:] - alone).abs().max().item()
    assert 0 < error <= 5e-4
    assert error < 10 * (moved - alone).abs().max().item()  # the same order as a translation of the input
