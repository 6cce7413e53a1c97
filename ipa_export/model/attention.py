"""Softmax attention over augmented queries, keys and values, behind one switch.

Every backend computes ``softmax(q k^T + mask) v`` with softmax scale 1, over the valid
keys of each protein:

- ``dense``: explicit [B, H, N, N] logits; exact, O(N^2) memory, for checking.
- ``sdpa``: ``torch.nn.functional.scaled_dot_product_attention``; q, k and v are zero-padded
  to one head size so the fused kernels apply (the wider of q/k and v; on CUDA rounded up to a
  multiple of 8, which its kernels need, the CPU kernel does not). On CUDA the value is split
  into chunks of at most 256 channels, each attended with the same q and k: exact, since
  the softmax weights do not depend on the value.
- ``flash_attn``: flash-attn's kernel (CUDA, fp16/bf16, inference), registered as a custom
  op. Keys are reordered valid-first and their counts passed as ``cache_seqlens``, so
  nothing leaves the device and ``torch.compile`` sees one node.
- ``auto``: ``flash_attn`` where it applies, else ``sdpa``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from ..config import EncoderConfig
from ..errors import InputError, UnsupportedError
from ..execution import transforms_active

try:  # optional CUDA extra
    from flash_attn import flash_attn_with_kvcache
except ImportError:  # pragma: no cover - depends on the environment
    flash_attn_with_kvcache = None

FLASH_HEAD_DIM_LIMIT = 256


def flash_attn_available() -> bool:
    return flash_attn_with_kvcache is not None


def resolve_backend(backend: str, device: torch.device, attn_dtype: str, needs_grad: bool) -> str:
    """The backend that ``backend`` means for this device, dtype and grad mode. Under
    :func:`~ipa_export.execution.transforms_active`, ``auto`` and ``sdpa`` mean ``dense``: the fused kernels have no
    forward-mode derivative, batching rule or double backward, the plain ops all of them."""
    if backend in ("auto", "sdpa") and transforms_active():
        return "dense"
    flash_ok = flash_attn_available() and device.type == "cuda" and attn_dtype in ("fp16", "bf16") and not needs_grad
    if backend == "auto":
        return "flash_attn" if flash_ok else "sdpa"
    if backend == "flash_attn" and not flash_ok:
        raise UnsupportedError(
            "attention='flash_attn' needs flash-attn installed (pip install 'ipa-export[cuda]'), a CUDA device, "
            f"attn_dtype 'fp16' or 'bf16' and no gradient; got device={device.type}, attn_dtype={attn_dtype!r}, "
            f"flash-attn installed={flash_attn_available()}, grad={needs_grad}"
        )
    return backend


def backend_for(config: EncoderConfig, device: torch.device) -> str:
    """The backend that ``config.attention`` means with ``config.attn_dtype`` on ``device`` in the
    current grad mode (:func:`resolve_backend`): what every entry point runs the stack with."""
    return resolve_backend(config.attention, device, config.attn_dtype, torch.is_grad_enabled())


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor, backend: str) -> torch.Tensor:
    """q, k [B, H, N, E]; v [B, H, N, E_v]; key_mask [B, N] bool -> [B, H, N, E_v].

    ``backend`` is a resolved name (see :func:`resolve_backend`). Computes in q's dtype, with
    the logits in fp32 as the fused kernels accumulate them (the compensated low-precision
    q/k of :mod:`.low_precision` rely on it).
    """
    if backend == "dense":
        wide = torch.promote_types(q.dtype, torch.float32)
        logits = (q.to(wide) @ k.to(wide).transpose(-1, -2)).masked_fill(~key_mask[:, None, None, :], float("-inf"))
        return torch.softmax(logits, dim=-1).to(v.dtype) @ v
    head, chunk = head_sizes(q.shape[-1], v.shape[-1], head_limited(backend, q.device))
    q, k = _pad(q, head), _pad(k, head)
    if backend == "flash_attn":
        order = torch.argsort((~key_mask).to(torch.uint8), dim=-1, stable=True)[:, None, :, None]  # valid keys first
        k = k.gather(2, order.expand(-1, k.shape[1], -1, k.shape[3]))
        v = v.gather(2, order.expand(-1, v.shape[1], -1, v.shape[3]))
        lengths = key_mask.sum(-1, dtype=torch.int32)

        def run(value: torch.Tensor) -> torch.Tensor:
            return _flash(q.transpose(1, 2), k.transpose(1, 2), value.transpose(1, 2), lengths).transpose(1, 2)

    else:
        mask = key_mask[:, None, None, :]

        differentiable_twice = torch.is_grad_enabled() and not torch.compiler.is_compiling()
        sdpa = _TwiceDifferentiableSdpa.apply if differentiable_twice else _sdpa

        def run(value: torch.Tensor) -> torch.Tensor:
            return sdpa(q, k, value, mask)

    outputs = [run(_pad(vc, head))[..., : vc.shape[-1]] for vc in v.split(chunk, dim=-1)]
    return outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=-1)


def head_limited(backend: str, device: torch.device) -> bool:
    """Whether the kernel ``backend`` runs on ``device`` has CUDA's head-size limit (and alignment)."""
    return backend == "flash_attn" or device.type == "cuda"


def head_sizes(qk_width: int, v_width: int, limited: bool) -> tuple[int, int]:
    """``(head, chunk)``: the q/k head size and value chunk width :func:`attend` pads to, for
    kernels with CUDA's head-size limit when ``limited`` (:func:`head_limited`). Inputs already
    that wide are not copied."""
    limit = FLASH_HEAD_DIM_LIMIT if limited else None
    chunks = 1 if limit is None else math.ceil(v_width / limit)
    align = 1 if limit is None else 8  # no copy of v where it is the wider one (CPU)
    chunk = _round_up(math.ceil(v_width / chunks), align)
    head = max(_round_up(qk_width, align), chunk)
    if limit is not None and head > limit:
        raise InputError(f"query/key head size {qk_width} exceeds the kernel limit {limit}")
    return head, chunk


def padded_value_width(v_width: int, head: int, chunk: int) -> int:
    """The width a value of ``v_width`` channels has once :func:`attend` has padded it (``head``,
    ``chunk`` from :func:`head_sizes`): written at that width, attend copies nothing."""
    return head if chunk >= v_width else -(-v_width // chunk) * chunk


def concat_padded(parts: list[torch.Tensor], width: int) -> torch.Tensor:
    """Concatenate ``parts`` on the last axis, zero-padded to ``width`` (e.g. a :func:`head_sizes`
    size, so that :func:`attend` need not copy it again)."""
    used = sum(part.shape[-1] for part in parts)
    return torch.cat([*parts, parts[0].new_zeros(*parts[0].shape[:-1], width - used)], dim=-1)


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=1.0)


class _TwiceDifferentiableSdpa(torch.autograd.Function):
    """``scaled_dot_product_attention`` whose backward is differentiable again.

    The fused CPU kernels have no second derivative. The backward recomputes the attention:
    with the fused kernel for a plain backward (its memory-lean gradient), and with plain
    differentiable ops when autograd records the backward itself (``create_graph=True``), so
    double backward works on the default backend."""

    @staticmethod
    def forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return _sdpa(q, k, v, mask)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        ctx.save_for_backward(*inputs)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        q, k, v, mask = ctx.saved_tensors
        wanted = [i for i in range(3) if ctx.needs_input_grad[i]]
        if torch.is_grad_enabled():  # create_graph=True: gradients that are themselves differentiable
            inputs = [(q, k, v)[i] for i in wanted]
            # in fp32, as the fused kernels accumulate (bf16 logits would lose the point terms)
            wide = torch.promote_types(q.dtype, torch.float32)  # fp32, fp64 for fp64 inputs
            logits = (q.to(wide) @ k.to(wide).transpose(-1, -2)).masked_fill(~mask, float("-inf"))
            out = torch.softmax(logits, dim=-1) @ v.to(wide)
            grads = torch.autograd.grad(out, inputs, grad.to(wide), create_graph=True, allow_unused=True)
        else:
            with torch.enable_grad():
                inputs = [(q, k, v)[i].detach().requires_grad_() for i in wanted]
                leaves = iter(inputs)
                args = [next(leaves) if i in wanted else x for i, x in enumerate((q, k, v))]
                grads = torch.autograd.grad(_sdpa(*args, mask), inputs, grad)
        by_input = dict(zip(wanted, grads, strict=True))
        return by_input.get(0), by_input.get(1), by_input.get(2), None


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _pad(x: torch.Tensor, size: int) -> torch.Tensor:
    return F.pad(x, (0, size - x.shape[-1])) if x.shape[-1] != size else x


if flash_attn_with_kvcache is not None:  # pragma: no cover - needs CUDA and flash-attn

    @torch.library.custom_op("ipa_export::flash_attn_padded", mutates_args=())
    def _flash(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """q, k, v [B, N, H, E] (contiguous), keys valid-first; lengths [B] int32 valid keys."""
        return flash_attn_with_kvcache(
            q.contiguous(), k.contiguous(), v.contiguous(), cache_seqlens=lengths, softmax_scale=1.0
        )

    @_flash.register_fake
    def _(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        return torch.empty_like(q)

else:

    def _flash(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        raise UnsupportedError("flash-attn is not installed: pip install 'ipa-export[cuda]'")
