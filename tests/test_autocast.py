"""Under torch.autocast the encoder keeps its own dtype policy: fp32 weights give fp32
results, attention runs in config.attn_dtype, outputs have documented dtypes."""

from __future__ import annotations

import pytest
import torch
from conftest import make_encoder, random_chain, tiny_config

from ipa_export.model import ipa, low_precision

B, L = 2, 40
FIELDS = ("s", "rotations", "translations", "z_f1", "z_f2")


def inputs():
    g = torch.Generator().manual_seed(3)
    mask = torch.ones(B, L, dtype=torch.bool)
    mask[1, 31:] = False
    coords = torch.stack([random_chain(L, g) for _ in range(B)])
    return torch.randn(B, L, 32, generator=g), coords, mask


@pytest.fixture
def attention_dtypes(monkeypatch):
    """The dtypes attention is computed in, recorded at attend (fp32 and low-precision paths)."""
    seen: list[torch.dtype] = []
    real = ipa.attend

    def spy(q, k, v, key_mask, backend):
        seen.append(q.dtype)
        return real(q, k, v, key_mask, backend)

    for module in (ipa, low_precision):
        monkeypatch.setattr(module, "attend", spy)
    return seen


def test_fp32_export_under_bf16_autocast_equals_fp32(attention_dtypes):
    encoder = make_encoder()
    node, coords, mask = inputs()
    with torch.no_grad():
        expected = encoder(node, coords, mask)
        with torch.autocast("cpu", torch.bfloat16):
            got = encoder(node, coords, mask)
            from_bf16 = encoder(node.bfloat16(), coords, mask)  # low-precision input accepted, cast
        reference_bf16_input = encoder(node.bfloat16().float(), coords, mask)
    for name in FIELDS:
        assert getattr(got, name).dtype == torch.float32, name
        torch.testing.assert_close(getattr(got, name), getattr(expected, name), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(getattr(from_bf16, name), getattr(reference_bf16_input, name), atol=1e-5, rtol=1e-5)
    assert set(attention_dtypes) == {torch.float32}


def test_bf16_attention_is_what_autocast_gets_when_asked_for(attention_dtypes):
    encoder = make_encoder(tiny_config(attn_dtype="bf16"))
    node, coords, mask = inputs()
    with torch.no_grad():
        plain = encoder(node, coords, mask)
        with torch.autocast("cpu", torch.bfloat16):
            autocast = encoder(node, coords, mask)
    assert set(attention_dtypes) == {torch.bfloat16}
    for name in FIELDS:
        assert torch.equal(getattr(autocast, name), getattr(plain, name)), name


def test_output_dtypes_of_a_bf16_model():
    encoder = make_encoder().to(torch.bfloat16)
    node, coords, mask = inputs()
    with torch.no_grad(), torch.autocast("cpu", torch.float16):
        out = encoder(node, coords, mask)  # fp32 input, fp16 autocast: neither changes the policy
    assert [getattr(out, name).dtype for name in FIELDS] == [
        torch.bfloat16,
        torch.float32,
        torch.float32,
        torch.bfloat16,
        torch.bfloat16,
    ]
