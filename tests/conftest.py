"""Shared fixtures: the real datasets, a sample of NSL-KDD, one autoencoder run, the config."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from detector_helpers import synthetic_run
from kdd_sample import run_small, write_sample

from fedad import rundir
from fedad.config import compose

REPO = Path(__file__).resolve().parents[1]
DATA_DIR = Path(os.environ.get("FEDAD_DATA_DIR", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The real datasets; tests that need them skip, saying why, when they are absent."""
    if not (DATA_DIR / "nsl_kdd").is_dir():
        pytest.skip(
            f"real datasets not found at {DATA_DIR}: set FEDAD_DATA_DIR to the folder holding "
            "nsl_kdd/, ton_iot/ and nbaiot/"
        )
    return DATA_DIR


@pytest.fixture(scope="session")
def kdd_dir(data_dir, tmp_path_factory) -> Path:
    """A data folder whose ``nsl_kdd/`` holds seeded samples of the train and test files."""
    return write_sample(data_dir, tmp_path_factory.mktemp("kdd"))


@pytest.fixture(scope="session")
def autoencoder_run(kdd_dir, tmp_path_factory) -> tuple[Path, dict]:
    """One small federated autoencoder run on the sample, shared: its folder and results."""
    run_dir = tmp_path_factory.mktemp("autoencoder")
    return run_dir, run_small(kdd_dir, run_dir, "model=autoencoder")


@pytest.fixture()
def make_cfg():
    """Compose the real ``conf/config.yaml`` with overrides, as the entry point does."""

    def _compose(*overrides: str):
        return compose(overrides)

    return _compose


@pytest.fixture(scope="module")
def detector_folder(tmp_path_factory) -> Path:
    """A logistic-regression detector of a small synthetic run (the service's tests)."""
    run_dir = tmp_path_factory.mktemp("run")
    synthetic_run(run_dir, {"logistic_regression": {}})
    return run_dir / rundir.DETECTOR_DIR / "logistic_regression"
