"""Shared helpers for the benchmarks: inputs, peak-memory measurement, machine state.

Peak memory
-----------
- CUDA: ``torch.cuda.max_memory_allocated()`` after ``reset_peak_memory_stats()``, minus what was
  allocated before the call (tensors only; the caching allocator's reserve is not counted).
- CPU (Linux): the kernel's resident-set high-water mark. Writing ``5`` to
  ``/proc/self/clear_refs`` resets ``VmHWM`` to the current RSS, so ``VmHWM`` after the call minus
  ``VmRSS`` before it is the exact peak RSS increase of that one call (the kernel tracks it on
  every page fault; no sampling). ``tracemalloc`` cannot see torch's allocations, and sampling
  /proc in a thread misses short peaks. Freed heap memory is handed back first (``gc.collect``
  and glibc's ``malloc_trim``) so that it is not silently reused and hidden. Where clear_refs is
  unavailable (not Linux, or not permitted) the fallback is a 1 ms /proc sampler thread.

OpenMP wait policy
------------------
torch's CPU kernels run on GNU OpenMP, whose threads spin at every barrier. When another process
holds one of the cores (a shared 2-core machine), a spinning thread keeps the core that its partner
needs, and a forward gets 2-5x slower and erratic. Importing this module first sets
``OMP_WAIT_POLICY=PASSIVE`` (threads sleep instead) unless the variable is already set, so the
benchmarks degrade to roughly single-core speed under contention instead. Set
``OMP_WAIT_POLICY=ACTIVE`` to measure torch's default behaviour. It must be set before torch is
imported, which is why every bench script imports ``_common`` before torch.
"""

from __future__ import annotations

import ctypes
import gc
import os
import platform
import re
import sys
import threading
import time
import warnings
from collections.abc import Callable
from typing import Any

if "OMP_WAIT_POLICY" not in os.environ:
    if "torch" in sys.modules:
        warnings.warn("torch was imported before bench/_common.py: OMP_WAIT_POLICY=PASSIVE not applied", stacklevel=2)
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"

import torch  # noqa: E402

USAGE_CONFIG = {"c_s": 384, "c_p": 128, "z_factor_rank": 2, "depth": 3}  # the usage document's encoder


def make_inputs(
    n: int,
    *,
    batch: int = 1,
    c_s: int = 384,
    seed: int = 0,
    offset: float = 0.0,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A protein-like input: node embeddings ~ N(0, 1), C-alpha positions on a random walk of
    3.8 Angstrom steps centred on ``offset`` (the same offset on each axis), and an all-true mask.
    Returns (node_embed, ca, mask)."""
    gen = torch.Generator().manual_seed(seed)
    node_embed = torch.randn(batch, n, c_s, generator=gen, dtype=torch.float64)
    steps = torch.nn.functional.normalize(torch.randn(batch, n, 3, generator=gen, dtype=torch.float64), dim=-1)
    ca = torch.cumsum(3.8 * steps, dim=1)
    ca = ca - ca.mean(1, keepdim=True) + offset
    mask = torch.ones(batch, n, dtype=torch.bool)
    return node_embed.to(device, dtype), ca.to(device, dtype), mask.to(device)


# ---------------------------------------------------------------------------------------------
# Peak memory


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        match = re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.M)
    if match is None:
        raise OSError(f"{field} not in /proc/self/status")
    return int(match.group(1))


def _malloc_trim() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _clear_refs_works() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        _status_kib("VmHWM")
        return True
    except OSError:
        return False


def rss_mb() -> float:
    """Current resident set size (MiB)."""
    return _status_kib("VmRSS") / 1024


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far (or since the last reset), MiB."""
    return _status_kib("VmHWM") / 1024


def measure_peak_memory(fn: Callable[[], Any], device: torch.device | str = "cpu") -> dict[str, Any]:
    """Run ``fn()`` once and return {"peak_mem_mb": increase of peak memory over the memory in use
    before the call, "mem_before_mb": ..., "mem_method": how it was measured}."""
    device = torch.device(device)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
        return {
            "peak_mem_mb": (peak - before) / 2**20,
            "mem_before_mb": before / 2**20,
            "mem_method": "torch.cuda.max_memory_allocated",
        }
    _malloc_trim()
    if _clear_refs_works():
        before = _status_kib("VmRSS")
        fn()
        peak = _status_kib("VmHWM")
        return {
            "peak_mem_mb": (peak - before) / 1024,
            "mem_before_mb": before / 1024,
            "mem_method": "VmHWM-VmRSS (clear_refs)",
        }
    return _sampled_peak(fn)


def _sampled_peak(fn: Callable[[], Any]) -> dict[str, Any]:
    try:
        import resource

        page_kib = resource.getpagesize() / 1024
    except ImportError:  # pragma: no cover - not POSIX
        page_kib = 4.0

    def rss_kib() -> float:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * page_kib

    before = rss_kib()
    peak = [before]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], rss_kib())
            time.sleep(0.001)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        fn()
    finally:
        stop.set()
        thread.join()
    peak[0] = max(peak[0], rss_kib())
    return {"peak_mem_mb": (peak[0] - before) / 1024, "mem_before_mb": before / 1024, "mem_method": "statm sampler 1ms"}


# ---------------------------------------------------------------------------------------------
# Machine state: results on a shared machine are only comparable with this next to them


def cpu_pressure() -> str | None:
    """The 'some avg10' CPU pressure (percent of the last 10 s in which a runnable task waited)."""
    try:
        with open("/proc/pressure/cpu") as f:
            return f.readline().split()[1].split("=")[1]
    except (OSError, IndexError):
        return None


def machine_info() -> dict[str, Any]:
    info: dict[str, Any] = {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "default (active)"),
        "machine": platform.machine(),
        "loadavg_1m": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
        "cpu_pressure_avg10": cpu_pressure(),
    }
    if torch.cuda.is_available():
        info["cuda_device"] = torch.cuda.get_device_name()
    return info


def cpu_busy_fraction(interval_s: float = 2.0) -> float | None:
    """Fraction of all CPUs' time spent busy (by anyone) over ``interval_s``, from /proc/stat."""

    def read() -> tuple[int, int]:
        with open("/proc/stat") as f:
            values = [int(x) for x in f.readline().split()[1:]]
        idle = values[3] + values[4]  # idle + iowait
        return sum(values) - idle, sum(values)

    try:
        busy0, total0 = read()
        time.sleep(interval_s)
        busy1, total1 = read()
    except (OSError, ValueError, IndexError):
        return None
    return (busy1 - busy0) / max(total1 - total0, 1)


def wait_until_quiet(max_busy: float = 0.15, timeout_s: float = 600.0) -> float | None:
    """Wait (at most ``timeout_s``) until the machine's CPUs are less than ``max_busy`` busy over
    2 s (other processes; call it before starting work). Returns the last busy fraction seen."""
    deadline = time.monotonic() + timeout_s
    busy = cpu_busy_fraction()
    while busy is not None and busy > max_busy and time.monotonic() < deadline:
        busy = cpu_busy_fraction()
    return busy


def sync(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def timed(fn: Callable[[], Any], device: torch.device | str = "cpu") -> tuple[float, float, Any]:
    """(wall seconds, process CPU seconds, result) of one call."""
    sync(device)
    wall, cpu = time.perf_counter(), time.process_time()
    result = fn()
    sync(device)
    return time.perf_counter() - wall, time.process_time() - cpu, result
