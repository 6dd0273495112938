"""The benchmark scripts run to completion at their smallest size (correctness only, no timing)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from fedad.baselines.runner import BASELINES

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def run_quick(script: str, *extra: str) -> str:
    done = subprocess.run(
        [sys.executable, str(SCRIPTS / script), "--quick", *extra],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


@pytest.mark.slow
def test_overhead_benchmark_prints_both_runs_and_the_targets():
    out = run_quick("bench_overhead.py")
    for label in (
        "machine:",
        "start-up s (to round 1)",
        "steady-state round s",
        "steady-state round CPU s",
        "total wall s",
        "peak memory MB",
        "limit steady round parts s: train",
        "(target <= 1.3: ",
        "start-up:",
    ):
        assert label in out
    # As many limits at once as clients run in parallel (cores / CPUs per client, at most 3).
    parallel = re.search(r"limit, (\d+) copies at once: steady-state round s: [\d.]+", out)
    assert parallel, out
    n = int(parallel.group(1))
    assert 1 <= n <= 3
    for ideal in (f"limit / {n}", f"limit / {n}, server's part undivided", f"{n} limits at once"):
        assert re.search(rf"ideal round s, {ideal}.*: [\d.]+; fedad / it: [\d.]+", out), ideal
    header = next(line for line in out.splitlines() if line.strip().startswith("fedad"))
    assert header.split() == ["fedad", "limit"]


@pytest.mark.slow
def test_scale_benchmark_prints_every_size_and_the_targets():
    out = run_quick("bench_scale.py")
    sizes = next(line for line in out.splitlines() if line.startswith("sites "))
    assert sizes.split()[1:] == ["3", "6"]
    for label in (
        "write shards s",
        "steady-state round s",
        "all-site evaluation + stop s",
        "peak memory MB",
        "per-round time: 6 sites / 3 sites",
        "peak memory: 6 sites / 3 sites",
    ):
        assert label in out


@pytest.mark.slow
def test_baselines_benchmark_prints_every_baseline():
    out = run_quick("bench_baselines.py")
    assert "fit s" in out and "peak MB" in out
    rows = [line.split() for line in out.splitlines() if line.strip().startswith("2000 ")]
    assert sorted(row[1] for row in rows) == sorted(BASELINES)
    assert all(len(row) == 7 for row in rows)


@pytest.mark.slow
def test_serve_benchmark_prints_every_figure(data_dir):
    out = run_quick("bench_serve.py", "--data-dir", str(data_dir))
    for clients in (1, 8):
        assert re.search(
            rf"single-row, {clients} client\(s\): \d+ requests, p50 ms [\d.]+, p99 ms [\d.]+, "
            r"req/s \d+",
            out,
        ), out
    assert re.search(r"1000-row batches: 2 requests, rows/s \d+", out), out
    scored = r"fedad.score on KDDTest\+.txt.gz: 22544 rows, rows/s \d+, peak memory MB \d+"
    assert re.search(scored, out), out
    assert "targets: p99_ms 20" in out
