"""Training cost: forward + backward through the encoder at the usage config.

The encoder trains as part of a larger model: ``node_embed`` requires grad (a trainable
embedder before it) and the encoder's own parameters train (dropout 0.1 on). One step is
forward, ``loss = mean(s^2) + mean(z_f1^2) + mean(translations^2)``, backward. Reported per
mode: the wall and CPU time of a step (median of ``--steps`` after one warm-up step) and the
peak RSS increase of one step (VmHWM - VmRSS, see ``_common.measure_peak_memory``).

    python bench/training.py                         # B = 8, N = 256: eager, compiled
    python bench/training.py --checkpointing 1024    # also: gradient checkpointing at N = 1024

Modes: ``eager``; ``compiled`` (``torch.compile(encoder, dynamic=False)``, training graphs;
the first call's compile time is reported separately); ``eager+checkpointing`` and ``eager`` at
the ``--checkpointing`` length (batch ``--checkpointing-batch``), to measure the memory that
``encoder.gradient_checkpointing_enable()`` saves.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common  # noqa: E402, F401  (sets OMP_WAIT_POLICY before torch loads)
import torch  # noqa: E402
from _common import USAGE_CONFIG, machine_info, make_inputs, measure_peak_memory, timed  # noqa: E402

from ipa_export import EncoderConfig, IPAEncoder  # noqa: E402


def measure(mode: str, batch: int, length: int, steps: int) -> dict:
    torch.manual_seed(0)
    encoder = IPAEncoder(EncoderConfig(**USAGE_CONFIG)).train()
    encoder.gradient_checkpointing_enable("checkpointing" in mode)
    model = torch.compile(encoder, dynamic=False) if mode == "compiled" else encoder
    node_embed, ca, mask = make_inputs(length, batch=batch)
    node_embed.requires_grad_(True)

    def step() -> None:
        out = model(node_embed, ca, mask)
        loss = out.s.square().mean() + out.z_f1.square().mean() + out.translations.square().mean()
        loss.backward()
        node_embed.grad = None
        encoder.zero_grad(set_to_none=True)

    first_wall, _, _ = timed(step)
    walls, cpus = [], []
    for _ in range(steps):
        wall, cpu, _ = timed(step)
        walls.append(wall)
        cpus.append(cpu)
    memory = measure_peak_memory(step)
    return {
        "mode": mode,
        "B": batch,
        "N": length,
        "first_step_s": round(first_wall, 2),
        "step_s": round(statistics.median(walls), 2),
        "step_cpu_s": round(statistics.median(cpus), 2),
        "peak_rss_increase_mb": round(memory["peak_mem_mb"]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--modes", nargs="+", default=["eager", "compiled"])
    parser.add_argument("--checkpointing", type=int, default=0, help="also measure checkpointing at this N")
    parser.add_argument("--checkpointing-batch", type=int, default=1)
    args = parser.parse_args()
    print(machine_info(), flush=True)
    runs = [(mode, args.batch, args.length) for mode in args.modes]
    if args.checkpointing:
        runs += [(mode, args.checkpointing_batch, args.checkpointing) for mode in ("eager", "eager+checkpointing")]
    for mode, batch, length in runs:
        start = time.perf_counter()
        print(measure(mode, batch, length, args.steps), f"({time.perf_counter() - start:.0f} s in all)", flush=True)


if __name__ == "__main__":
    main()
