"""A Hydra multirun's jobs share Ray and the actors when their engine settings agree.

Each job of ``python -m fedad.simulate -m`` runs in the one process; a job whose
simulation ended normally leaves Ray and its actors to the next
(``fedad.federated.engine.EngineStart.keep``), which adopts them if its settings
define the same actors, and restarts them if not. The engine logs the actors'
process ids as it keeps and reuses them: these tests read them there.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest

REPO = Path(__file__).resolve().parents[1]
# Small: synthetic rows, three sites, two rounds, no baselines but the federated model's twin.
BASE = [
    "dataset.n_rows=3000",
    "simulation.num_clients=3",
    "simulation.num_rounds=2",
    "model=logistic",
    "partition=iid",
    "baselines=none",
    "explain=false",
    "eda=false",
    "detector.write=false",
    "simulation.local_sites=0",
]
KEPT = re.compile(r"engine kept for the next job: actor pids \[([\d, ]+)\]")
REUSED = re.compile(r"engine reused from the previous job: actor pids \[([\d, ]+)\]")


def _cli(*args: str, cwd: Path) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "fedad.simulate", *args],
        cwd=cwd,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=600,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    return output


def _pids(pattern: re.Pattern, output: str) -> list[list[int]]:
    return [sorted(int(p) for p in m.split(",")) for m in pattern.findall(output)]


def _ray_actors_alive(pids: list[int]) -> list[int]:
    """Those of ``pids`` still running as Ray actors (a reused pid runs something else)."""
    alive = []
    for pid in pids:
        try:
            command = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if b"ray::" in command or b"ClientAppActor" in command:
            alive.append(pid)
    return alive


def _left_running(pids: list[int], wait: float = 20) -> list[int]:
    deadline = time.monotonic() + wait
    while (alive := _ray_actors_alive(pids)) and time.monotonic() < deadline:
        time.sleep(0.5)
    return alive


def _comparison(run_dir: Path) -> pd.DataFrame:
    table = pd.read_csv(run_dir / "comparison.csv")
    return table.drop(columns=[c for c in table if "seconds" in c])


def _history(run_dir: Path) -> pd.DataFrame:
    return pd.read_csv(run_dir / "history.csv").drop(columns=["seconds", "started_at"])


@pytest.fixture(scope="module")
def same_settings(tmp_path_factory):
    """Two seeds as one multirun (one engine) and as two separate runs."""
    root = tmp_path_factory.mktemp("reuse")
    sweep = _cli("-m", *BASE, "seed=0,1", f"hydra.sweep.dir={root / 'sweep'}", cwd=root)
    alone = {
        seed: _cli(*BASE, f"seed={seed}", f"hydra.run.dir={root / f'alone{seed}'}", cwd=root)
        for seed in (0, 1)
    }
    return SimpleNamespace(root=root, sweep=sweep, alone=alone)


@pytest.mark.long
def test_a_shared_engine_gives_the_results_of_separate_runs(same_settings):
    root = same_settings.root
    for job, seed in (("0", 0), ("1", 1)):
        pd.testing.assert_frame_equal(
            _comparison(root / "sweep" / job), _comparison(root / f"alone{seed}"), check_exact=True
        )
        pd.testing.assert_frame_equal(
            _history(root / "sweep" / job), _history(root / f"alone{seed}"), check_exact=True
        )
    # The seeds differ, so the jobs must too: the second job did not replay the first.
    assert not _comparison(root / "sweep" / "0").equals(_comparison(root / "sweep" / "1"))


@pytest.mark.long
def test_jobs_with_equal_engine_settings_reuse_the_actors(same_settings):
    kept, reused = _pids(KEPT, same_settings.sweep), _pids(REUSED, same_settings.sweep)
    assert len(kept) == 2 and len(reused) == 1, same_settings.sweep
    assert kept[0] == reused[0] == kept[1]
    assert "engine settings changed" not in same_settings.sweep
    # The process's exit ended the engine its last job kept.
    assert _left_running(kept[1]) == []
    # A single run keeps nothing, as before multiruns shared their engine.
    for output in same_settings.alone.values():
        assert not KEPT.search(output) and not REUSED.search(output)


@pytest.mark.long
def test_an_engine_settings_change_restarts_the_actors(tmp_path):
    output = _cli(
        "-m",
        *BASE,
        "simulation.client_resources.num_cpus=1,2",
        f"hydra.sweep.dir={tmp_path / 'sweep'}",
        cwd=tmp_path,
    )
    kept = _pids(KEPT, output)
    assert len(kept) == 2, output
    assert not REUSED.search(output)
    assert "engine settings changed: ending the previous job's Ray and actors" in output
    assert not set(kept[0]) & set(kept[1])
    # The first job's actors ended when the second job's settings differed.
    assert _left_running(kept[0] + kept[1]) == []
    for job in ("0", "1"):
        assert (tmp_path / "sweep" / job / "comparison.csv").is_file()
