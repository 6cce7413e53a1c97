"""pytest configuration for the benchmarks in bench/ (run with ``pytest bench/ --benchmark-only``)."""

from __future__ import annotations

from _common import machine_info as bench_machine_info


def pytest_configure(config):
    # torch's own import-time deprecation noise, not ours.
    config.addinivalue_line("filterwarnings", "ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")


def pytest_benchmark_update_machine_info(config, machine_info: dict) -> None:
    """Saved with every run (``--benchmark-save`` / ``--benchmark-json``): torch version, threads and
    OpenMP wait policy. Only settings that stay put: pytest-benchmark warns when a compared run's
    machine_info differs. The load during each case is in that case's ``extra_info``."""
    info = bench_machine_info()
    machine_info["ipa_bench"] = {k: info[k] for k in ("torch", "threads", "cpu_count", "omp_wait_policy", "machine")}
