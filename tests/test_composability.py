"""An encoder inside a larger model: state dicts shared by plain and compiled encoders,
one graph for calls with and without trans_sc, and one graph for every batch size inside a
caller's own torch.compile."""

from __future__ import annotations

import pytest
import torch
import torch._dynamo
from conftest import make_encoder, random_chain
from torch import nn
from torch._dynamo.testing import CompileCounter

from ipa_export.model.compiling import COMPILE_BOUND, compile_encoder, mark_batch_dynamic


class Parent(nn.Module):
    def __init__(self, encoder):
        super().__init__()
        self.embed = nn.Linear(32, 32)
        self.encoder = encoder

    def forward(self, node, coords, mask):
        return self.encoder(self.embed(node), coords, mask).s.sum(-1)


def batch(size: int, length: int = 24, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    coords = torch.stack([random_chain(length, g) for _ in range(size)])
    return torch.randn(size, length, 32, generator=g), coords, torch.ones(size, length, dtype=torch.bool)


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_compiled_encoder_keeps_the_plain_state_dict_keys():
    plain, other = make_encoder(seed=0), make_encoder(seed=1)
    compiled = compile_encoder(other)
    assert list(compiled.state_dict()) == list(plain.state_dict())
    compiled.load_state_dict(plain.state_dict(), strict=True)
    assert all(torch.equal(a, b) for a, b in zip(other.state_dict().values(), plain.state_dict().values(), strict=True))
    # models holding either encoder exchange state dicts
    holder_plain, holder_compiled = Parent(make_encoder(seed=2)), Parent(compile_encoder(make_encoder(seed=3)))
    assert list(holder_plain.state_dict()) == list(holder_compiled.state_dict())
    holder_compiled.load_state_dict(holder_plain.state_dict(), strict=True)
    holder_plain.load_state_dict(holder_compiled.state_dict(), strict=True)
    state = holder_compiled.state_dict()
    assert all(torch.equal(v, state[k]) for k, v in holder_plain.state_dict().items())


@pytest.mark.slow  # Dynamo traces the encoder: ~10 s on a small CPU
def test_one_graph_with_and_without_trans_sc():
    counter = CompileCounter()
    encoder = make_encoder()
    compiled = compile_encoder(encoder, backend=counter)
    node, coords, mask = batch(2)
    with torch.no_grad():
        without = compiled(node, coords, mask)
        with_ = compiled(node, coords, mask, trans_sc=coords + 1.0)
        expected = encoder(node, coords, mask, trans_sc=coords + 1.0)
        eager = encoder(node, coords, mask)
    assert counter.frame_count == 1
    torch.testing.assert_close(without.s, eager.s, atol=1e-4, rtol=0)
    torch.testing.assert_close(with_.s, expected.s, atol=1e-4, rtol=0)


@pytest.mark.slow  # Dynamo traces the encoder: ~10 s on a small CPU
def test_outer_compile_one_graph_for_every_batch_size():
    counter = CompileCounter()
    parent = Parent(make_encoder()).eval()
    compiled = torch.compile(parent, backend=counter, fullgraph=True, dynamic=True)
    with torch.no_grad():
        for size in (1, 2, 3, 1):
            args = batch(size, seed=size)
            torch.testing.assert_close(compiled(*mark_batch_dynamic(*args)), parent(*args), atol=1e-4, rtol=0)
    assert counter.frame_count == COMPILE_BOUND
