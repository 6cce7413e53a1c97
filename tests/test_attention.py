"""Every attention backend agrees with the dense one; bf16 stays within its tolerance."""

from __future__ import annotations

import pytest
import torch
from conftest import make_encoder, random_chain, tiny_config

from ipa_export.model import attention
from ipa_export.model.attention import _sdpa, attend, flash_attn_available, resolve_backend

# Tolerance of bf16 attention against fp32 on a small randomised model whose outputs have std ~1:
# mean |error| of s below 5e-3 and max below 0.05 (measured on four seeds: 2.2-4.1e-3 and
# 0.014-0.069 for the max of the four; 0.2.0, one anchor per protein: 4.1-7.2e-3, 0.033-0.080).
BF16_MEAN_ATOL, BF16_MAX_ATOL = 5e-3, 0.05


def batch(config, lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = max(lengths)
    coords = torch.zeros(len(lengths), n, 3)
    mask = torch.zeros(len(lengths), n, dtype=torch.bool)
    for b, length in enumerate(lengths):
        coords[b, :length] = random_chain(length, g)
        mask[b, :length] = True
    return torch.randn(len(lengths), n, config.c_s, generator=g), coords, mask


@pytest.mark.parametrize("rank", [0, 1, 2, 4, 16])
def test_sdpa_matches_dense(rank):
    mode = "flash_1d_bias" if rank else "flash_no_bias"
    config = tiny_config(z_factor_rank=rank, mode=mode)
    dense = make_encoder(config.replace(attention="dense"), seed=rank)
    sdpa = make_encoder(config.replace(attention="sdpa"), seed=rank)
    inputs = batch(config, [37, 20])
    with torch.no_grad():
        a, b = dense(*inputs), sdpa(*inputs)
    for field in a._fields:
        torch.testing.assert_close(getattr(b, field), getattr(a, field), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("chunks", [1, 3])
def test_value_chunking_is_exact(chunks):
    """Splitting the value into chunks (the path used past the 256 head-size limit) changes nothing."""
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 3, 30, 20, generator=g), torch.randn(2, 3, 30, 20, generator=g)
    v = torch.randn(2, 3, 30, 700, generator=g)
    mask = torch.ones(2, 30, dtype=torch.bool)
    mask[1, 21:] = False
    dense = attend(q, k, v, mask, "dense")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.Tensor, "is_cuda", property(lambda self: True))  # take the CUDA chunking path on CPU
        chunked = attend(q, k, v, mask, "sdpa")
    torch.testing.assert_close(chunked, dense, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("width_qk", "width_v"), [(13, 21), (29, 11), (155, 228)])
def test_sdpa_with_head_sizes_off_multiples_of_8_matches_dense(width_qk, width_v):
    """On the CPU the fused kernel takes any head size: q/k or v, whichever is narrower, is
    padded to the other's width only (no rounding to 8), and the result is the dense one."""
    g = torch.Generator().manual_seed(1)
    q, k = (torch.randn(2, 3, 40, width_qk, generator=g) / width_qk**0.5 for _ in range(2))
    v = torch.randn(2, 3, 40, width_v, generator=g)
    mask = torch.ones(2, 40, dtype=torch.bool)
    mask[0, 29:] = False
    seen = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(attention, "_sdpa", lambda *args: seen.append(args[2]) or _sdpa(*args))
        out = attend(q, k, v, mask, "sdpa")
    assert [x.shape[-1] for x in seen] == [max(width_qk, width_v)]
    if width_v >= width_qk:
        assert seen[0].data_ptr() == v.data_ptr()  # the wider value is passed on as it is, not copied
    assert out.shape == v.shape
    torch.testing.assert_close(out, attend(q, k, v, mask, "dense"), atol=1e-5, rtol=1e-5)


def test_bf16_attention_within_documented_tolerance():
    config = tiny_config()
    fp32 = make_encoder(config, seed=3)
    bf16 = make_encoder(config.replace(attn_dtype="bf16"), seed=3)
    node_embed, coords, mask = batch(config, [40, 25], seed=1)
    with torch.no_grad():
        a = fp32(node_embed, coords, mask)
        b = bf16(node_embed, coords, mask)
        far = bf16(node_embed, coords + 200.0, mask)  # a protein far from the origin
    assert b.s.dtype == torch.float32 and b.rotations.dtype == torch.float32  # frames stay fp32
    error = (a.s - b.s)[mask].abs()
    assert 0 < error.mean() < BF16_MEAN_ATOL and error.max() < BF16_MAX_ATOL
    # Points are taken relative to anchors inside the protein, so the bf16 error does not grow
    # with the distance from the origin (uncentred, it grows ~10x at 200 A).
    far_error = (a.s - far.s)[mask].abs()
    assert far_error.mean() < 1.5 * error.mean() and far_error.max() < BF16_MAX_ATOL
    torch.testing.assert_close(b.z_f1, a.z_f1)  # the edge embedder does not use attention


def test_auto_resolves_to_sdpa_on_cpu():
    assert resolve_backend("auto", torch.device("cpu"), "bf16", needs_grad=False) == "sdpa"
    assert make_encoder().attention_backend() == "sdpa"


@pytest.mark.skipif(flash_attn_available(), reason="flash-attn is installed")
def test_flash_attn_backend_explains_what_is_missing():
    with pytest.raises(RuntimeError, match=r"needs flash-attn installed .* got device=cpu"):
        resolve_backend("flash_attn", torch.device("cpu"), "bf16", needs_grad=False)


@pytest.mark.skipif(not (torch.cuda.is_available() and flash_attn_available()), reason="needs CUDA and flash-attn")
@pytest.mark.parametrize("rank", [2, 16])
def test_flash_attn_matches_dense_on_cuda(rank):  # pragma: no cover - needs a GPU
    config = tiny_config(z_factor_rank=rank, attn_dtype="bf16", c_p=256)
    dense = make_encoder(config.replace(attention="dense"), seed=0).cuda()
    flash = make_encoder(config.replace(attention="flash_attn"), seed=0).cuda()
    inputs = [x.cuda() for x in batch(config, [60, 33])]
    with torch.no_grad():
        a, b = dense(*inputs), flash(*inputs)
    assert (b.s - a.s).abs().mean() < BF16_MEAN_ATOL


@pytest.mark.parametrize("dtype, atol", [(torch.float64, 1e-4), (torch.bfloat16, 0.3)])
def test_model_dtype_policy(dtype, atol):
    """Layers run in the model's dtype; frames, points and distances in fp32 (fp64 for fp64)."""
    config = tiny_config()
    reference = make_encoder(config, seed=4)
    model = make_encoder(config, seed=4).to(dtype)
    node_embed, coords, mask = batch(config, [30, 18], seed=2)
    with torch.no_grad():
        a = reference(node_embed, coords, mask)
        b = model(node_embed.to(dtype), coords, mask)
    geometry = torch.float64 if dtype == torch.float64 else torch.float32
    assert b.s.dtype == b.z_f1.dtype == dtype and b.rotations.dtype == b.translations.dtype == geometry
    assert (a.s - b.s.float()).abs().mean() < atol / 10 and (a.translations - b.translations).abs().max() < atol
