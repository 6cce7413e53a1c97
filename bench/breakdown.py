"""Where the forward's time goes: kNN, matrix products, attention kernel, everything else.

    python bench/breakdown.py                                   # N=256 B=8 and N=10,000 B=1, eager
    python bench/breakdown.py --sizes 256x8 --compile           # torch.compile(fullgraph=True, dynamic=True)
    python bench/breakdown.py --sizes 256x8 --ops 15            # and the 15 costliest ops

Usage document config (c_s 384, c_p 128, rank 2, depth 3), eval + no_grad, ``sdpa``, fp32.
Each size: one warm-up forward (the compile call in compiled mode), then ``--repeats`` forwards
under ``torch.profiler``; the one with the shortest wall time is reported. Categories, from the
profiler's operator times on the calling thread (an operator's time covers its worker threads):

- ``kNN``: the neighbour search op ``ipa_export::knn`` (once per forward);
- ``matmul``: ``addmm``/``mm``/``bmm`` (linear layers, einsums, the kNN's distance GEMM excluded);
- ``attention``: the fused CPU attention kernel;
- ``other``: the rest of the wall time: building q/k/v, padding, point transforms, norms,
  activations, concatenations, Python and dispatch (eager), generated kernels (compiled).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

# _common first: it sets OMP_WAIT_POLICY before torch loads.
import _common  # noqa: E402, F401
import torch  # noqa: E402
from _common import USAGE_CONFIG, cpu_pressure, make_inputs  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

from ipa_export import EncoderConfig, IPAEncoder  # noqa: E402

KNN = "ipa_export::knn"
MATMUL = ("aten::addmm", "aten::mm", "aten::bmm")
ATTENTION = "aten::_scaled_dot_product_flash_attention_for_cpu"


def categories(prof: profile, wall: float) -> dict[str, float]:
    """Seconds per category of one profiled forward of ``wall`` seconds."""
    seconds = {"kNN": 0.0, "matmul": 0.0, "attention": 0.0}
    for event in prof.events():
        inside_knn = any(p.name == KNN for p in _parents(event))
        if event.name == KNN:
            seconds["kNN"] += event.cpu_time_total / 1e6
        elif event.name in MATMUL and not inside_knn:
            seconds["matmul"] += event.self_cpu_time_total / 1e6
        elif event.name == ATTENTION:
            seconds["attention"] += event.self_cpu_time_total / 1e6
    seconds["other"] = wall - sum(seconds.values())
    return seconds


def _parents(event):
    parent = event.cpu_parent
    while parent is not None:
        yield parent
        parent = parent.cpu_parent


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="256x8,10000x1", help="NxB,... (default 256x8,10000x1)")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--ops", type=int, default=0, help="also list the N costliest operators (self time)")
    p.add_argument("--out", type=Path, help="also append the report to this file")
    args = p.parse_args(argv)

    torch.manual_seed(0)
    encoder = IPAEncoder(EncoderConfig(**USAGE_CONFIG, attention="sdpa")).eval().requires_grad_(False)
    model = torch.compile(encoder, fullgraph=True, dynamic=True) if args.compile else encoder
    mode = "compiled" if args.compile else "eager"
    lines = [
        f"# forward profile, {mode}, usage config, sdpa fp32, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads"
    ]
    print(lines[0], flush=True)
    for size in args.sizes.split(","):
        n, batch = (int(x) for x in size.split("x"))
        inputs = make_inputs(n, batch=batch)
        best = None
        with torch.no_grad():
            model(*inputs)
            for _ in range(args.repeats):
                with profile(activities=[ProfilerActivity.CPU]) as prof:
                    start = time.perf_counter()
                    model(*inputs)
                    wall = time.perf_counter() - start
                if best is None or wall < best[0]:
                    best = (wall, prof)
        wall, prof = best
        parts = categories(prof, wall)
        shares = "  ".join(f"{k} {v:.3f} s ({v / wall:.0%})" for k, v in parts.items())
        lines.append(f"N={n} B={batch}: forward {wall:.3f} s = {shares}  [cpu pressure {cpu_pressure()}%]")
        print(lines[-1], flush=True)
        if args.ops:
            table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.ops)
            lines.append(table)
            print(table, flush=True)
    if args.out:
        with args.out.open("a") as f:
            f.write("\n".join(lines) + "\n\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
