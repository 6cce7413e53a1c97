"""Precomputed neighbours (``encoder.neighbours`` -> ``forward(..., neighbours=...)``): the same
outputs as the search, and with RBF distance features a continuous function of the
coordinates across neighbour-order changes; checked inputs with errors naming the argument."""

from __future__ import annotations

import pytest
import torch
from conftest import make_encoder, random_chain, tiny_config

from ipa_export.errors import InputError, InputTypeError

B, N = 2, 40
RBF = tiny_config(distance_features="rbf", num_rbf=12)


def protein(seed: int = 0, batch: int = B, length: int = N):
    g = torch.Generator().manual_seed(seed)
    ca = torch.stack([random_chain(length, g) for _ in range(batch)])
    return torch.randn(batch, length, 32, generator=g), ca, torch.ones(batch, length, dtype=torch.bool)


def scan(encoder, node, ca, mask, direction, heights, neighbours=None):
    """Outputs along ``ca + h direction`` for each h, as one batch: (s, z_f1) flattened per step."""
    count = len(heights)
    moved = ca + heights[:, None, None] * direction
    fixed = {} if neighbours is None else {"neighbours": neighbours.expand(count, -1, -1)}
    with torch.no_grad():
        out = encoder(node.expand(count, -1, -1), moved, mask.expand(count, -1), check_ca_spacing=False, **fixed)
    return out.s.flatten(1), out.z_f1.flatten(1)


def test_given_neighbours_reproduce_the_search_exactly():
    encoder = make_encoder()
    node, ca, mask = protein()
    mask[1, 30:] = False
    ca[1, 30:] = float("nan")  # padding may hold anything
    neighbours = encoder.neighbours(ca, mask)
    assert neighbours.shape == (B, N, 10) and neighbours.dtype == torch.int64
    assert (neighbours[1, 30:] == -1).all()
    with torch.no_grad():
        searched, given = encoder(node, ca, mask), encoder(node, ca, mask, neighbours=neighbours)
    for a, b in zip(searched, given, strict=True):
        assert torch.equal(a, b)


def test_a_1001_step_scan_with_fixed_neighbours_has_no_jumps():
    encoder = make_encoder(RBF)
    node, ca, mask = protein(batch=1, length=24)
    direction = torch.nn.functional.normalize(torch.randn(24, 3, generator=torch.Generator().manual_seed(1)), dim=-1)
    heights = torch.linspace(0, 0.5, 1001)  # each residue moves 0.5 Angstrom
    searched = torch.stack([encoder.neighbours(ca + h * direction, mask) for h in heights[::100]])
    assert (searched != searched[:1]).any(-1).sum() > 10  # the scan crosses neighbour-order changes
    for fixed in (None, encoder.neighbours(ca, mask)):
        for values in scan(encoder, node, ca, mask, direction, heights, fixed):
            steps = (values[1:] - values[:-1]).abs().amax(-1)
            ratio = (steps.max() / steps.median()).item()
            if fixed is None:
                assert ratio > 100  # the search: a jump at neighbour-order changes
            else:
                assert ratio < 10, f"largest step {ratio:.1f}x the median with fixed neighbours"


def test_finite_differences_match_autograd_across_a_neighbour_change():
    encoder = make_encoder(RBF).double()  # an fp64 model: layers and geometry in fp64
    node, ca, mask = protein(batch=1)
    node, ca = node.double(), ca.double()
    g = torch.Generator().manual_seed(1)
    direction = torch.nn.functional.normalize(torch.randn(N, 3, generator=g, dtype=torch.float64), dim=-1)
    # a point where the searched neighbours change within +-eps along the direction (bisection)
    eps, low, high = 1e-3, 0.0, 0.5
    start = encoder.neighbours(ca, mask)
    assert not torch.equal(encoder.neighbours(ca + high * direction, mask), start)
    while high - low > eps / 2:
        middle = (low + high) / 2
        low, high = (
            (middle, high) if torch.equal(encoder.neighbours(ca + middle * direction, mask), start) else (low, middle)
        )
    point = ca + (low + high) / 2 * direction
    before, after = (encoder.neighbours(point + t * eps * direction, mask) for t in (-1, 1))
    assert not torch.equal(before, after)
    fixed = encoder.neighbours(point, mask)

    def energy(x: torch.Tensor, **kwargs) -> torch.Tensor:
        out = encoder(node, x, mask, **kwargs)
        return out.s.square().mean() + out.z_f1.square().mean()

    gradient = torch.func.grad(lambda x: energy(x, neighbours=fixed))(point)
    autograd = (gradient * direction).sum()
    with torch.no_grad():
        difference = (
            energy(point + eps * direction, neighbours=fixed) - energy(point - eps * direction, neighbours=fixed)
        ) / (2 * eps)
        searched = (energy(point + eps * direction) - energy(point - eps * direction)) / (2 * eps)
    assert autograd.abs() > 1e-3
    torch.testing.assert_close(difference, autograd, rtol=1e-5, atol=0)  # measured 1.3e-6
    assert (searched - autograd).abs() > 10 * (difference - autograd).abs()  # the search jumps here


def test_vmap_grad_guidance_with_per_sample_neighbours():
    encoder = make_encoder(RBF)
    node, ca, mask = protein()
    neighbours = encoder.neighbours(ca, mask)

    def energy(x, n, m, nb):
        return encoder(n[None], x[None], m[None], neighbours=nb[None]).s.square().mean()

    batched = torch.func.vmap(torch.func.grad(energy))(ca, node, mask, neighbours)
    for b in range(B):
        one = torch.func.grad(energy)(ca[b], node[b], mask[b], neighbours[b])
        torch.testing.assert_close(batched[b], one, atol=1e-5, rtol=1e-4)
    assert batched.abs().max() > 0


def test_trans_sc_needs_its_own_neighbours():
    encoder = make_encoder()
    node, ca, mask = protein()
    sc = ca + 0.5 * torch.randn(ca.shape, generator=torch.Generator().manual_seed(3))
    neighbours, sc_neighbours = encoder.neighbours(ca, mask), encoder.neighbours(sc, mask)
    with pytest.raises(InputError, match=r"^sc_neighbours: required with neighbours= when trans_sc is given"):
        encoder(node, ca, mask, trans_sc=sc, neighbours=neighbours)
    with pytest.raises(InputError, match=r"^sc_neighbours: the neighbours of trans_sc"):
        encoder(node, ca, mask, sc_neighbours=sc_neighbours)
    with torch.no_grad():
        searched = encoder(node, ca, mask, trans_sc=sc)
        given = encoder(node, ca, mask, trans_sc=sc, neighbours=neighbours, sc_neighbours=sc_neighbours)
    assert torch.equal(searched.s, given.s) and torch.equal(searched.z_f2, given.z_f2)


def bad_neighbours(change):
    encoder = make_encoder()
    node, ca, mask = protein()
    mask[1, 35:] = False
    neighbours = change(encoder.neighbours(ca, mask))
    return lambda: encoder(node, ca, mask, neighbours=neighbours)


@pytest.mark.parametrize(
    "change, error, message",
    [
        (lambda n: n[..., :5], InputError, r"^neighbours: expected shape \[B=2, N=40, 10\], got \[2, 40, 5\]"),
        (lambda n: n.int(), InputTypeError, r"^neighbours: expected int64 indices, got torch.int32 \(use .long\(\)\)"),
        (lambda n: n.float(), InputTypeError, r"^neighbours: expected an integer tensor, got torch.float32"),
        (
            lambda n: n.index_put((torch.tensor(0), torch.tensor(3), torch.tensor(2)), torch.tensor(40)),
            InputError,
            r"^neighbours: expected at valid residues the indices of other valid residues, or -1 for no neighbour; "
            r"got 40 \(outside \[-1, 40\)\) at \(batch, residue, slot\) \(0, 3, 2\)\. "
            r"Compute them with encoder.neighbours\(coordinates, node_mask\)",
        ),
        (
            lambda n: n.index_put((torch.tensor(0), torch.tensor(3), torch.tensor(0)), torch.tensor(-2)),
            InputError,
            r"got -2 \(outside",
        ),
        (
            lambda n: n.index_put((torch.tensor(0), torch.tensor(7), torch.tensor(1)), torch.tensor(7)),
            InputError,
            r"got 7 \(the residue itself\) at \(batch, residue, slot\) \(0, 7, 1\)",
        ),
        (
            lambda n: n.index_put((torch.tensor(1), torch.tensor(4), torch.tensor(9)), torch.tensor(37)),
            InputError,
            r"got 37 \(a padded residue \(node_mask False\)\) at \(batch, residue, slot\) \(1, 4, 9\)",
        ),
    ],
    ids=["k", "int32", "float", "too-large", "below-minus-one", "itself", "padded"],
)
def test_bad_neighbours_raise_naming_the_argument(change, error, message):
    with pytest.raises(error, match=message):
        bad_neighbours(change)()


def test_padded_rows_and_empty_slots_of_given_neighbours():
    encoder = make_encoder()
    node, ca, mask = protein()
    mask[1, 35:] = False
    neighbours = encoder.neighbours(ca, mask)
    garbage = neighbours.clone()
    garbage[1, 35:] = 999  # rows of padded residues are ignored
    with torch.no_grad():
        assert torch.equal(encoder(node, ca, mask, neighbours=garbage).s, encoder(node, ca, mask).s)
        emptied = neighbours.clone()
        emptied[0, :, 5:] = -1  # -1: no neighbour in that slot, as for a short protein
        assert not torch.equal(encoder(node, ca, mask, neighbours=emptied).s[0], encoder(node, ca, mask).s[0])


def test_modes_without_neighbour_features_refuse_neighbours():
    encoder = make_encoder(tiny_config(mode="flash_no_bias", z_factor_rank=0))
    node, ca, mask = protein()
    with pytest.raises(InputError, match=r"^neighbours: only mode 'flash_1d_bias' has neighbour features"):
        encoder.neighbours(ca, mask)
    with pytest.raises(InputError, match=r"^neighbours: only mode 'flash_1d_bias'"):
        encoder(node, ca, mask, neighbours=torch.zeros(B, N, 10, dtype=torch.long))


def test_the_edge_embedder_takes_and_checks_neighbours_too():
    encoder = make_encoder(RBF)
    node, ca, mask = protein()
    neighbours = encoder.edge_embedder.neighbours(ca, mask)
    assert torch.equal(neighbours, encoder.neighbours(ca, mask))
    with torch.no_grad():
        searched = encoder.edge_embedder(node, ca, mask)
        given = encoder.edge_embedder(node, ca, mask, neighbours=neighbours)
    assert all(torch.equal(a, b) for a, b in zip(searched, given, strict=True))
    with pytest.raises(InputError, match=r"^neighbours: expected shape \[B=2, N=40, 10\], got \[40, 10\]"):
        encoder.edge_embedder(node, ca, mask, neighbours=neighbours[0])


@pytest.mark.slow  # a Dynamo trace: ~2 CPU-seconds
def test_given_neighbours_trace_without_graph_breaks():
    torch._dynamo.reset()
    encoder = make_encoder(RBF)
    node, ca, mask = protein()
    with torch.no_grad():
        explanation = torch._dynamo.explain(encoder)(node, ca, mask, neighbours=encoder.neighbours(ca, mask))
    torch._dynamo.reset()
    assert explanation.graph_break_count == 0, explanation.break_reasons
