"""Headline measurement: one protein of N = 10,000 residues through the encoder.

Usage document config (c_s 384, c_p 128, z_factor_rank 2, depth 3), eval + no_grad, sdpa
attention, fp32, batch 1, on the CPU (or CUDA with --device cuda). Targets: a forward of at
most 12 s and a peak RSS of at most 1.5 GB (the first target was 30 s and 3 GB).

    python bench/n10000.py                  # eager
    python bench/n10000.py --compile        # torch.compile(fullgraph=True, dynamic=True)

Run it as its own process (it is one): the process peak RSS (``ru_maxrss``) then covers this
protein only. Reported:

- ``forward s``: wall time of each forward call (the first one includes one-time costs: page
  faults of fresh memory, thread-pool start; compiled mode: its first call compiles and is
  reported separately), and the CPU time of the process over the call.
- ``peak RSS during forward``: the kernel's RSS high-water mark (VmHWM) over that call alone
  (reset through /proc/self/clear_refs before it), absolute and minus the RSS before the call
  (model, inputs, interpreter and torch already resident).
- ``process peak RSS``: ``ru_maxrss`` over the whole process (compiled mode: includes compilation).
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

# _common first: it sets OMP_WAIT_POLICY before torch loads.
import _common  # noqa: E402, F401
import torch  # noqa: E402
from _common import (  # noqa: E402
    USAGE_CONFIG,
    cpu_busy_fraction,
    cpu_pressure,
    make_inputs,
    measure_peak_memory,
    peak_rss_mb,
    rss_mb,
    sync,
    wait_until_quiet,
)

from ipa_export import EncoderConfig, IPAEncoder  # noqa: E402

TARGET_S, TARGET_RSS_MB = 12.0, 1536


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=10_000)
    p.add_argument("--backend", default="sdpa", choices=["sdpa", "dense", "flash_attn", "auto"])
    p.add_argument("--attn-dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--rank", type=int, default=USAGE_CONFIG["z_factor_rank"])
    p.add_argument("--compile", action="store_true", help="torch.compile(encoder, fullgraph=True, dynamic=True)")
    p.add_argument("--repeats", type=int, default=2, help="timed forward calls after the first (default 2)")
    p.add_argument("--device", default="cpu")
    p.add_argument(
        "--wait-quiet",
        type=float,
        default=0,
        metavar="S",
        help="first wait up to S seconds until other processes use < 15%% of the CPUs",
    )
    p.add_argument("--out", type=Path, help="also append the report to this file")
    args = p.parse_args(argv)

    lines: list[str] = []

    def say(line: str = "") -> None:
        print(line, flush=True)
        lines.append(line)

    busy = wait_until_quiet(timeout_s=args.wait_quiet) if args.wait_quiet else cpu_busy_fraction()
    device = torch.device(args.device)
    rss_start = rss_mb()
    torch.manual_seed(0)
    config = EncoderConfig(
        **{**USAGE_CONFIG, "z_factor_rank": args.rank}, attention=args.backend, attn_dtype=args.attn_dtype
    )
    encoder = IPAEncoder(config).eval().requires_grad_(False).to(device)
    model = torch.compile(encoder, fullgraph=True, dynamic=True) if args.compile else encoder
    node_embed, ca, mask = make_inputs(args.n, device=device)
    rss_setup = rss_mb()

    mode = "compiled (torch.compile fullgraph=True, dynamic=True)" if args.compile else "eager"
    say(f"# IPAEncoder forward, N={args.n}, batch 1, {mode}")
    say(
        f"# config: c_s={config.c_s} c_p={config.c_p} z_factor_rank={config.z_factor_rank} depth={config.depth} "
        f"heads={config.no_heads} c_hidden={config.c_hidden} attention={args.backend} "
        f"(resolved: {_resolved(encoder, device)})"
        f" attn_dtype={args.attn_dtype}; eval, no_grad"
    )
    say(
        f"# machine: {os.cpu_count()} CPUs, torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"device {device}{' ' + torch.cuda.get_device_name() if device.type == 'cuda' else ''}"
        f", OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}"
    )
    say(f"# CPUs busy (other processes) over 2 s before the start: {_percent(busy)}")
    say(f"# RSS: {rss_start:.0f} MB after imports, {rss_setup:.0f} MB after model + inputs")

    def forward():
        with torch.no_grad():
            out = model(node_embed, ca, mask)
        sync(device)
        return out

    results = []
    calls = (["compile+first"] if args.compile else []) + ["first"] + [f"repeat {i + 1}" for i in range(args.repeats)]
    for name in calls:
        load = os.getloadavg()[0]
        wall0, cpu0 = time.perf_counter(), time.process_time()
        mem = measure_peak_memory(forward, device)
        wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
        hwm = mem["peak_mem_mb"] + mem["mem_before_mb"]
        results.append((name, wall, mem))
        say(
            f"{name:>14}: forward {wall:7.2f} s (process CPU {cpu:6.1f} s), peak RSS during forward {hwm:7.0f} MB "
            f"(+{mem['peak_mem_mb']:.0f} MB over {mem['mem_before_mb']:.0f} MB before the call) "
            f"[load avg {load:.2f}, cpu pressure {cpu_pressure()}%]"
        )
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    timed_calls = [r for r in results if r[0] != "compile+first"]
    best = min(r[1] for r in timed_calls)
    peak = max(r[2]["peak_mem_mb"] + r[2]["mem_before_mb"] for r in timed_calls)
    say(f"process peak RSS (ru_maxrss, whole process{', incl. compilation' if args.compile else ''}): {maxrss:.0f} MB")
    say(f"VmHWM now: {peak_rss_mb():.0f} MB")
    verdict_t = "met" if best <= TARGET_S else "MISSED"
    verdict_m = "met" if peak <= TARGET_RSS_MB else "MISSED"
    say(
        f"RESULT N={args.n} {'compiled' if args.compile else 'eager'} {args.backend} {args.attn_dtype}: "
        f"best forward {best:.2f} s (target <= {TARGET_S:.0f} s: {verdict_t}); "
        f"peak RSS during forward {peak:.0f} MB (target <= {TARGET_RSS_MB} MB: {verdict_m})"
    )
    if args.out:
        with args.out.open("a") as f:
            f.write("\n".join(lines) + "\n\n")
    return 0


def _percent(x: float | None) -> str:
    return "unknown" if x is None else f"{100 * x:.0f}%"


def _resolved(encoder: IPAEncoder, device: torch.device) -> str:
    with torch.no_grad():
        return encoder.attention_backend(device)


if __name__ == "__main__":
    sys.exit(main())
