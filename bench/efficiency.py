"""Arithmetic efficiency of the encoder forward: achieved GFLOP/s over a same-run fp32 GEMM.

    python bench/efficiency.py                                   # N = 128, 256, 1024, 4096, 10000
    python bench/efficiency.py --sizes 128,256 --out /tmp/e.txt

Usage document config (c_s 384, c_p 128, rank 2, depth 3), eval + no_grad, fp32, ``sdpa``,
batch ``ceil(2048 / N)`` so that B * N >= 2048. FLOPs are those actually computed: every matrix
product (linear layers, ``bmm``/``einsum``, counted by ``torch.utils.flop_counter``) plus the
attention as run, ``2 B H N^2 (E_qk + E_v)`` with the zero-padded head sizes of the fused
kernel (``torch.utils.flop_counter`` has no formula for the CPU kernel; one is registered here).
Elementwise work (softmax, norms, activations) is not counted.

The reference is a square fp32 GEMM (``--gemm`` size, default 2048) timed right before each N,
so that both see the same machine load: the ratio column is encoder GFLOP/s / GEMM GFLOP/s.
Times are the fastest of ``--repeats`` forwards after the (untimed) counting forward; the first
size gets one more untimed forward.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

# _common first: it sets OMP_WAIT_POLICY before torch loads.
import _common  # noqa: E402, F401
import torch  # noqa: E402
from _common import USAGE_CONFIG, cpu_pressure, make_inputs  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from ipa_export import EncoderConfig, IPAEncoder  # noqa: E402


def _sdpa_cpu_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    """q @ k^T and p @ v of the CPU fused kernel: 2 B H N_q N_k (E_qk + E_v)."""
    batch, heads, n_q, e_qk = query_shape
    n_k, e_v = key_shape[-2], value_shape[-1]
    return 2 * batch * heads * n_q * n_k * (e_qk + e_v)


CUSTOM_FLOPS = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_cpu_flops}


def gemm_gflops(size: int, repeats: int = 3) -> float:
    """Best-of-``repeats`` GFLOP/s of a [size, size] @ [size, size] fp32 matmul."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best / 1e9


def forward_flops(model: IPAEncoder, inputs) -> tuple[int, int]:
    """(all counted FLOPs, attention FLOPs) of one forward."""
    with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=CUSTOM_FLOPS) as counter:
        model(*inputs)
    per_op = counter.get_flop_counts()["Global"]
    return counter.get_total_flops(), sum(v for op, v in per_op.items() if "scaled_dot_product" in str(op))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="128,256,1024,4096,10000")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--gemm", type=int, default=2048, help="size of the reference square GEMM")
    p.add_argument("--out", type=Path, help="also write the table to this file")
    args = p.parse_args(argv)

    torch.manual_seed(0)
    model = IPAEncoder(EncoderConfig(**USAGE_CONFIG, attention="sdpa")).eval().requires_grad_(False)
    lines = [
        "IPAEncoder forward efficiency: eager, sdpa, fp32, c_s=384 c_p=128 rank=2 depth=3, eval/no_grad; "
        f"CPU, {torch.get_num_threads()} threads, torch {torch.__version__}",
        f"{'N':>6} {'B':>3} {'GFLOP':>8} {'attn %':>6} {'seconds':>8} {'GFLOP/s':>8} {'GEMM GFLOP/s':>12} "
        f"{'ratio':>6}  CPU pressure %",
    ]
    print("\n".join(lines), flush=True)
    for i, n in enumerate(int(x) for x in args.sizes.split(",")):
        batch = math.ceil(2048 / n)
        inputs = make_inputs(n, batch=batch)
        flops, attention = forward_flops(model, inputs)  # also the warm-up
        with torch.no_grad():
            if i == 0:
                model(*inputs)
            reference = gemm_gflops(args.gemm)
            best = math.inf
            for _ in range(args.repeats):
                start = time.perf_counter()
                model(*inputs)
                best = min(best, time.perf_counter() - start)
        achieved = flops / best / 1e9
        line = (
            f"{n:6d} {batch:3d} {flops / 1e9:8.1f} {attention / flops:6.0%} {best:8.3f} {achieved:8.1f} "
            f"{reference:12.1f} {achieved / reference:6.0%}  {cpu_pressure() or ''}"
        )
        lines.append(line)
        print(line, flush=True)
    if args.out:
        args.out.write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
