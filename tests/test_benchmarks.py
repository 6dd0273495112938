"""The benchmark scripts run to completion at their smallest size (correctness only, no timing)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from fedad.config import compose

# What the benchmarks fit: the baselines of conf/baselines/all.yaml.
BASELINES = tuple(compose(["baselines=all"]).baselines.models)

# Each script end to end: minutes each, so `pytest -m long` runs them, the default run does not.
pytestmark = [pytest.mark.slow, pytest.mark.long]

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
        "(target <= 1.1: ",
        "(target <= 1.05: ",
        "start-up: launch to round 1",
        "Ray and actor start-up alone",
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


def test_scale_benchmark_prints_every_size_and_the_targets():
    out = run_quick("bench_scale.py")
    lines = out.splitlines()
    sizes = next(line for line in lines if line.startswith("sites "))
    sampled = next(line for line in lines if line.startswith("sampled per round "))
    assert sizes.split()[1:] == ["3", "6", "6"]
    assert sampled.split()[3:] == ["2", "2", "3"]
    for label in (
        "write shards s",
        "steady-state round s",
        "all-site evaluation + stop s",
        "peak memory MB",
        "per-round time: 6 sites / 3 sites, 2 sampled",
        "peak memory: 6 sites / 3 sites, 2 sampled",
        "start-up: 6 sites / 3 sites, 2 sampled",
    ):
        assert label in out


def test_baselines_benchmark_prints_every_baseline():
    out = run_quick("bench_baselines.py")
    assert "fit s" in out and "peak MB" in out
    rows = [line.split() for line in out.splitlines() if line.strip().startswith("2000 ")]
    assert sorted(row[1] for row in rows) == sorted(BASELINES)
    assert all(len(row) == 7 for row in rows)


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


def test_rows_benchmark_prints_every_step_per_size_and_the_growth():
    out = run_quick("bench_rows.py")
    assert "dataset=synthetic_ciciot" in out and "task=multiclass" in out
    lines = out.splitlines()
    # Each size's own table as it finishes, then the table of both.
    headers = [line for line in lines if line.startswith("step ")]
    assert [h.split()[1:3] for h in headers[:2]] == [["3000", "|"], ["6000", "|"]]
    header = headers[-1]
    assert header.split()[1:3] == ["3000", "6000"]
    rows = {line[:32].strip(): line[32:].split() for line in lines[lines.index(header) + 1 :]}
    steps = [
        "read/generate",
        "prepare",
        "audit",
        "partition and shards",
        "federated training",
        *(f"baseline {name}" for name in BASELINES),
        "explanations",
        "figures and outputs",
        "whole run",
    ]
    for step in steps:
        # Two sizes of seconds, a bar, two sizes of peak MB, a bar, the growth.
        cells = rows[step]
        assert len(cells) == 7 and cells[2] == cells[5] == "|", (step, cells)
        figures = [float(c) for c in (*cells[:2], *cells[3:5])]
        assert all(value >= 0 for value in figures)
    assert re.search(r"steps growing more than [\d.]+ x from 3000 to 6000 rows", out)
    assert re.search(r"whole run at 6000 rows: \d+ s \(target at 1,048,575 rows <= 900 s", out)
    assert re.search(r"peak memory at 6000 rows: \d+ MB", out)
