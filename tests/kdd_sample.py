"""A seeded sample of NSL-KDD in its own format, and the small federated runs made on it."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np

from fedad.config import compose

# Small enough for a few rounds on 3 sites in seconds.
TRAIN_ROWS, TEST_ROWS = 4000, 2000
TEST_FILE = "KDDTest+.txt.gz"
SMALL = [
    "dataset=nsl_kdd",
    "simulation.num_clients=3",
    "simulation.num_rounds=3",
    "simulation.local_sites=0",
    "partition=iid",
    "baselines=none",
    "explain=false",
    "seed=3",
]


def write_sample(data_dir: Path, out: Path) -> Path:
    """``out/nsl_kdd/`` with seeded samples of the train and test files; returns ``out``."""
    (out / "nsl_kdd").mkdir()
    rng = np.random.default_rng(0)
    for name, n in (("KDDTrain+_20Percent.txt.gz", TRAIN_ROWS), (TEST_FILE, TEST_ROWS)):
        with gzip.open(data_dir / "nsl_kdd" / name, "rt") as f:
            lines = f.read().splitlines()
        keep = np.sort(rng.choice(len(lines), size=n, replace=False))
        with gzip.open(out / "nsl_kdd" / name, "wt") as f:
            f.write("\n".join(lines[i] for i in keep) + "\n")
    return out


def run_small(kdd_dir: Path, run_dir: Path, *overrides: str) -> dict:
    """A small federated run on the sample (:data:`SMALL` plus ``overrides``); its results."""
    from fedad.simulate import run  # heavy: only for the tests that run

    return run(compose([*SMALL, f"data_dir={kdd_dir}", *overrides]), run_dir)
