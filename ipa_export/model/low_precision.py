"""IPA attention in bf16 / fp16 with the point terms kept near fp32 accuracy.

Rounding q, k, v to 8 (bf16) or 11 (fp16) bits loses IPA's point terms in two places
(``bench/results/precision.txt``):

1. Logits. ``w q^.k^`` and ``w |k^|^2 / 2`` are of order ``w |x|^2`` while the logits are
   their differences.
2. Value points and outputs. They are absolute positions (of order ``|x|``), rounded, while the
   update needs each output relative to its own residue: a few Angstrom.

Three remedies, each exact in exact arithmetic:

- Blocks. Queries are attended ``QUERY_BLOCK`` residues at a time. Within a block, every point is taken
  relative to the block's anchor (the mean position of its residues). The logits are unchanged:
  ``-w/2 |q^ - k^|^2`` does not depend on the origin.
- Compensation (:func:`point_terms`). Each point coordinate and norm term is split into a high
  part (rounded to the attention dtype) and a low part (the remainder, rounded). The cross terms
  become extra q/k channels:

      q_aug = [..., (w q^)_hi, (w q^)_hi, (w q^)_lo, 1,    1   ]
      k_aug = [..., k^_hi,     k^_lo,     k^_hi,     n_hi, n_lo]    (n = -w |k^|^2 / 2)

  so ``q.k`` carries the point terms to ~16 (bf16) or ~22 (fp16) bits. The kernels accumulate
  the products in fp32.
- Value anchors. A value point ``x_j = t_j + R_j v_j`` enters the values as ``R_j v_j`` (small)
  and as ``t_j - c_m`` for each ``ANCHOR_SPAN``-residue sub-block m of the query block (its anchor
  ``c_m``): 3 channels per sub-block. Each query reads the channels of its own sub-block, and
  attention weights sum to one, so its output is ``sum_j a_ij x_j - c_m``, relative to an anchor
  at most ``ANCHOR_SPAN`` residues away. Keys and anchors are rounded to a common grid (a power of two,
  :func:`_grid_step`) so that ``t_j - c_m`` is exact in the attention dtype; the remainders (at
  most half a step, the same for every sub-block) take 3 more channels.

The pair bias ``b1.b2`` is compensated as the point terms are (:func:`compensated_product`, in
ipa.py). What is left is mostly the kernels' own rounding of their outputs (and of the softmax
weights) to the attention dtype, which no change of the inputs removes
(``bench/results/precision.txt``).

With ``QUERY_BLOCK = 64`` and ``ANCHOR_SPAN = 2`` a block adds 99 value channels (32 sub-blocks); on CUDA a
value head past the kernels' 256 channels is attended in two chunks (:func:`.attention.attend`).
Each block needs its own keys and values: on the CPU one block is attended per kernel call,
reusing one k/v buffer; on CUDA blocks go in groups, as extra batch entries (:data:`GROUP_KEYS`),
so that the number of kernel launches does not grow with N.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ..execution import transforms_active
from .attention import attend, concat_padded, head_limited, head_sizes, padded_value_width
from .frames import masked_mean

QUERY_BLOCK = 64  #: queries per block (one anchor, its own keys and values)
ANCHOR_SPAN = 2  #: residues per value anchor
#: per device type, blocks are attended in one kernel call while blocks x batch x N stays below
#: this; elsewhere one block a call (on the CPU fewer copies beat fewer calls, on CUDA the reverse)
GROUP_KEYS = {"cuda": 1 << 15}
# int32 masks keeping the sign, the exponent and the 7 (bf16) / 10 (fp16) leading mantissa bits
_HIGH_BITS = {torch.bfloat16: -(1 << 16), torch.float16: -(1 << 13)}


def point_terms(
    q_points: torch.Tensor, k_points: torch.Tensor, k_norms: torch.Tensor, dtype: torch.dtype
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The point channels of q_aug and k_aug in ``dtype``, compensated when it is bf16/fp16.

    q_points = w q^ [..., S, H, 3 P_qk]; k_points = k^ [..., N, H, 3 P_qk]; k_norms =
    -w |k^|^2 / 2 [..., N, H, 1]. Returns lists to concatenate: ``[q_points, 1]`` and
    ``[k_points, k_norms]`` (unchanged) for fp32 or wider, else ``[q_hi, q_hi, q_lo, 1, 1]`` and
    ``[k_hi, k_lo, k_hi, n_hi, n_lo]`` (high = rounded to ``dtype``, low = the rounded remainder).
    """
    if torch.finfo(dtype).bits >= 32:  # the inputs' own precision
        return [q_points, torch.ones_like(q_points[..., :1])], [k_points, k_norms]
    one = torch.ones_like(q_points[..., :1], dtype=dtype)
    q_terms, k_terms = compensated_product(q_points, k_points, dtype)
    return [*q_terms, one, one], [*k_terms, *_split(k_norms, dtype)]


def compensated_product(
    q: torch.Tensor, k: torch.Tensor, dtype: torch.dtype
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """q [..., E], k [..., E] -> ``[q_hi, q_hi, q_lo]``, ``[k_hi, k_lo, k_hi]`` in ``dtype`` (bf16 /
    fp16; see :func:`_split`), whose dot product is ``q.k`` to about twice the dtype's bits."""
    (q_hi, q_lo), (k_hi, k_lo) = _split(q, dtype), _split(k, dtype)
    return [q_hi, q_hi, q_lo], [k_hi, k_lo, k_hi]


def _split(x: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 ``x`` -> ``(hi, lo)`` in ``dtype`` with ``hi + lo = x`` to twice the precision.

    ``hi`` is ``x`` with the mantissa bits that ``dtype`` lacks cleared, so it converts exactly. A
    bit mask rather than ``x.to(dtype).float()``: inductor may drop that round trip in a fused
    kernel (``emulate_precision_casts`` is off by default), which would leave ``lo = 0``.
    """
    exact = x.detach().float().contiguous()
    high = (exact.view(torch.int32) & _HIGH_BITS[dtype]).view(torch.float32)
    hi = x + (high - exact)  # == high exactly; derivative 1, so hi.k_hi + ... has q.k's derivatives
    return hi.to(dtype), (x - hi).to(dtype)


def _grid_step(key_offsets: torch.Tensor, sub_offsets: torch.Tensor, mask: torch.Tensor, dtype: torch.dtype):
    """The smallest power of two (at least 2^-10 Angstrom) ``h`` with every difference of a key's and a
    sub-block's grid point at most ``2^p h`` (p = ``dtype``'s significand bits), so exact in ``dtype``.

    key_offsets [..., N, 3], sub_offsets [..., M, 3] (Angstrom), mask [..., N] bool -> [..., 1, 1].
    """
    reach = key_offsets.detach().abs().masked_fill(~mask[..., None], 0).amax((-1, -2))
    reach = reach + sub_offsets.detach().abs().amax((-1, -2))
    limit = 2.0 ** (1 - math.log2(torch.finfo(dtype).eps)) - 1
    return torch.exp2(torch.ceil(torch.log2(reach / limit)).clamp(min=-10))[..., None, None]


def _on_grid(x: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    """``x`` rounded to a multiple of ``step``, with derivative 1 (as :func:`_split`'s high part)."""
    return x + (torch.round(x.detach() / step) * step - x.detach())


def _written(target: torch.Tensor, start: int, parts: list[torch.Tensor]) -> torch.Tensor:
    """``target`` with ``parts`` copied (cast, broadcast) into its last axis from ``start`` on."""
    for part in parts:
        target[..., start : start + part.shape[-1]] = part
        start += part.shape[-1]
    return target


def anchored_attention(
    q_scalar: torch.Tensor,
    k_scalar: torch.Tensor,
    q_points: torch.Tensor,
    k_points: torch.Tensor,
    weight: torch.Tensor,
    v_scalar: torch.Tensor,
    v_offsets: torch.Tensor,
    translations: torch.Tensor,
    mask: torch.Tensor,
    dtype: torch.dtype,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """IPA attention in ``dtype`` (bf16/fp16), in blocks of :data:`QUERY_BLOCK` queries (module docstring).

    q_scalar, k_scalar [B, N, H, E]: the non-point channels of q_aug and k_aug; q_points,
    k_points [B, N, H, P_qk, 3] (Angstrom, global); weight [H, 1] the point weights w_h;
    v_scalar [B, N, H, E_v]: the non-point values; v_offsets [B, N, H, P_v, 3]: the value
    points minus their residue's translation; translations [B, N, 3]; mask [B, N] bool.
    Returns fp32 ``(o_scalar [B, N, H, E_v], o_points [B, N, H, P_v, 3])``, the value-point
    outputs minus the query residue's translation (global orientation).

    Under ``torch.compile`` it is the custom op ``ipa_export::anchored_attention`` (its block
    loop would otherwise specialise the graph to each length), with a backward that recomputes.
    """
    if torch.compiler.is_compiling():
        return _anchored_op(
            q_scalar, k_scalar, q_points, k_points, weight, v_scalar, v_offsets, translations, mask, dtype, backend
        )
    batch, length = q_scalar.shape[:2]
    limited = head_limited(backend, q_scalar.device)
    v_fixed = torch.cat([v_scalar, v_offsets.flatten(-2)], dim=-1).to(dtype)
    sub = min(ANCHOR_SPAN, length)
    size = min(QUERY_BLOCK, -(-length // sub) * sub)  # queries per block, a multiple of sub
    blocks, sub_count = -(-length // size), size // sub
    padded = blocks * size - length  # queries past the end, in the last block

    # Anchors: the mean position of each block's and sub-block's valid residues.
    queries = F.pad(translations, (0, 0, 0, padded)).unflatten(1, (blocks, size))  # [B, nb, S, 3]
    valid = F.pad(mask, (0, padded)).unflatten(1, (blocks, size))  # [B, nb, S]
    anchors = masked_mean(queries, valid)[:, :, None]  # [B, nb, 1, 3]
    sub_anchors = masked_mean(
        queries.unflatten(2, (sub_count, sub)), valid.unflatten(2, (sub_count, sub))
    )  # [B, nb, M, 3]
    own = torch.arange(size, device=q_scalar.device) // sub  # each query's sub-block
    q_points = F.pad(q_points, (0, 0, 0, 0, 0, 0, 0, padded)).unflatten(1, (blocks, size))  # [B, nb, S, H, P, 3]
    q_fixed = F.pad(q_scalar, (0, 0, 0, 0, 0, padded)).unflatten(1, (blocks, size)).to(dtype)  # [B, nb, S, H, E]

    qk_width = q_scalar.shape[-1] + 9 * q_points.shape[-2] + 2  # see point_terms
    v_width = v_fixed.shape[-1] + 3 * sub_count + 3  # see attend_blocks
    head, chunk = head_sizes(qk_width, v_width, limited)
    v_total = padded_value_width(v_width, head, chunk)
    group = max(1, min(blocks, GROUP_KEYS.get(q_scalar.device.type, 0) // (batch * length)))  # blocks a call
    # k_aug and v_aug for a group of blocks, holding the channels that are the same for every
    # block; each group writes the rest (into the same tensors when no gradient is recorded).
    # Heads first: the kernel reads keys and values ~1.4x faster so, with few queries a call.
    k_template = concat_padded([k_scalar.to(dtype)], head).transpose(1, 2)[:, None].expand(-1, group, -1, -1, -1)
    v_template = (
        concat_padded([v_fixed], v_total).transpose(1, 2)[:, None].expand(-1, group, -1, -1, -1)
    )  # [B, G, H, N, .]
    recording = torch.is_grad_enabled()
    if not recording:
        k_template, v_template = k_template.clone(), v_template.clone()

    def attend_blocks(start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Blocks start..stop-1 (G of them) -> [B, G S, H, E_v] and [B, G S, H, P_v, 3]."""
        part, count = slice(start, stop), stop - start
        anchor = anchors[:, part, :, None, None]  # [B, G, 1, 1, 1, 3]
        q_rel = (weight[..., None] * (q_points[:, part] - anchor)).flatten(-2)  # w (q^ - c) [B, G, S, H, 3P]
        k_rel = k_points[:, None] - anchor  # [B, G, N, H, P, 3]
        k_norms = -0.5 * weight * k_rel.square().sum((-1, -2))[..., None]  # [B, G, N, H, 1]
        q_terms, k_terms = point_terms(q_rel, k_rel.flatten(-2), k_norms, dtype)
        # Key positions relative to each sub-block's anchor, exact in dtype: both on a grid, the
        # remainder (at most half a step, the same for every sub-block) in 3 more channels.
        centre = anchors[:, part]  # [B, G, 1, 3]
        key_offsets, sub_offsets = translations[:, None] - centre, sub_anchors[:, part] - centre
        step = _grid_step(key_offsets, sub_offsets, mask[:, None], dtype)  # [B, G, 1, 1]
        key_grid, sub_grid = _on_grid(key_offsets, step), _on_grid(sub_offsets, step)
        to_anchors = key_grid[:, :, :, None] - sub_grid[:, :, None]  # [B, G, N, M, 3]
        remainders = key_offsets - key_grid  # [B, G, N, 3]

        q_aug = concat_padded([q_fixed[:, part], *q_terms], head).flatten(0, 1).transpose(1, 2)
        k_aug, v_aug = (x[:, :count].clone() if recording else x[:, :count] for x in (k_template, v_template))
        k_aug = _written(k_aug, k_scalar.shape[-1], [term.transpose(2, 3) for term in k_terms])
        v_aug = _written(v_aug, v_fixed.shape[-1], [to_anchors.flatten(-2)[:, :, None], remainders[:, :, None]])
        key_mask = mask[:, None].expand(-1, count, -1).flatten(0, 1)
        out = attend(q_aug, k_aug.flatten(0, 1), v_aug.flatten(0, 1), key_mask, backend)
        out = out.transpose(1, 2).unflatten(0, (batch, count)).float()  # [B, G, S, H, E_v]
        scalar, offsets, anchored, remainder = out[..., :v_width].split(
            [v_scalar.shape[-1], v_offsets.shape[-2] * 3, 3 * sub_count, 3], -1
        )
        anchored = anchored.unflatten(-1, (sub_count, 3)).take_along_dim(own[None, None, :, None, None, None], dim=-2)
        to_own = centre + sub_grid[:, :, own] - queries[:, part]  # [B, G, S, 3]: own grid anchor minus the query
        anchored = anchored.squeeze(-2) + remainder + to_own[:, :, :, None]  # [B, G, S, H, 3]
        return scalar.flatten(1, 2), (offsets.unflatten(-1, (-1, 3)) + anchored[..., None, :]).flatten(1, 2)

    run = attend_blocks
    if recording and not transforms_active():
        # Recompute each group in the backward: its own keys and values would otherwise all be
        # kept for it, O(N^2 / QUERY_BLOCK) memory.
        run = functools.partial(checkpoint, attend_blocks, use_reentrant=False)
    outputs = [run(start, min(start + group, blocks)) for start in range(0, blocks, group)]
    return tuple(torch.cat(parts, dim=1)[:, :length].contiguous() for parts in zip(*outputs, strict=True))


_TENSOR_ARGS = 8  # the differentiable inputs of anchored_attention, in order (then mask, dtype, backend)


_anchored_op = torch.library.custom_op("ipa_export::anchored_attention", mutates_args=())(anchored_attention)


@_anchored_op.register_fake
def _(q_scalar, k_scalar, q_points, k_points, weight, v_scalar, v_offsets, translations, mask, dtype, backend):
    scalar, points = v_scalar.new_empty(v_scalar.shape), v_offsets.new_empty(v_offsets.shape)
    return scalar.float(), points.float()


@torch.library.custom_op("ipa_export::anchored_attention_backward", mutates_args=())
def _anchored_backward(
    grad_scalar: torch.Tensor,
    grad_points: torch.Tensor,
    inputs: list[torch.Tensor],
    mask: torch.Tensor,
    dtype: torch.dtype,
) -> list[torch.Tensor]:
    """Gradients of the tensor inputs of :func:`anchored_attention`, by recomputing it under
    ``torch.func.vjp`` (a custom op's body runs below autograd and without grad mode, where a plain
    ``backward`` records nothing), with the ``dense`` backend (whose ops all have derivatives)."""
    _, vjp = torch.func.vjp(lambda *tensors: anchored_attention(*tensors, mask, dtype, "dense"), *inputs)
    # contiguous copies: some are views of the incoming gradients (an op's outputs may not alias)
    return [grad.clone(memory_format=torch.contiguous_format) for grad in vjp((grad_scalar, grad_points))]


@_anchored_backward.register_fake
def _(grad_scalar, grad_points, inputs, mask, dtype):
    return [x.new_empty(x.shape) for x in inputs]


def _setup_context(ctx, inputs, output) -> None:
    ctx.save_for_backward(*inputs[: _TENSOR_ARGS + 1])
    ctx.dtype = inputs[_TENSOR_ARGS + 1]


def _backward(ctx, grad_scalar, grad_points):
    *tensors, mask = ctx.saved_tensors
    grads = _anchored_backward(grad_scalar.contiguous(), grad_points.contiguous(), tensors, mask, ctx.dtype)
    return (*grads, None, None, None)  # mask, dtype, backend


_anchored_op.register_autograd(_backward, setup_context=_setup_context)
