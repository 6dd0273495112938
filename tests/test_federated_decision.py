"""The federated model's calibrated decision: a threshold from counts its sites send."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import ConfigRecord
from generated import binary_data

from fedad import rundir
from fedad.config import compose, make_settings
from fedad.data.prepared import PreparedData
from fedad.evaluation import comparison
from fedad.evaluation.decision import PROBABILITY_EDGES, decide, threshold_from_scores
from fedad.evaluation.metrics import attack_score, compute_metrics
from fedad.federated.families.registry import family_for
from fedad.federated.simulation import run_federated
from fedad.federated.task import ASK_SCORES, SCORE_ATTACK, SCORE_NORMAL, load_site

BASE = ["simulation.num_clients=3", "simulation.local_sites=0", "model=logistic"]


def within_one_bin(threshold: float, below: float, above: float) -> bool:
    """The threshold is a bin edge next to the bin (or the edge) where the pooled rule splits.

    ``below`` is the highest unflagged score, ``above`` the lowest flagged one.
    """
    at = int(np.searchsorted(PROBABILITY_EDGES, threshold))
    lower = PROBABILITY_EDGES[max(at - 1, 0)]
    upper = PROBABILITY_EDGES[min(at + 1, len(PROBABILITY_EDGES) - 1)]
    return bool(lower <= above and upper >= below)


@pytest.fixture(scope="module")
def data() -> PreparedData:
    # Mostly attack rows: an argmax decision of the global model flags much normal traffic.
    return binary_data(
        2400,
        600,
        12,
        scale=(0.5, 9, 3),
        n_informative=4,
        weights=[0.25],
        flip_y=0.05,
        random_state=2,
    )


@pytest.fixture(scope="module")
def partitions(data) -> list[np.ndarray]:
    order = np.random.default_rng(0).permutation(len(data.y_train))
    return [np.sort(order[:400]), np.sort(order[400:1200]), np.sort(order[1200:])]


@pytest.fixture(scope="module")
def calibrated(data, partitions, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("calibrated")
    overrides = [*BASE, "simulation.num_rounds=3", "decision.rule=target_fpr"]
    cfg = compose([*overrides, "decision.target_fpr=0.05"])
    return cfg, run_federated(cfg, data, partitions, run_dir)[0], run_dir


def _sites_validation(cfg, data, partitions, run_dir):
    """Every site's validation rows and the kept model's scores of them, pooled (a check only)."""
    settings = make_settings(cfg, data, len(partitions), run_dir)
    family = family_for(settings)
    with np.load(run_dir / rundir.SCALING_FILE) as stats:
        config = ConfigRecord(
            {"scale-mean": stats["mean"].tolist(), "scale-std": stats["std"].tolist()}
        )
    sites = [load_site(settings, pid, config, family.val_fraction()) for pid in range(3)]
    return settings, family, sites, config


@pytest.mark.slow
def test_the_federated_threshold_is_the_pooled_validation_threshold_within_one_bin(
    calibrated, data, partitions
):
    cfg, result, run_dir = calibrated
    saved = rundir.read_object(run_dir / rundir.THRESHOLD_FILE)
    assert saved["rule"] == "target_fpr" and saved["target_fpr"] == 0.05
    assert result.model.threshold == saved["threshold"]
    _, _, sites, _ = _sites_validation(cfg, data, partitions, run_dir)
    X_val = np.concatenate([s.X_val for s in sites])
    y_val = np.concatenate([s.y_val for s in sites])
    assert saved["validation_rows"] == len(y_val) > 0
    scores = result.model.predict_scores(X_val)
    pooled = threshold_from_scores(y_val, scores, "target_fpr", 0.05)
    attack = attack_score(scores)
    below, above = attack[attack < pooled].max(), attack[attack >= pooled].min()
    assert within_one_bin(saved["threshold"], below, above)
    # At most the target share of the pooled validation's normal rows is flagged.
    assert (attack[y_val == 0] >= saved["threshold"]).mean() <= 0.05


@pytest.mark.slow
def test_the_calibration_part_of_a_reply_is_counts_only(calibrated, data, partitions):
    cfg, result, run_dir = calibrated
    settings, family, sites, config = _sites_validation(cfg, data, partitions, run_dir)
    arrays = family.initial_arrays()
    reply = family.site_metrics(arrays, sites[0], {**config, ASK_SCORES: True})
    bins = len(PROBABILITY_EDGES) - 1
    for key in (SCORE_NORMAL, SCORE_ATTACK):
        assert len(reply[key]) == bins and all(isinstance(c, int) for c in reply[key])
    assert sum(reply[SCORE_NORMAL]) + sum(reply[SCORE_ATTACK]) == len(sites[0].y_val)
    # Nothing else in the reply is per row: the rest are the test slice's scalar metrics.
    lists = {k for k, v in reply.items() if isinstance(v, list)}
    assert lists == {SCORE_NORMAL, SCORE_ATTACK}
    without = family.site_metrics(arrays, sites[0], config)
    assert not {SCORE_NORMAL, SCORE_ATTACK} & set(without)


@pytest.mark.slow
def test_the_federated_row_is_scored_under_the_rule_with_argmax_beside(calibrated, data):
    _, result, run_dir = calibrated
    with np.load(run_dir / rundir.SCALING_FILE) as stats:
        X_test = (data.X_test - stats["mean"]) / stats["std"]
    scores = result.model.predict_scores(X_test.astype(np.float32))
    names = list(data.class_names)
    tuned = compute_metrics(
        data.y_test, scores, names, y_pred=decide(scores, result.model.threshold)
    )
    argmax = compute_metrics(data.y_test, scores, names, y_pred=decide(scores, None))
    assert result.metrics["fpr"] == pytest.approx(tuned["fpr"], abs=1e-9)
    assert result.info["argmax"]["fpr"] == pytest.approx(argmax["fpr"], abs=1e-9)
    assert result.info["decision"]["rule"] == "target_fpr"
    row = comparison.table([result]).iloc[0]
    assert row["decision"] == "target_fpr" and row["threshold"] == result.model.threshold
    assert row["argmax_fpr"] == pytest.approx(argmax["fpr"])
    # No per-site list reached clients.csv.
    clients = (run_dir / rundir.CLIENTS_FILE).read_text()
    assert SCORE_NORMAL not in clients and "[" not in clients


@pytest.mark.slow
def test_one_rule_for_every_row_of_a_runs_comparison_and_its_detector(kdd_dir, tmp_path):
    import pandas as pd
    from kdd_sample import run_small

    from fedad.detector import Detector

    results = run_small(
        kdd_dir,
        tmp_path,
        "baselines=supervised",
        "model=logistic",
        "decision.rule=target_fpr",
        "decision.target_fpr=0.02",
        "simulation.local_sites=2",
    )
    table = pd.read_csv(tmp_path / rundir.COMPARISON_CSV)
    scored = table[table["kind"].isin(["federated", "local", "supervised"])]
    assert {"federated_logistic", "central_logistic", "logistic_regression"} <= set(scored["model"])
    assert (scored["decision"] == "target_fpr").all()
    # One threshold per model; the sites alone each chose their own on their validation rows.
    assert scored.loc[scored["kind"] != "local", "threshold"].notna().all()
    for name in scored["model"]:
        assert results["models"][name]["info"]["decision"]["target_fpr"] == 0.02
    assert {"local_logistic", "local_logistic_worst"} <= set(scored["model"])
    # The federated detector decides by the run's threshold by default.
    detector = Detector.load(tmp_path / rundir.DETECTOR_DIR / "federated_logistic")
    assert detector.default_rule == "target_fpr"
    assert (
        detector.check_rule(None)
        == results["models"]["federated_logistic"]["info"]["decision"]["threshold"]
    )
