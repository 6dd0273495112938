"""fedad as a package: a wheel that holds its configs, and an install no stray folder shadows."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pandas as pd
import pytest

from fedad.config import available_options

REPO = Path(__file__).resolve().parents[1]
# One round on 2 sites: enough to start Ray actors that import fedad, cheap otherwise.
TINY = [
    "dataset.n_rows=1000",
    "simulation.num_clients=2",
    "simulation.num_rounds=1",
    "model=logistic",
    "partition=iid",
    "baselines=none",
    "explain=false",
]


def _clean_env() -> dict[str, str]:
    """The environment without anything that points Python at the checkout."""
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "FEDAD_DATA_DIR")}


def _run(args: list[str], cwd: Path, python: str = sys.executable) -> subprocess.CompletedProcess:
    return subprocess.run(
        [python, *args], cwd=cwd, env=_clean_env(), capture_output=True, text=True, timeout=600
    )


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    dist = tmp_path_factory.mktemp("dist")
    done = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q"]
        + ["-w", str(dist), str(REPO)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    (path,) = dist.glob("fedad-*.whl")
    return path


def test_the_wheel_holds_the_whole_config_tree(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "fedad/conf/config.yaml" in names
    for group in ("dataset", "partition", "model", "strategy", "baselines", "experiment"):
        for option in available_options(group):
            assert f"fedad/conf/{group}/{option}.yaml" in names, (group, option)


@pytest.mark.slow
def test_an_installed_wheel_runs_outside_the_checkout(wheel, tmp_path):
    venv = tmp_path / "venv"
    # The test environment's packages stay visible; fedad itself comes from the wheel only.
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True)
    python = str(venv / "bin" / "python")
    done = _run(
        ["-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)], tmp_path, python
    )
    assert done.returncode == 0, done.stderr[-3000:]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    probe = "import fedad, fedad.config as c; print(fedad.__file__); print(c.CONF_DIR)"
    done = _run(["-c", probe], elsewhere, python)
    module, conf = done.stdout.split()
    assert Path(module).is_relative_to(venv) and Path(conf).is_relative_to(venv), done.stdout
    run_dir = elsewhere / "run"
    done = _run(["-m", "fedad.simulate", *TINY, f"hydra.run.dir={run_dir}"], elsewhere, python)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads((run_dir / "results.json").read_text())["status"] == "done"


@pytest.mark.slow
def test_a_folder_named_fedad_in_the_working_directory_shadows_nothing(tmp_path):
    """A clone named fedad beside the user, and a run folder named fedad for the actors."""
    parent = tmp_path / "parent"
    (parent / "fedad").mkdir(parents=True)
    (parent / "fedad" / "README.md").write_text("a clone of fedad, seen from its parent folder\n")
    done = _run(["-m", "fedad.simulate", *TINY, "hydra.run.dir=fedad/run"], parent)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((parent / "fedad" / "run" / "results.json").read_text())
    assert results["status"] == "done"
    history = pd.read_csv(parent / "fedad" / "run" / "history.csv")
    # Every site's actor imported fedad and answered: no failed training or evaluation.
    assert list(history["round"]) == [0, 1]
    assert history["failures"].sum() == 0 and history["eval_failures"].sum() == 0
