"""A loaded encoder is frozen: it stays in eval mode without gradients under its own or a
parent's ``.train()`` (warning once) until ``unfreeze()``; ``freeze()`` goes back."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from conftest import make_encoder, random_chain, tiny_config

from ipa_export import FrozenModuleWarning, IPAEncoder

B, N = 2, 30


@pytest.fixture
def export(tmp_path):
    make_encoder(tiny_config(dropout=0.5)).save_pretrained(tmp_path / "export")
    return tmp_path / "export"


def two_calls(module) -> tuple[torch.Tensor, torch.Tensor]:
    """``s`` of two calls on the same inputs (the same in eval mode, different with dropout)."""
    g = torch.Generator().manual_seed(0)
    x, ca = torch.randn(B, N, 32, generator=g), torch.stack([random_chain(N, g) for _ in range(B)])
    mask = torch.ones(B, N, dtype=torch.bool)
    with torch.no_grad():
        return module(x, ca, mask).s, module(x, ca, mask).s


def test_train_on_a_loaded_encoder_warns_once_and_keeps_eval_mode(export):
    encoder = IPAEncoder.from_pretrained(export)
    assert encoder.is_frozen and not encoder.training
    with pytest.warns(FrozenModuleWarning, match=r"is frozen .* call \.unfreeze\(\) .* trainable=True") as caught:
        encoder.train()
        encoder.train()
    assert len(caught) == 1
    assert not any(m.training for m in encoder.modules())
    assert not any(p.requires_grad for p in encoder.parameters())
    first, second = two_calls(encoder)
    torch.testing.assert_close(first, second, rtol=0, atol=0)  # dropout (p = 0.5) stays off


def test_a_parents_train_does_not_unfreeze(export):
    parent = torch.nn.ModuleDict({"encoder": IPAEncoder.from_pretrained(export), "head": torch.nn.Linear(32, 1)})
    with pytest.warns(FrozenModuleWarning):
        parent.train()
    assert parent.training and parent["head"].training
    assert not any(m.training for m in parent["encoder"].modules())


def test_unfreeze_then_freeze_again(export):
    encoder = IPAEncoder.from_pretrained(export)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FrozenModuleWarning)
        encoder.unfreeze().train()
    assert not encoder.is_frozen and all(m.training for m in encoder.modules())
    assert all(p.requires_grad for p in encoder.parameters())
    first, second = two_calls(encoder)
    assert (first - second).abs().max() > 0.1  # dropout is on
    encoder.freeze()
    assert encoder.is_frozen and not any(m.training for m in encoder.modules())
    assert not any(p.requires_grad for p in encoder.parameters())
    with pytest.warns(FrozenModuleWarning):
        encoder.train()
    assert not encoder.training


def test_trainable_load(export):
    encoder = IPAEncoder.from_pretrained(export, trainable=True)
    assert not encoder.is_frozen and not encoder.training and all(p.requires_grad for p in encoder.parameters())
    with warnings.catch_warnings():
        warnings.simplefilter("error", FrozenModuleWarning)
        encoder.train()
    assert encoder.training


def test_a_new_encoder_is_not_frozen():
    encoder = IPAEncoder(tiny_config())
    with warnings.catch_warnings():
        warnings.simplefilter("error", FrozenModuleWarning)
        encoder.train()
    assert not encoder.is_frozen and encoder.training


@pytest.mark.parametrize("thaw", ["parent", "encoder", "parameter"])
def test_requires_grad_on_a_parent_keeps_the_encoder_frozen(export, thaw):
    encoder = IPAEncoder.from_pretrained(export)
    parent = torch.nn.ModuleDict({"encoder": encoder, "head": torch.nn.Linear(32, 1)})
    before = {k: v.clone() for k, v in encoder.state_dict().items()}
    with pytest.warns(FrozenModuleWarning, match=r"requires_grad_\(True\) .* call \.unfreeze\(\) first") as caught:
        if thaw == "parent":
            parent.requires_grad_(True)
        elif thaw == "encoder":
            encoder.requires_grad_(True)
        else:
            next(encoder.parameters()).requires_grad = True
        optimizer = torch.optim.AdamW(parent.parameters(), lr=0.1, weight_decay=0.1)
        head_before = parent["head"].weight.clone()
        g = torch.Generator().manual_seed(0)
        for _ in range(3):
            x, ca = torch.randn(B, N, 32, generator=g), torch.stack([random_chain(N, g) for _ in range(B)])
            node = x.requires_grad_(True)  # gradients flow through the frozen encoder to its inputs
            loss = parent["head"](encoder(node, ca, torch.ones(B, N, dtype=torch.bool)).s).square().mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            assert node.grad is not None and node.grad.abs().max() > 0
    assert len([w for w in caught if issubclass(w.category, FrozenModuleWarning)]) == 1
    assert caught[0].filename == __file__
    assert encoder.is_frozen and not any(p.requires_grad for p in encoder.parameters())
    assert all(torch.equal(v, before[k]) for k, v in encoder.state_dict().items())
    assert not torch.equal(parent["head"].weight, head_before)


def test_unfreeze_then_requires_grad_selects_what_trains(export):
    encoder = IPAEncoder.from_pretrained(export).unfreeze()
    with warnings.catch_warnings():
        warnings.simplefilter("error", FrozenModuleWarning)
        encoder.requires_grad_(False)
        encoder.ipa_stack.final_norm.requires_grad_(True)
        encoder(
            torch.randn(1, N, 32),
            random_chain(N, torch.Generator().manual_seed(0))[None],
            torch.ones(1, N, dtype=torch.bool),
        )
    assert [n for n, p in encoder.named_parameters() if p.requires_grad] == [
        "ipa_stack.final_norm.weight",
        "ipa_stack.final_norm.bias",
    ]


def test_print_says_whether_the_encoder_is_frozen_and_from_pretrained_lists_its_options():
    import inspect

    from ipa_export import IPAEncoder

    encoder = IPAEncoder.from_pretrained(Path(__file__).parents[1] / "checkpoints" / "bindrae-ipa-tiny")
    assert str(encoder).splitlines()[:2] == ["IPAEncoder(", "  frozen=True"]
    assert str(encoder.unfreeze()).splitlines()[1] == "  frozen=False"
    parameters = inspect.signature(IPAEncoder.from_pretrained).parameters
    assert {"revision", "device", "dtype", "expected", "trainable", "attention", "compile"} <= parameters.keys()
    assert not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
