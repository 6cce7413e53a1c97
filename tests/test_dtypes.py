"""One table of dtype names: every entry point that takes a dtype accepts the same names."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ipa_export import EncoderConfig, FlashIPAModuleConfig, IPAEncoder, create_flashipa_module
from ipa_export.dtypes import parse_dtype
from ipa_export.errors import InputError
from ipa_export.flash_ipa import InvariantPointAttention, IPAConfig

SHIPPED = Path(__file__).parents[1] / "checkpoints" / "bindrae-ipa-tiny"
NAMES = {
    torch.float32: ["float32", "fp32", "f32", "float", "torch.float32", "FP32", torch.float32],
    torch.bfloat16: ["bfloat16", "bf16", "torch.bfloat16", "BF16", torch.bfloat16],
    torch.float16: ["float16", "fp16", "f16", "half", "torch.float16", torch.float16],
    torch.float64: ["float64", "fp64", "f64", "double", "torch.float64", torch.float64],
}
ATTENTION = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


@pytest.mark.parametrize("dtype", list(NAMES), ids=str)
def test_every_name_parses_and_loads(dtype):
    encoder_dtypes = set()
    for name in NAMES[dtype]:
        assert parse_dtype(name) == dtype
        encoder_dtypes.add(IPAEncoder.from_pretrained(SHIPPED, dtype=name).dtype)
    assert encoder_dtypes == {dtype}


@pytest.mark.parametrize("dtype", list(ATTENTION), ids=str)
def test_attention_dtype_entry_points_take_the_same_names(dtype):
    """EncoderConfig, the BINDRAE adapter config and flash_ipa's IPAConfig store the short name."""
    for name in NAMES[dtype]:
        assert EncoderConfig(attn_dtype=name).attn_dtype == ATTENTION[dtype]
        assert EncoderConfig.from_dict({"attn_dtype": name}, require_all=False).attn_dtype == ATTENTION[dtype]
        module = create_flashipa_module(c_s=32, c_z=16, depth=1, c_hidden=8, no_heads=2, attn_dtype=name)
        assert module.ipa_blocks[0].ipa.attn_dtype == dtype
        ipa = InvariantPointAttention(IPAConfig(c_s=32, c_z=16, c_hidden=8, no_heads=2, attn_dtype=name))
        assert ipa.attn_dtype == dtype
    assert FlashIPAModuleConfig(attn_dtype=ATTENTION[dtype]).to_encoder_config().attn_dtype == ATTENTION[dtype]


@pytest.mark.parametrize("bad", ["fp8", "bfloat17", "int32", "", 32, torch.int64])
def test_unknown_names_are_refused_by_every_entry_point(bad):
    with pytest.raises(InputError, match=r"^dtype: expected a floating torch.dtype or its name \('float32' / "):
        parse_dtype(bad)
    with pytest.raises(InputError, match=r"attn_dtype: expected a floating torch.dtype or its name"):
        EncoderConfig(attn_dtype=bad)
    with pytest.raises(InputError, match=r"attn_dtype: expected a floating torch.dtype or its name"):
        InvariantPointAttention(IPAConfig(attn_dtype=bad))


def test_float64_is_no_attention_dtype():
    with pytest.raises(InputError, match=r"attn_dtype: .*'float16' / 'fp16' / 'f16' / 'half'\), got 'double'"):
        EncoderConfig(attn_dtype="double")
