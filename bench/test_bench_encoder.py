"""IPAEncoder forward benchmarks (eval, no_grad) at the usage document's config.

    pytest bench/ --benchmark-only

Cases: eager vs ``torch.compile(encoder, fullgraph=True, dynamic=True)`` (compiled once per
backend and rank, warmed up at each N before timing), attention backend ``dense`` vs ``sdpa``
(``flash_attn`` on CUDA with flash-attn installed, bf16; skipped elsewhere), N in
{64, 256, 1024, 4096}, z_factor_rank 2 and 16. One benchmark group per (N, rank), so that the
table's ratio columns read compiled/eager and sdpa/dense directly.

Each case stores in ``benchmark.extra_info``: the peak memory of the (untimed) warm-up call
(``peak_mem_mb``, see ``_common.measure_peak_memory``: CPU peak RSS increase over the RSS before
the call, from the kernel's high-water mark; CUDA ``max_memory_allocated``), the machine load
after it ran, and the case.

Rounds (CPU): 20 at N=64, 10 at 256, 5 at 1024, 2 at 4096, one forward each, after one or two
untimed warm-up calls (the compile call in compiled mode). On a quiet 2-core CPU the slowest cases (N=4096,
rank 16) take ~10 s a forward, so every case stays under a minute; nothing is skipped on CPU
except flash_attn.

Environment: ``IPA_BENCH_DEVICE`` (default cuda when available, else cpu),
``IPA_BENCH_SIZES`` (comma-separated, default 64,256,1024,4096), ``IPA_BENCH_RANKS``
(default 2,16), ``IPA_BENCH_WAIT_QUIET`` (seconds, default 0: before each case, wait at most that
long until other processes use < 15% of the CPUs; for shared machines).
"""

from __future__ import annotations

import os

import pytest
import torch  # conftest.py imported _common (OMP_WAIT_POLICY) before torch
from _common import USAGE_CONFIG, machine_info, make_inputs, measure_peak_memory, sync, wait_until_quiet

from ipa_export import EncoderConfig, IPAEncoder
from ipa_export.model.attention import flash_attn_available

DEVICE = torch.device(os.environ.get("IPA_BENCH_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu"))
SIZES = [int(x) for x in os.environ.get("IPA_BENCH_SIZES", "64,256,1024,4096").split(",")]
RANKS = [int(x) for x in os.environ.get("IPA_BENCH_RANKS", "2,16").split(",")]
WAIT_QUIET_S = float(os.environ.get("IPA_BENCH_WAIT_QUIET", "0"))
MODES = ["eager", "compiled"]
BACKENDS = ["dense", "sdpa", "flash_attn"]

# Timed rounds per N (each round one forward), sized so that a case stays well under a minute
# on a 2-core CPU; on CUDA every case is fast, so use more.
CPU_ROUNDS = {64: 20, 256: 10, 1024: 5, 2048: 3, 4096: 2}
CUDA_ROUNDS = {64: 50, 256: 50, 1024: 30, 2048: 20, 4096: 20}


def _rounds(n: int) -> int:
    table = CUDA_ROUNDS if DEVICE.type == "cuda" else CPU_ROUNDS
    return table.get(n, 2 if n > 4096 else 10)


def _skip_reason(mode: str, backend: str, n: int, rank: int) -> str | None:
    if backend == "flash_attn" and not (DEVICE.type == "cuda" and flash_attn_available()):
        return "flash_attn needs a CUDA device and flash-attn installed"
    return None


# (backend, rank) -> eager encoder; (backend, rank) -> compiled encoder. Compiled modules are kept
# for the whole session: with dynamic=True one compile serves every N.
_EAGER: dict[tuple[str, int], IPAEncoder] = {}
_COMPILED: dict[tuple[str, int], torch.nn.Module] = {}


def _encoder(backend: str, rank: int) -> IPAEncoder:
    key = (backend, rank)
    if key not in _EAGER:
        torch.manual_seed(0)
        attn_dtype = "bf16" if backend == "flash_attn" else "fp32"
        config = EncoderConfig(**{**USAGE_CONFIG, "z_factor_rank": rank}, attention=backend, attn_dtype=attn_dtype)
        _EAGER[key] = IPAEncoder(config).eval().requires_grad_(False).to(DEVICE)
    return _EAGER[key]


def _model(mode: str, backend: str, rank: int) -> torch.nn.Module:
    encoder = _encoder(backend, rank)
    if mode == "eager":
        return encoder
    key = (backend, rank)
    if key not in _COMPILED:
        # Four configs compile the same forward; keep Dynamo from giving up on recompiles.
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        torch._dynamo.config.accumulated_recompile_limit = max(torch._dynamo.config.accumulated_recompile_limit, 512)
        _COMPILED[key] = torch.compile(encoder, fullgraph=True, dynamic=True)
    return _COMPILED[key]


# The four cases of a group run one after the other, so that a change in the machine's load during
# the session shifts a group's ratios as little as possible.
CASES = [
    pytest.param(mode, backend, n, rank, id=f"{mode}-{backend}-N{n}-r{rank}")
    for rank in RANKS
    for n in SIZES
    for backend in BACKENDS
    for mode in MODES
]


@pytest.mark.parametrize(("mode", "backend", "n", "rank"), CASES)
def test_encoder_forward(benchmark, mode: str, backend: str, n: int, rank: int) -> None:
    reason = _skip_reason(mode, backend, n, rank)
    if reason:
        pytest.skip(reason)
    if WAIT_QUIET_S:
        wait_until_quiet(timeout_s=WAIT_QUIET_S)
    model = _model(mode, backend, rank)
    node_embed, ca, mask = make_inputs(n, device=DEVICE)

    def forward():
        with torch.no_grad():
            out = model(node_embed, ca, mask)
        sync(DEVICE)
        return out

    if mode == "compiled" or n <= 1024:
        forward()  # compiles on the first N of this (backend, rank), else a warm-up; not timed
    # Warm-up call, not timed, that also measures the peak memory of one forward (at N=4096 the
    # only warm-up: the smaller sizes before it have already paid the one-time costs).
    memory = measure_peak_memory(forward, DEVICE)
    benchmark.group = f"encoder N={n} rank={rank} ({DEVICE.type})"
    benchmark.extra_info.update({"mode": mode, "backend": backend, "n": n, "rank": rank, "device": DEVICE.type})
    benchmark.extra_info.update(memory)
    out = benchmark.pedantic(forward, rounds=_rounds(n), iterations=1, warmup_rounds=1 if n <= 256 else 0)
    assert out.s.shape == (1, n, USAGE_CONFIG["c_s"])
    assert torch.isfinite(out.s).all()
    benchmark.extra_info.update(machine_info())
