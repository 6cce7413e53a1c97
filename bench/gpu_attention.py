"""CUDA timing of the attention backends: sdpa vs dense (and flash_attn where installed).

IPAEncoder forward (eager, eval, no_grad, batch 1) at the usage document's config
(c_s 384, c_p 128, depth 3) for N in {512, 2048, 8192}, ranks 2 and 16, attention in fp32
and bf16. Prints one row per case: median time, peak CUDA memory, and max |s - s_dense_fp32|.

    python bench/gpu_attention.py [--lengths 512 2048 8192] [--out FILE]
"""

from __future__ import annotations

import argparse
import statistics
import sys

import torch

from ipa_export import EncoderConfig, IPAEncoder
from ipa_export.model.attention import flash_attn_available


def chain(n: int, generator: torch.Generator) -> torch.Tensor:
    steps = torch.nn.functional.normalize(torch.randn(1, n, 3, generator=generator), dim=-1)
    steps = steps * (3.42 + 0.76 * torch.rand(1, n, 1, generator=generator))
    x = steps.cumsum(1)
    return x - x.mean(1, keepdim=True)


def time_forward(model, inputs, repeats: int = 5) -> tuple[float, float]:
    for _ in range(2):
        model(*inputs)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        model(*inputs)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times), torch.cuda.max_memory_allocated() / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 2048, 8192])
    parser.add_argument("--out")
    args = parser.parse_args()
    lines = [
        f"# {torch.cuda.get_device_name()}, torch {torch.__version__}, flash-attn installed: {flash_attn_available()}",
        "# IPAEncoder eager forward, eval + no_grad, batch 1, c_s 384, c_p 128, depth 3; median of 5 after 2 warm-ups",
        f"{'N':>6} {'rank':>4} {'attn':>5} {'backend':>10} {'ms':>9} {'peak MiB':>9} {'max|s - dense fp32|':>20}",
    ]
    print("\n".join(lines), flush=True)
    backends = ["dense", "sdpa"] + (["flash_attn"] if flash_attn_available() else [])
    for n in args.lengths:
        g = torch.Generator().manual_seed(n)
        inputs = (
            torch.randn(1, n, 384, generator=g).cuda(),
            chain(n, g).cuda(),
            torch.ones(1, n, dtype=torch.bool).cuda(),
        )
        for rank in (2, 16):
            reference = None
            for attn_dtype in ("fp32", "bf16"):
                for backend in backends:
                    if backend == "flash_attn" and attn_dtype == "fp32":
                        continue
                    torch.manual_seed(0)
                    config = EncoderConfig(z_factor_rank=rank, attention=backend, attn_dtype=attn_dtype)
                    model = IPAEncoder(config).cuda().eval()
                    with torch.no_grad():
                        for p in model.parameters():  # no zero-initialised final layers
                            p.add_(0.02 * torch.randn_like(p))
                        try:
                            ms, peak = time_forward(model, inputs)
                            s = model(*inputs).s
                        except torch.OutOfMemoryError:
                            ms, peak, s = float("nan"), float("nan"), None
                    if reference is None and s is not None:
                        reference = s
                    error = (s - reference).abs().max().item() if s is not None else float("nan")
                    line = f"{n:>6} {rank:>4} {attn_dtype:>5} {backend:>10} {ms:>9.2f} {peak:>9.0f} {error:>20.2e}"
                    lines.append(line)
                    print(line, flush=True)
                    del model
                    torch.cuda.empty_cache()
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    if not torch.cuda.is_available():
        sys.exit("needs a CUDA device")
    main()
