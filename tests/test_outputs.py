"""Richer outputs: per-block hidden states, the pooled embedding, contiguous tensors."""

from __future__ import annotations

import torch
from conftest import make_encoder, random_chain

B, L = 3, 36
FIELDS = ("s", "rotations", "translations", "z_f1", "z_f2")


def inputs():
    g = torch.Generator().manual_seed(5)
    lengths = (36, 20, 11)
    mask = torch.arange(L)[None] < torch.tensor(lengths)[:, None]
    coords = torch.stack([random_chain(L, g) for _ in range(B)])
    return torch.randn(B, L, 32, generator=g), coords, mask, lengths


def test_hidden_states_are_the_blocks_outputs():
    encoder = make_encoder()
    node, coords, mask, _ = inputs()
    captured = []
    hooks = [
        block.register_forward_hook(lambda m, a, out: captured.append(out)) for block in encoder.ipa_stack.ipa_blocks
    ]
    with torch.no_grad():
        out = encoder(node, coords, mask, output_hidden_states=True)
        plain = encoder(node, coords, mask)
    for hook in hooks:
        hook.remove()
    hidden = out.hidden_states
    assert len(hidden.s) == len(hidden.rotations) == len(hidden.translations) == encoder.config.depth
    valid = mask[..., None]
    for i, (s, (rotations, translations)) in enumerate(captured[: encoder.config.depth]):
        torch.testing.assert_close(hidden.s[i], torch.where(valid, s, 0.0), atol=0, rtol=0)
        torch.testing.assert_close(hidden.rotations[i][mask], rotations[mask], atol=0, rtol=0)
        torch.testing.assert_close(hidden.translations[i][mask], translations[mask], atol=0, rtol=0)
    # the last block's s is s before the final norm; its frames are the output frames
    torch.testing.assert_close(out.s[mask], encoder.ipa_stack.final_norm(hidden.s[-1])[mask])
    assert torch.equal(hidden.rotations[-1], out.rotations) and torch.equal(hidden.translations[-1], out.translations)
    for name in FIELDS:  # asking for hidden states changes no output
        assert torch.equal(getattr(out, name), getattr(plain, name)), name


def test_pooled_is_the_mean_over_valid_residues():
    encoder = make_encoder()
    node, coords, mask, lengths = inputs()
    with torch.no_grad():
        out = encoder(node, coords, mask)
    expected = torch.stack([out.s[b, :n].mean(0) for b, n in enumerate(lengths)])
    torch.testing.assert_close(out.pooled(mask), expected)
    with torch.no_grad():
        alone = encoder(node[1:2, :20], coords[1:2, :20], mask[1:2, :20])
    torch.testing.assert_close(alone.pooled(mask[1:2, :20])[0], expected[1], atol=1e-5, rtol=0)


def test_outputs_are_contiguous():
    encoder = make_encoder()
    node, coords, mask, _ = inputs()
    with torch.no_grad():
        out = encoder(node, coords, mask, output_hidden_states=True)
    tensors = [getattr(out, name) for name in FIELDS] + [t for group in out.hidden_states for t in group]
    assert all(t.is_contiguous() for t in tensors)


def test_gradient_checkpointing_gives_the_same_gradients():
    encoder = make_encoder().train()  # dropout on: the recomputation replays the same masks
    node, coords, mask, _ = inputs()
    node.requires_grad_(True)
    grads = []
    for enable in (False, True):
        encoder.gradient_checkpointing_enable(enable)
        torch.manual_seed(0)
        out = encoder(node, coords, mask)
        (out.s.square().sum() + out.translations.square().sum()).backward()
        grads.append([node.grad.clone()] + [p.grad.clone() for p in encoder.parameters()])
        node.grad = None
        encoder.zero_grad()
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
