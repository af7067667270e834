"""benchmarks/gpu_bench.py's largest-N search against a fake memory model (the GPU run cannot be
retried cheaply, so its search logic is checked here)."""

import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import gpu_bench  # noqa: E402


@pytest.mark.parametrize("a,b,cap,step", [(1000.0, 3.0, 5e7, 16), (0.0, 40.0, 1e8, 8), (5e4, 0.0, 2e8, 512)])
def test_search_finds_the_largest_fitting_n_of_a_memory_model(monkeypatch, a, b, cap, step):
    calls = []

    def fake_try(impl, n, v, device, mem_cap):
        calls.append(n)
        peak = 12345 + a * n + b * n * n
        return ("ok" if peak <= mem_cap else "OOM (over --mem-cap)"), {"ms": 1.0, "peak_extra_bytes": peak}

    monkeypatch.setattr(gpu_bench, "try_loss", fake_try)
    out = gpu_bench.largest_n("x", 1, "cpu", 16, step, int(cap), time.monotonic() + 60)
    truth = max(n for n in range(0, 10**6, step) if 12345 + a * n + b * n * n <= int(cap))
    assert out["exact"] and out["largest_n"] == truth and out["first_failing_n"] == truth + step
    assert len(calls) <= 12  # the quadratic model lands next to the limit: a few tries, not a scan


def test_search_reports_what_it_knows_when_the_time_budget_runs_out(monkeypatch):
    monkeypatch.setattr(gpu_bench, "try_loss", lambda *a: ("ok", {"ms": 1.0, "peak_extra_bytes": 1}))
    out = gpu_bench.largest_n("x", 1, "cpu", 16, 8, 10**9, time.monotonic() - 1)
    assert not out["exact"] and out["largest_n"] == 64 and "time budget" in out["note"]
