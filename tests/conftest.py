"""Shared fixtures: where the real datasets are, and the composed Hydra config."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

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


@pytest.fixture()
def make_cfg():
    """Compose the real ``conf/config.yaml`` with overrides, as the entry point does."""

    def _compose(*overrides: str):
        return compose(overrides)

    return _compose
