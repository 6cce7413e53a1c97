"""torch.func transforms, forward-mode AD and higher-order gradients through the encoder,
against plain autograd and finite differences; the smooth (RBF) distance features."""

from __future__ import annotations

import pytest
import torch
from conftest import make_encoder, random_chain, tiny_config
from torch.nn.attention import SDPBackend, sdpa_kernel

from ipa_export.model.knn import knn

L = 16


def protein(seed: int = 0, batch: int = 1):
    g = torch.Generator().manual_seed(seed)
    coords = torch.stack([random_chain(L, g) for _ in range(batch)])
    return torch.randn(batch, L, 32, generator=g), coords, torch.ones(batch, L, dtype=torch.bool)


def directional_difference(f, x: torch.Tensor, direction: torch.Tensor, eps: float) -> torch.Tensor:
    """(f(x + h v) - f(x - h v)) / 2h, Richardson-extrapolated from h = eps and eps / 2
    (error O(eps^4): the randomised models are strongly curved)."""
    with torch.no_grad():
        central = [(f(x + h * direction) - f(x - h * direction)) / (2 * h) for h in (eps, eps / 2)]
    return (4 * central[1] - central[0]) / 3


def test_vmap_over_proteins_equals_the_batched_call():
    encoder = make_encoder()
    node, coords, mask = protein(batch=3)

    def one(n, c, m):
        out = encoder(n[None], c[None], m[None])
        return out.s[0], out.translations[0], out.z_f1[0]

    with torch.no_grad():
        mapped = torch.func.vmap(one)(node, coords, mask)
        batched = encoder(node, coords, mask)
    for got, expected in zip(mapped, (batched.s, batched.translations, batched.z_f1), strict=True):
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_value_checks_are_skipped_under_vmap_but_shape_checks_stay():
    encoder = make_encoder()
    node, coords, mask = protein(batch=2)
    coords[1, 3] = float("nan")
    with pytest.raises(ValueError, match="translations: expected finite values"):
        encoder(node, coords, mask)  # eager: the value check runs
    out = torch.func.vmap(lambda n, c, m: encoder(n[None], c[None], m[None]).s[0])(node, coords, mask)
    assert torch.isfinite(out[0]).all()  # protein 0 is untouched by protein 1's NaN
    with pytest.raises(ValueError, match=r"translations: expected shape \[B=1, N=16, 3\], got \[1, 16, 4\]"):
        torch.func.vmap(lambda n, c, m: encoder(n[None], c[None], m[None]).s[0])(node, torch.zeros(2, L, 4), mask)


def loss(encoder, node, coords, mask):
    out = encoder(node, coords, mask)
    weights = torch.linspace(-1, 1, out.s.shape[-1])
    return (out.s * weights).sum() + 0.1 * out.translations.square().sum()


def test_func_grad_and_jacrev_match_plain_autograd():
    encoder = make_encoder()
    node, coords, mask = protein()
    grad_node, grad_coords = torch.func.grad(lambda n, c: loss(encoder, n, c, mask), argnums=(0, 1))(node, coords)
    n, c = node.clone().requires_grad_(), coords.clone().requires_grad_()
    expected = torch.autograd.grad(loss(encoder, n, c, mask), (n, c))  # fused sdpa kernel
    torch.testing.assert_close(grad_node, expected[0], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(grad_coords, expected[1], atol=1e-5, rtol=1e-4)

    def head(n):
        return encoder(n, coords, mask).s[0, :4, :3]

    jacobian = torch.func.jacrev(head)(node)  # [4, 3, 1, L, 32]
    torch.testing.assert_close(jacobian, torch.autograd.functional.jacobian(head, node), atol=1e-5, rtol=1e-4)


def test_jvp_matches_finite_differences():
    encoder = make_encoder().double()  # layers in fp64: the differences resolve the derivative
    node, coords, mask = protein()
    node = node.double()
    direction = torch.randn(node.shape, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    f = lambda n: encoder(n, coords, mask).s  # noqa: E731
    _, tangent = torch.func.jvp(f, (node,), (direction,))
    difference = directional_difference(f, node, direction, 1e-3)
    torch.testing.assert_close(tangent, difference, atol=5e-3, rtol=1e-2)  # fp32 geometry: ~2e-3 noise
    # adjoint identity with plain reverse mode: <J v, w> = <v, J^T w>
    w = torch.randn(tangent.shape, generator=torch.Generator().manual_seed(10), dtype=torch.float64)
    n = node.clone().requires_grad_()
    (vjp,) = torch.autograd.grad((f(n) * w).sum(), n)
    torch.testing.assert_close((vjp * direction).sum(), (tangent * w).sum(), atol=1e-4, rtol=1e-5)
    with torch.autograd.forward_ad.dual_level():  # forward-mode AD outside torch.func, too
        dual = torch.autograd.forward_ad.make_dual(node, direction)
        torch.testing.assert_close(torch.autograd.forward_ad.unpack_dual(f(dual)).tangent, tangent)


def test_second_order_gradients():
    """Hessian-vector products three ways: torch.func (jvp of grad), plain autograd with
    create_graph=True on the dense backend, on sdpa (its default kernel and the math kernel),
    and finite differences."""
    node, coords, mask = protein()
    node = node.double()
    direction = torch.randn(node.shape, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    encoder = make_encoder().double()  # layers in fp64 for the finite differences
    grad = torch.func.grad(lambda n: loss(encoder, n, coords, mask))
    _, hvp = torch.func.jvp(grad, (node,), (direction,))
    assert hvp.abs().max() > 1.0
    for attention, context in (("dense", None), ("sdpa", None), ("sdpa", sdpa_kernel(SDPBackend.MATH))):
        plain = make_encoder(tiny_config(attention=attention)).double()
        n = node.clone().requires_grad_()
        with context or torch.enable_grad():
            (g,) = torch.autograd.grad(loss(plain, n, coords, mask), n, create_graph=True)
            (second,) = torch.autograd.grad((g * direction).sum(), n)
        torch.testing.assert_close(second, hvp, atol=1e-3, rtol=1e-4)

    # finite differences of the gradient, on one block and s; the step stays below the edge
    # MLP's ReLU switches along this direction (the gradient jumps there) and above the
    # fp32 geometry's noise
    single = make_encoder(tiny_config(depth=1)).double()
    weights = torch.linspace(-1, 1, 32, dtype=torch.float64)
    grad = torch.func.grad(lambda n: (single(n, coords, mask).s * weights).sum())
    _, hvp = torch.func.jvp(grad, (node,), (direction,))
    eps = 3e-4
    difference = (grad(node + eps * direction) - grad(node - eps * direction)) / (2 * eps)
    assert hvp.abs().max() > 1.0
    torch.testing.assert_close(hvp, difference, atol=2e-2, rtol=1e-2)


def test_rbf_distance_features_are_differentiable_in_the_coordinates():
    config = tiny_config(distance_features="rbf", num_rbf=12)
    encoder = make_encoder(config).double()  # layers in fp64 for the finite differences
    node, coords, mask = protein(seed=4)
    node = node.double()
    direction = torch.randn(coords.shape, generator=torch.Generator().manual_seed(3))
    eps = 2e-4  # below the edge MLP's ReLU switches along this direction, above the fp32 noise
    neighbours = [knn(coords + t * eps * direction, mask, config.knn_k)[1] for t in (-1, 0, 1)]
    assert all(torch.equal(n, neighbours[1]) for n in neighbours)  # the step swaps no neighbours

    def edge(c):
        return encoder.edge_embedder(node, c, mask)[0]

    # the frames and points stay fp32: more noise in the differences of s than of the edge path
    for f, atol in ((edge, 5e-3), (lambda c: encoder(node, c, mask).s, 2e-2)):
        _, tangent = torch.func.jvp(f, (coords,), (direction,))
        with torch.no_grad():
            difference = (f(coords + eps * direction) - f(coords - eps * direction)) / (2 * eps)
        assert tangent.abs().max() > 0.1
        torch.testing.assert_close(tangent, difference, atol=atol, rtol=1e-2)
    # the one-hot distogram gives the edge path no gradient
    one_hot = make_encoder().double()
    _, tangent = torch.func.jvp(lambda c: one_hot.edge_embedder(node, c, mask)[0], (coords,), (direction,))
    assert torch.equal(tangent, torch.zeros_like(tangent))


def test_gradient_checkpointing_composes_with_torch_func():
    encoder = make_encoder()
    node, coords, mask = protein(batch=2)
    direction = torch.randn(coords.shape, generator=torch.Generator().manual_seed(5))

    def energy(x: torch.Tensor) -> torch.Tensor:
        out = encoder(node, x, mask)
        return out.s.square().mean() + out.translations.square().mean()

    def per_protein(x: torch.Tensor, n: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        return encoder(n[None], x[None], m[None]).s.square().mean()

    results = {}
    for checkpointing in (False, True):
        encoder.gradient_checkpointing_enable(checkpointing)
        results[checkpointing] = (
            torch.func.grad(energy)(coords),
            torch.func.vmap(torch.func.grad(per_protein))(coords, node, mask),
            torch.func.jvp(torch.func.grad(energy), (coords,), (direction,))[1],
        )
    for off, on in zip(results[False], results[True], strict=True):
        assert off.abs().max() > 0
        torch.testing.assert_close(on, off, rtol=0, atol=0)
    # plain autograd still recomputes (sdpa rather than the dense kernel: rounding differs)
    calls = []
    encoder.ipa_stack.ipa_blocks[0].register_forward_pre_hook(lambda *_: calls.append(1))
    x = coords.clone().requires_grad_(True)
    energy(x).backward()
    assert len(calls) == 2  # the forward, and the recomputation in the backward
    torch.testing.assert_close(x.grad, results[False][0], rtol=1e-4, atol=1e-5)
