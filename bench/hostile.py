"""Cost of rejecting hostile exports: time and peak memory of each rejected ``from_pretrained``.

Each case edits a copy of a small valid export (hostile config values, a 100 MB or deeply
nested config.json, a huge safetensors header claim, a link out of the export, ...) and
times ``IPAEncoder.from_pretrained`` until it raises, after one valid load has warmed up the
imports. Memory is the peak RSS increase of that one call (``_common.measure_peak_memory``).
The budget is 2 s and 50 MB per case.

    python bench/hostile.py --out bench/results/hostile.txt
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

# _common first: it sets OMP_WAIT_POLICY before torch loads.
import _common  # noqa: E402
import torch  # noqa: E402, F401

from ipa_export import EncoderConfig, IPAEncoder  # noqa: E402
from ipa_export.config import raised_limits  # noqa: E402

BUDGET_S, BUDGET_MB = 2.0, 50.0


def config_edit(**changes) -> Callable[[Path], None]:
    def edit(export: Path) -> None:
        data = json.loads((export / "config.json").read_text())
        for key, value in changes.items():
            (data if key in data else data["config"])[key] = value
        (export / "config.json").write_text(json.dumps(data))

    return edit


def write(name: str, text: str) -> Callable[[Path], None]:
    return lambda export: (export / name).write_text(text)


def header_claim(export: Path) -> None:
    path = export / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes((10**9).to_bytes(8, "little") + data[8:])


def link_out(export: Path) -> None:
    (export / "model.safetensors").unlink()
    (export / "model.safetensors").symlink_to("/dev/zero")


CASES: dict[str, Callable[[Path], None]] = {
    "depth = 10^6": config_edit(depth=10**6),
    "depth = 10^4": config_edit(depth=10**4),
    "c_s = 10^9": config_edit(c_s=10**9),
    "c_s = 2^63": config_edit(c_s=2**63),
    "c_s = 16384": config_edit(c_s=16384),
    "no_heads = 2^40": config_edit(no_heads=2**40),
    "max_trans_update = NaN": config_edit(max_trans_update=float("nan")),
    "format_version = -5": config_edit(format_version=-5),
    "c_s = 72 (weights: 64)": config_edit(c_s=72),
    "config.json of 100 MB": write("config.json", '{"pad": "' + "x" * 100_000_000 + '"}'),
    "config.json nested 500,000 deep": write("config.json", "[" * 500_000 + "]" * 500_000),
    "config.json with a 5,000-digit number": write("config.json", '{"format_version": ' + "9" * 5000 + "}"),
    "safetensors header claims 1 GB": header_claim,
    "model.safetensors -> /dev/zero": link_out,
}
RAISED = {"depth = 10^6 with raised_limits(depth=10^6)": config_edit(depth=10**6)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="also write the table here")
    args = parser.parse_args()
    config = EncoderConfig(c_s=64, c_p=32, c_hidden=16, no_heads=4, depth=2)
    lines = [
        f"# {_common.machine_info()}",
        f"# export: {config.c_s=}, {config.depth=}; budget {BUDGET_S} s and {BUDGET_MB} MB per case",
        f"{'case':<48} {'time_s':>8} {'peak_mb':>8}  error",
    ]
    print("\n".join(lines))
    worst_s = worst_mb = 0.0
    with tempfile.TemporaryDirectory() as tmp:
        valid = IPAEncoder(config).save_pretrained(Path(tmp) / "valid")
        IPAEncoder.from_pretrained(valid)  # warm-up: imports and lazy initialisation
        for name, edit in {**CASES, **RAISED}.items():
            export = Path(shutil.copytree(valid, Path(tmp) / "case"))
            edit(export)
            error: list[str] = []
            seconds: list[float] = []

            def load(export: Path = export, raised: bool = name in RAISED, error=error, seconds=seconds) -> None:
                start = time.perf_counter()
                try:
                    with raised_limits(depth=10**6) if raised else contextlib.nullcontext():
                        IPAEncoder.from_pretrained(export)
                except (ValueError, OSError) as e:
                    error.append(str(e).splitlines()[-1].strip().replace(str(export), "<export>")[:90])
                seconds.append(time.perf_counter() - start)

            memory = _common.measure_peak_memory(load)
            elapsed = seconds[0]
            worst_s, worst_mb = max(worst_s, elapsed), max(worst_mb, memory["peak_mem_mb"])
            line = f"{name:<48} {elapsed:8.3f} {memory['peak_mem_mb']:8.1f}  {error[0] if error else 'ACCEPTED'}"
            print(line)
            lines.append(line)
            shutil.rmtree(export)
    within = worst_s < BUDGET_S and worst_mb < BUDGET_MB
    verdict = f"worst: {worst_s:.3f} s, {worst_mb:.1f} MB ({'within' if within else 'OVER'} budget)"
    print(verdict)
    lines.append(verdict)
    if args.out:
        args.out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
