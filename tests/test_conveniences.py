"""What users of transformers and timm reach for: num_parameters, device, dtype, string
dtypes and the ``torch_dtype`` alias, and outputs by key."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import random_chain

from ipa_export import EncoderConfig, IPAEncoder

SHIPPED = Path(__file__).parents[1] / "checkpoints" / "bindrae-ipa-tiny"


def test_num_parameters():
    with torch.device("meta"):
        encoder = IPAEncoder(EncoderConfig(num_residue_types=21))
    # The IPA stack has the usage document's 9,958,146; plus the edge embedder and 21 x 384 embeddings.
    edge = sum(p.numel() for p in encoder.edge_embedder.parameters())
    assert encoder.num_parameters() == 9_958_146 + edge + 21 * 384
    assert encoder.num_parameters(exclude_embeddings=True) == 9_958_146 + edge
    assert encoder.num_parameters(only_trainable=True) == encoder.num_parameters()


def test_num_parameters_of_a_loaded_export():
    encoder = IPAEncoder.from_pretrained(SHIPPED)
    assert encoder.num_parameters() == 353_964  # what `ipa-export inspect` reads from the header
    assert encoder.num_parameters(only_trainable=True) == 0  # frozen
    assert encoder.unfreeze().num_parameters(only_trainable=True) == 353_964


@pytest.mark.parametrize("value", ["bfloat16", "bf16", "torch.bfloat16", torch.bfloat16])
@pytest.mark.parametrize("keyword", ["dtype", "torch_dtype"])
def test_dtype_accepts_names_and_the_torch_dtype_alias(keyword, value):
    encoder = IPAEncoder.from_pretrained(SHIPPED, **{keyword: value})
    assert encoder.dtype == torch.bfloat16 and {p.dtype for p in encoder.parameters()} == {torch.bfloat16}
    assert encoder.device == torch.device("cpu")


def test_dtype_auto_keeps_the_stored_dtype():
    assert IPAEncoder.from_pretrained(SHIPPED, dtype="auto").dtype == torch.float32


def test_unknown_dtype():
    with pytest.raises(ValueError) as error:
        IPAEncoder.from_pretrained(SHIPPED, dtype="bfloat17")
    assert str(error.value) == (
        "dtype: expected a floating torch.dtype or its name ('float32' / 'fp32' / 'f32' / 'float', "
        "'bfloat16' / 'bf16', 'float16' / 'fp16' / 'f16' / 'half', 'float64' / 'fp64' / 'f64' / 'double', "
        "or 'auto' for the stored dtype), got 'bfloat17'"
    )
    with pytest.raises(ValueError, match=r"^dtype: .* got torch.int64$"):
        IPAEncoder.from_pretrained(SHIPPED, dtype=torch.int64)


def test_dtype_and_torch_dtype_that_disagree():
    with pytest.raises(ValueError, match=r"^torch_dtype: an alias of dtype; got dtype='float32' and torch_dtype="):
        IPAEncoder.from_pretrained(SHIPPED, dtype="float32", torch_dtype="bfloat16")
    assert IPAEncoder.from_pretrained(SHIPPED, dtype="bf16", torch_dtype=torch.bfloat16).dtype == torch.bfloat16


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_cuda_device_without_a_gpu():
    with pytest.raises(ValueError) as error:
        IPAEncoder.from_pretrained(SHIPPED, device="cuda")
    message = str(error.value)
    assert message.startswith("device: 'cuda' is not available here (torch.cuda.is_available() is False")
    assert message.endswith("pass device='cpu', or run on a machine (and torch build) with that device")


def test_invalid_device():
    with pytest.raises(
        ValueError, match=r"^device: expected a torch.device or a string like 'cpu' or 'cuda:0', got 'gpu0'$"
    ):
        IPAEncoder.from_pretrained(SHIPPED, device="gpu0")


def test_inputs_on_another_device_than_the_encoder():
    encoder = IPAEncoder.from_pretrained(SHIPPED).to("meta")
    assert encoder.device == torch.device("meta")
    g = torch.Generator().manual_seed(0)
    x, ca, mask = torch.randn(1, 20, 64), random_chain(20, g)[None], torch.ones(1, 20, dtype=torch.bool)
    with pytest.raises(ValueError) as error:
        encoder(x, ca, mask)
    assert str(error.value) == (
        "node_embed: on device cpu, but the encoder's parameters are on meta; "
        "move the inputs with .to(encoder.device) (or the encoder with encoder.to(device))"
    )


def test_outputs_by_key():
    encoder = IPAEncoder.from_pretrained(SHIPPED)
    g = torch.Generator().manual_seed(0)
    inputs = (torch.randn(1, 20, 64, generator=g), random_chain(20, g)[None], torch.ones(1, 20, dtype=torch.bool))
    with torch.no_grad():
        out = encoder(*inputs)
        hidden = encoder(*inputs, output_hidden_states=True)
    assert list(out.keys()) == ["s", "rotations", "translations", "z_f1", "z_f2"]
    assert all(out[key] is getattr(out, key) for key in out.keys())
    assert [k for k, _ in out.items()] == list(out.keys()) and all(
        a is b for a, b in zip(out.values(), out, strict=True)
    )
    assert out[0] is out.s and len(out[1:3]) == 2  # still a tuple
    with pytest.raises(KeyError, match="'S': not an output; outputs are s, rotations, translations, z_f1, z_f2"):
        out["S"]
    assert list(hidden.keys())[-1] == "hidden_states" and hidden["hidden_states"] is hidden.hidden_states
