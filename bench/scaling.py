"""Time and peak memory of one encoder forward as N grows, with log-log growth exponents.

    python bench/scaling.py                       # eager, sdpa, N = 256 ... 8192
    python bench/scaling.py --compile             # torch.compile(fullgraph=True, dynamic=True)
    python bench/scaling.py --sizes 256,512,1024 --png /tmp/s.png

Usage document config (c_s 384, c_p 128, rank 2, depth 3), eval + no_grad, batch 1, fp32,
``sdpa`` attention by default. For each N: one untimed warm-up forward, which also gives the peak
memory, then ``--repeats`` timed forwards; the time is the fastest of them (the least disturbed by
other processes). The first size gets one more untimed forward before it (one-time costs; compiled
mode: the compilation, which dynamic=True does once for every N). Peak memory is the peak RSS
increase of the warm-up forward over the RSS before it (CPU: the kernel's high-water mark, reset
through /proc/self/clear_refs; CUDA: max_memory_allocated).

Prints a table (N, seconds, peak MB, and the local exponents between successive sizes) and the
least-squares slope of log(time) and log(memory) against log(N), over all sizes and over the
largest half, and draws both curves as a PNG (default bench/results/scaling.png; needs
matplotlib, the ``bench`` extra). ``--out`` also writes the table to a text file.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

# _common first: it sets OMP_WAIT_POLICY before torch loads.
import _common  # noqa: E402, F401
import torch  # noqa: E402
from _common import USAGE_CONFIG, cpu_pressure, make_inputs, measure_peak_memory, sync  # noqa: E402

from ipa_export import EncoderConfig, IPAEncoder  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def fit_exponent(ns: list[float], ys: list[float]) -> float:
    """Least-squares slope of log(y) on log(n)."""
    xs, ls = [math.log(n) for n in ns], [math.log(max(y, 1e-12)) for y in ys]
    mx, my = sum(xs) / len(xs), sum(ls) / len(ls)
    sxx = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ls, strict=True)) / sxx if sxx else float("nan")


def measure(model, n: int, repeats: int, device: torch.device, first: bool) -> tuple[float, float]:
    node_embed, ca, mask = make_inputs(n, device=device)

    def forward():
        with torch.no_grad():
            out = model(node_embed, ca, mask)
        sync(device)
        return out

    if first:
        forward()  # one-time costs (thread pools, allocator; compiled mode: the compilation, once for every N)
    mem = measure_peak_memory(forward, device)["peak_mem_mb"]  # the warm-up call, not timed
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        forward()
        times.append(time.perf_counter() - t0)
    return min(times), mem


def plot(rows: list[tuple[int, float, float]], fits: dict[str, float], title: str, path: Path) -> bool:
    try:
        import matplotlib
        import matplotlib.ticker

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"matplotlib not installed (pip install matplotlib, or the 'bench' extra): no PNG written to {path}")
        return False
    ns = [r[0] for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.4))
    for ax, col, label, unit, key in (
        (axes[0], 1, "forward time", "s", "time"),
        (axes[1], 2, "peak memory", "MB", "mem"),
    ):
        ys = [r[col] for r in rows]
        ax.loglog(ns, ys, "o-", color="C0" if key == "time" else "C1", label=f"measured (fit N^{fits[key]:.2f})")
        for exponent, style in ((1, ":"), (2, "--")):  # reference slopes through the last point
            ax.loglog(
                ns,
                [ys[-1] * (n / ns[-1]) ** exponent for n in ns],
                style,
                color="grey",
                lw=1,
                label=f"N^{exponent} reference",
            )
        for n, y in zip(ns, ys, strict=True):
            ax.annotate(f"{y:.3g}", (n, y), textcoords="offset points", xytext=(4, -12), fontsize=8)
        ax.set_xticks(ns, [str(n) for n in ns])
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlabel("N (residues)")
        ax.set_ylabel(f"{label} ({unit})")
        ax.set_title(label)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def replot(table: Path, png: Path) -> int:
    text = table.read_text().splitlines()
    rows = [
        (int(m[1]), float(m[2]), float(m[3]))
        for m in (re.match(r"\s*(\d+)\s+([\d.]+)\s+([\d.]+)", x) for x in text)
        if m
    ]
    fits = {
        "time": fit_exponent([r[0] for r in rows], [r[1] for r in rows]),
        "mem": fit_exponent([r[0] for r in rows], [r[2] for r in rows]),
    }
    title = text[0].replace("; ", "\n")
    return 0 if plot(rows, fits, title, png) else 1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="256,512,1024,2048,4096,8192")
    p.add_argument("--backend", default="sdpa", choices=["sdpa", "dense", "flash_attn", "auto"])
    p.add_argument("--compile", action="store_true", help="torch.compile(encoder, fullgraph=True, dynamic=True)")
    p.add_argument(
        "--repeats",
        type=int,
        default=0,
        help="timed forwards per size, the fastest is reported (default 3 up to N=2048, then 2)",
    )
    p.add_argument("--device", default="cpu")
    p.add_argument("--png", type=Path, default=RESULTS / "scaling.png")
    p.add_argument("--out", type=Path, help="also write the table to this text file")
    p.add_argument("--replot", type=Path, metavar="TABLE", help="only redraw the PNG from a table written by --out")
    args = p.parse_args(argv)
    if args.replot:
        return replot(args.replot, args.png)

    device = torch.device(args.device)
    sizes = [int(x) for x in args.sizes.split(",")]
    torch.manual_seed(0)
    config = EncoderConfig(**USAGE_CONFIG, attention=args.backend)
    encoder = IPAEncoder(config).eval().requires_grad_(False).to(device)
    model = torch.compile(encoder, fullgraph=True, dynamic=True) if args.compile else encoder
    mode = "compiled" if args.compile else "eager"
    header = (
        f"IPAEncoder forward scaling: {mode}, attention={args.backend}, fp32, batch 1, "
        f"c_s={config.c_s} c_p={config.c_p} rank={config.z_factor_rank} depth={config.depth}; "
        f"{device.type}, {torch.get_num_threads()} threads, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}, "
        f"torch {torch.__version__}"
    )
    lines = [header, f"{'N':>6} {'seconds':>9} {'peak MB':>9} {'dlog t/dlog N':>14} {'dlog m/dlog N':>14}  load"]
    print("\n".join(lines), flush=True)
    rows: list[tuple[int, float, float]] = []
    for i, n in enumerate(sizes):
        repeats = args.repeats or (3 if n <= 2048 else 2)
        seconds, mem = measure(model, n, repeats, device, first=i == 0)
        if rows:
            n0, t0, m0 = rows[-1]
            lt = f"{math.log(seconds / t0) / math.log(n / n0):14.2f}"
            lm = f"{math.log(mem / m0) / math.log(n / n0):14.2f}" if mem > 0 and m0 > 0 else f"{'-':>14}"
        else:
            lt = lm = f"{'-':>14}"
        rows.append((n, seconds, mem))
        line = f"{n:>6} {seconds:9.3f} {mem:9.1f} {lt} {lm}  {os.getloadavg()[0]:.2f} (psi {cpu_pressure()}%)"
        lines.append(line)
        print(line, flush=True)
    ns = [r[0] for r in rows]
    fits = {"time": fit_exponent(ns, [r[1] for r in rows]), "mem": fit_exponent(ns, [r[2] for r in rows])}
    half = rows[len(rows) // 2 :]
    fits_hi = {
        "time": fit_exponent([r[0] for r in half], [r[1] for r in half]),
        "mem": fit_exponent([r[0] for r in half], [r[2] for r in half]),
    }
    lines += [
        f"least-squares growth exponent, all sizes:      time N^{fits['time']:.2f}, peak memory N^{fits['mem']:.2f}",
        f"least-squares growth exponent, N >= {half[0][0]:<6}:  time N^{fits_hi['time']:.2f}, "
        f"peak memory N^{fits_hi['mem']:.2f}",
    ]
    print("\n".join(lines[-2:]))
    if plot(rows, fits, header.replace("; ", "\n"), args.png):
        lines.append(f"plot: {args.png}")
        print(f"plot: {args.png}")
    if args.out:
        args.out.write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
