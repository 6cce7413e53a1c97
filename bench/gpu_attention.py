"""CUDA timing and error of the attention backends and of low-precision attention.

IPAEncoder forward (eager, eval, no_grad, batch 1) at the usage document's config
(c_s 384, c_p 128, depth 3) for N in {512, 2048, 8192}, ranks 2 and 16: attention in fp32, and in
bf16 as shipped (``anchored``) and as before (``compensated``: one block and one anchor per
protein, as 0.2.0; ``plain``: point terms rounded once), on every backend (dense, sdpa, and
flash_attn where installed). Prints one row per case: median time, peak CUDA memory, and
max |s - s_dense_fp32|. Then the compiled/eager latency at N = 256 (fp32 and bf16, sdpa).

    python bench/gpu_attention.py [--lengths 512 2048 8192] [--out FILE]
    python bench/gpu_attention.py --device cpu --lengths 64 --compile-n 0   # a smoke run anywhere
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from precision import LOW_PRECISION_VARIANTS  # noqa: E402

from ipa_export import EncoderConfig, IPAEncoder  # noqa: E402
from ipa_export.model.attention import flash_attn_available  # noqa: E402
from ipa_export.model.compiling import compile_encoder  # noqa: E402


def chain(n: int, generator: torch.Generator) -> torch.Tensor:
    steps = torch.nn.functional.normalize(torch.randn(1, n, 3, generator=generator), dim=-1)
    steps = steps * (3.42 + 0.76 * torch.rand(1, n, 1, generator=generator))
    x = steps.cumsum(1)
    return x - x.mean(1, keepdim=True)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_forward(model, inputs, device: torch.device, repeats: int = 5) -> tuple[float, float]:
    """Median milliseconds of ``repeats`` forwards after 2 warm-ups, and peak CUDA MiB (nan elsewhere)."""
    for _ in range(2):
        model(*inputs)
    synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        model(*inputs)
        synchronize(device)
        times.append(1e3 * (time.perf_counter() - start))
    peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else float("nan")
    return statistics.median(times), peak


def make_model(device: torch.device, **config) -> IPAEncoder:
    torch.manual_seed(0)
    model = IPAEncoder(EncoderConfig(**config)).to(device).eval()
    with torch.no_grad():
        for p in model.parameters():  # no zero-initialised final layers
            p.add_(0.02 * torch.randn_like(p))
    return model


def inputs_for(n: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(n)
    node_embed, coords = torch.randn(1, n, 384, generator=g), chain(n, g)
    return node_embed.to(device), coords.to(device), torch.ones(1, n, dtype=torch.bool, device=device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 2048, 8192])
    parser.add_argument("--compile-n", type=int, default=256, help="length of the compiled/eager comparison (0: skip)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--out")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("needs a CUDA device (or --device cpu for a smoke run)")
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    lines = [
        f"# {name}, torch {torch.__version__}, flash-attn installed: {flash_attn_available()}",
        "# IPAEncoder eager forward, eval + no_grad, batch 1, c_s 384, c_p 128, depth 3; median of 5 after 2 warm-ups",
        f"{'N':>6} {'rank':>4} {'attn':>17} {'backend':>10} {'ms':>9} {'peak MiB':>9} {'max|s - dense fp32|':>20}",
    ]
    print("\n".join(lines), flush=True)
    backends = ["dense", "sdpa"] + (["flash_attn"] if flash_attn_available() and device.type == "cuda" else [])
    cases = [("fp32", "", contextlib.nullcontext)]
    cases += [("bf16", variant, context) for variant, context in LOW_PRECISION_VARIANTS.items()]
    for n in args.lengths:
        inputs = inputs_for(n, device)
        for rank in (2, 16):
            reference = None
            for attn_dtype, variant, context in cases:
                for backend in backends:
                    if backend == "flash_attn" and attn_dtype == "fp32":
                        continue
                    model = make_model(device, z_factor_rank=rank, attention=backend, attn_dtype=attn_dtype)
                    with torch.no_grad(), context():
                        try:
                            ms, peak = time_forward(model, inputs, device)
                            s = model(*inputs).s
                        except torch.OutOfMemoryError:
                            ms, peak, s = float("nan"), float("nan"), None
                    if reference is None and s is not None:
                        reference = s
                    error = (s - reference).abs().max().item() if s is not None else float("nan")
                    label = f"{attn_dtype} {variant}".strip()
                    line = f"{n:>6} {rank:>4} {label:>17} {backend:>10} {ms:>9.2f} {peak:>9.0f} {error:>20.2e}"
                    lines.append(line)
                    print(line, flush=True)
                    del model
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
    if args.compile_n:
        lines += ["", f"# compiled (compile_encoder) vs eager, N = {args.compile_n}, batch 1, sdpa, median ms"]
        inputs = inputs_for(args.compile_n, device)
        for attn_dtype in ("fp32", "bf16"):
            model = make_model(device, attention="sdpa", attn_dtype=attn_dtype)
            with torch.no_grad():
                eager, _ = time_forward(model, inputs, device)
                compiled, _ = time_forward(compile_encoder(model), inputs, device)
            lines.append(
                f"{attn_dtype:>5}: eager {eager:8.2f} ms, compiled {compiled:8.2f} ms ({compiled / eager:.2f}x)"
            )
            print(lines[-1], flush=True)
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
