"""Detectors built for the tests: small synthetic runs, and what their scores must reproduce."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from fedad import score
from fedad.baselines.runner import run_baselines
from fedad.config import compose
from fedad.data.synthetic import generate
from fedad.detector import Detector
from fedad.detector.build import write_detector
from fedad.evaluation.metrics import compute_metrics
from fedad.federated.checkpoint import data_fingerprint
from fedad.run.pipeline import prepare_run

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


def assert_score_reproduces_run(
    folder: Path, test_file: Path, columns: list[str], results: dict, out: Path
) -> tuple[Detector, pd.DataFrame]:
    """``fedad.score`` on a headerless raw test file gives its run's metrics, to 4 decimals.

    One output row per input row, duplicates included; the metrics are taken
    over the rows the run scored (it dropped exact duplicates, features and
    class, within its test file). Returns the detector and the output table.
    """
    score.main([str(folder), str(test_file), "-o", str(out)])
    table = pd.read_csv(out)
    raw = pd.read_csv(test_file, header=None, names=columns)
    assert len(table) == len(raw)
    detector = Detector.load(folder)
    kept = ~raw[detector.features].assign(_class=table["true_class"]).duplicated().to_numpy()
    names = pd.Index(detector.class_names)
    scores = (
        table["attack_score"]
        if detector.anomaly
        else table[[f"p_{c}" for c in detector.class_names]]
    )
    metrics = compute_metrics(
        names.get_indexer(table["true_class"])[kept],
        scores.to_numpy()[kept],
        detector.class_names,
        names.get_indexer(table["predicted"])[kept],
    )
    recorded = results["models"][detector.name]
    assert metrics["n"] == recorded["n"] == results["data"]["n_test"]
    for key, value in metrics.items():
        if isinstance(value, float):
            assert round(value, 4) == round(recorded[key], 4), key
        elif key == "per_class_recall":
            assert {k: round(v, 4) for k, v in value.items()} == {
                k: round(v, 4) for k, v in recorded[key].items()
            }
        else:
            assert value == recorded[key], key
    return detector, table
