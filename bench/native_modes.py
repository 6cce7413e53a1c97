"""Time and peak memory of flash_ipa's five edge modes through the native API, as N grows.

    python bench/native_modes.py                          # N = 256, 512, 1024
    python bench/native_modes.py --sizes 256,512 --out bench/results/native_modes.txt

One ``EdgeEmbedder`` + one ``InvariantPointAttention`` forward (``ipa_export.flash_ipa``) at
flash_ipa's default sizes (c_s 256, c_p 128, rank 2, 8 heads of 128, 8/12 points), batch 1,
eval + no_grad, fp32 attention (the flash modes on ``auto``, the orig modes ``dense``),
``flash_2d_factorize_bias`` with max_len = the largest N. For each mode and N: one untimed
warm-up forward, which also gives the peak memory (peak RSS increase over the RSS before it),
then ``--repeats`` timed forwards, the fastest kept. Times are also given relative to
``flash_1d_bias`` at the same N (ratios within one run are what to compare on a shared machine).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

# _common first: it sets OMP_WAIT_POLICY before torch loads.
import _common  # noqa: E402, F401
import torch  # noqa: E402
from _common import cpu_pressure, measure_peak_memory, timed  # noqa: E402

from ipa_export.flash_ipa import EdgeEmbedder, EdgeEmbedderConfig, InvariantPointAttention, IPAConfig  # noqa: E402

MODES = ("flash_1d_bias", "flash_2d_factorize_bias", "flash_no_bias", "orig_2d_bias", "orig_no_bias")


def modules(mode: str, max_len: int) -> tuple[EdgeEmbedder, InvariantPointAttention]:
    factorized = mode in ("flash_1d_bias", "flash_2d_factorize_bias")
    edge = EdgeEmbedder(EdgeEmbedderConfig(mode=mode, max_len=max_len if mode == "flash_2d_factorize_bias" else None))
    ipa = InvariantPointAttention(
        IPAConfig(
            use_flash_attn=mode.startswith("flash"),
            attn_dtype="fp32",
            c_z=0 if mode.endswith("no_bias") else 128,
            z_factor_rank=2 if factorized else 0,
        )
    )
    return edge.eval(), ipa.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="256,512,1024")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    sizes = [int(n) for n in args.sizes.split(",")]
    torch.manual_seed(0)
    rows, base = [], {}
    for mode in MODES:
        edge, ipa = modules(mode, max(sizes))
        for n in sizes:
            node_embed = torch.randn(1, n, 256)
            coords = torch.cumsum(3.8 * torch.nn.functional.normalize(torch.randn(1, n, 3), dim=-1), dim=1)
            frames, mask = (torch.eye(3).expand(1, n, 3, 3), coords), torch.ones(1, n, dtype=torch.bool)

            def forward() -> torch.Tensor:
                with torch.no_grad():
                    edge_embed, z_f1, z_f2, _ = edge(node_embed, coords, coords, mask)  # noqa: B023
                    return ipa(node_embed, edge_embed, z_f1, z_f2, frames, mask)  # noqa: B023

            peak = measure_peak_memory(forward)["peak_mem_mb"]
            seconds = min(timed(forward)[0] for _ in range(args.repeats))
            base.setdefault(n, seconds)  # flash_1d_bias comes first
            rows.append(f"{mode:<24} {n:>6} {seconds:>9.3f} {seconds / base[n]:>9.2f} {peak:>9.0f}")
            print(rows[-1], flush=True)
    pressure = cpu_pressure()
    machine = f"# torch {torch.__version__}, {torch.get_num_threads()} threads"
    lines = [
        "# python bench/native_modes.py --sizes " + args.sizes,
        machine + (f"; CPU pressure avg10 {pressure}%" if pressure else ""),
        f"{'mode':<24} {'N':>6} {'seconds':>9} {'vs 1d':>9} {'peak MB':>9}",
        *rows,
    ]
    if args.out:
        args.out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
