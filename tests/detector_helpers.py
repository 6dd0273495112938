"""Detectors built for the tests: small synthetic runs of the centralized models (no simulation)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from fedad.baselines.runner import run_baselines
from fedad.config import compose
from fedad.data.synthetic import generate
from fedad.detector.build import write_detector
from fedad.federated.checkpoint import data_fingerprint
from fedad.pipeline import prepare_run

ROWS = 2000
OVERRIDES = (f"dataset.n_rows={ROWS}", "simulation.num_clients=2")


def synthetic_run(run_dir: Path, models: dict) -> tuple:
    """Prepare a small synthetic run, fit ``models`` with their validation, write each detector.

    Returns the config, the run's data and the fitted ModelResults by name.
    """
    cfg = compose(OVERRIDES)
    run = prepare_run(cfg, run_dir)
    results = run_baselines(
        {"models": models},
        run.data,
        cfg.train,
        keras_epochs=1,
        seed=0,
        model_cfgs={"logistic": {"name": "logistic"}},
        validate=True,
        target_fpr=0.05,
    )
    fingerprint = data_fingerprint(run.data, run.parts)
    for result in results:
        write_detector(cfg, run.data, fingerprint, result, run_dir)
    return cfg, run.data, {r.name: r for r in results}


def raw_rows(n: int = 300) -> pd.DataFrame:
    """Raw synthetic rows, as the generator writes them (labels and dropped columns included)."""
    return generate(n_rows=ROWS, seed=0).head(n).reset_index(drop=True)


def expected_scores(data, result, frame: pd.DataFrame) -> np.ndarray:
    """What the run's own objects say about raw rows: its preprocessor, scaler and model."""
    pre = data.preprocessor
    X = pre.transform(frame[[*pre.numeric, *pre.categorical]])
    return result.model.predict_scores(data.scaler.transform(X).astype(np.float32))
