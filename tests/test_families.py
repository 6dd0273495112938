"""Every centralized family's federated twin: XGBoost, the autoencoder, the MLP, on real data."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import xgboost as xgb
from flwr.app import RecordDict
from kdd_sample import SMALL, run_small

from fedad import rundir
from fedad.config import compose, make_settings
from fedad.data import scaling
from fedad.data.prepared import PreparedData
from fedad.detector.adapters import ADAPTERS
from fedad.federated import shards
from fedad.federated.families.autoencoder import (
    ERROR_ATTACK,
    ERROR_EDGES,
    ERROR_NORMAL,
    AutoencoderFamily,
    AutoencoderScorer,
    threshold_from_counts,
)
from fedad.federated.families.booster import BoosterFamily, BoosterScorer
from fedad.federated.families.classifier import OPTIMIZER_STATE, KerasFamily
from fedad.federated.grid import PAYLOAD
from fedad.federated.shards import write_shards
from fedad.federated.task import CLIENT_METRICS, load_site, local_split
from fedad.models import booster
from fedad.simulate import run

# --- the booster's trees --------------------------------------------------------------------


def test_merging_keeps_every_tree_and_weights_the_sites():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(900, 6)).astype(np.float32)
    y = np.digitize(X[:, 0], [-0.4, 0.4])  # three classes
    params = booster.params({"max_depth": 3, "learning_rate": 0.3}, 3, seed=0)
    merged = b""
    for part in np.array_split(np.arange(900), 3):
        trained = booster.train(b"", X[part], y[part], params, rounds=2)
        merged = booster.merge(merged, booster.last_rounds(trained, 2), 1 / 3)
    model = booster.load(merged)
    # 3 sites x 2 boosting rounds x 3 classes: Flower's aggregate_bagging would keep 3.
    assert model.num_boosted_rounds() == 6 and len(model.get_dump()) == 18
    # One site given the whole weight scores as the site's own model does.
    alone = booster.train(b"", X, y, params, rounds=2)
    again = booster.load(booster.merge(b"", booster.last_rounds(alone, 2), 1.0))
    rows = xgb.DMatrix(X)
    np.testing.assert_allclose(
        again.predict(rows, output_margin=True), alone.predict(rows, output_margin=True), rtol=1e-5
    )


@pytest.mark.slow
def test_federated_xgboost_learns_is_saved_whole_and_resumes_exactly(kdd_dir, tmp_path):
    whole = tmp_path / "whole"
    results = run_small(kdd_dir, whole, "model=xgboost", "model.local_rounds=2")
    history = pd.read_csv(whole / rundir.HISTORY_FILE)
    # Round 0 is the empty model (every row at the base score); training beats it.
    assert history["roc_auc"].iloc[-1] > history["roc_auc"].iloc[0] + 0.2
    assert results["models"]["federated_xgboost"]["macro_f1"] > 0.6
    # 3 rounds x 3 sites x 2 local boosting rounds, every tree kept.
    saved = booster.load((whole / rundir.BOOSTER_FILE).read_bytes())
    assert saved.num_boosted_rounds() == 18
    # The saved model, reloaded, scores what the server's last round measured.
    scorer = BoosterScorer(whole, 2)
    X_raw, y_test = shards.read_shard(shards.test_path(whole), "test")
    with np.load(whole / rundir.SCALING_FILE) as stats:
        X_test = scaling.standardize(X_raw, stats["mean"], stats["std"])
    from fedad.evaluation.metrics import compute_metrics

    metrics = compute_metrics(y_test, scorer.predict_scores(X_test), ["normal", "attack"])
    assert metrics["roc_auc"] == pytest.approx(history["roc_auc"].iloc[-1], abs=1e-12)
    # The run's detector holds the same booster and scores the same.
    shipped = whole / rundir.DETECTOR_DIR / "federated_xgboost" / rundir.DETECTOR_BOOSTER
    predict = ADAPTERS["booster"].load(shipped)
    np.testing.assert_array_equal(predict(X_test), scorer.predict_scores(X_test))
    # Cut after round 2, then resumed to 3: the same trees, the same history.
    cut = tmp_path / "cut"
    run_small(kdd_dir, cut, "model=xgboost", "model.local_rounds=2", "simulation.num_rounds=2")
    run(
        compose(
            [
                *SMALL,
                f"data_dir={kdd_dir}",
                "model=xgboost",
                "model.local_rounds=2",
                f"resume={cut}",
            ]
        ),
        cut,
        resume=True,
    )
    assert (cut / rundir.BOOSTER_FILE).read_bytes() == (whole / rundir.BOOSTER_FILE).read_bytes()
    # Timings differ; so does the payload: a resumed run asks every site for its scaling
    # sums again (real traffic, counted in the first round it runs).
    volatile = ["seconds", "started_at", *PAYLOAD, "mb_cumulative"]
    resumed = pd.read_csv(cut / rundir.HISTORY_FILE).drop(columns=volatile)
    pd.testing.assert_frame_equal(resumed, history.drop(columns=volatile))


@pytest.mark.slow
def test_cyclic_xgboost_trains_one_site_a_round(kdd_dir, tmp_path):
    run_small(kdd_dir, tmp_path, "model=xgboost", "strategy=fedxgb_cyclic")
    history = pd.read_csv(tmp_path / rundir.HISTORY_FILE)
    # One site a round, 1 local boosting round each: 3 trees after 3 rounds.
    assert booster.load((tmp_path / rundir.BOOSTER_FILE).read_bytes()).num_boosted_rounds() == 3
    assert history["roc_auc"].iloc[-1] > history["roc_auc"].iloc[0]


# --- the autoencoder ------------------------------------------------------------------------


@pytest.mark.slow
def test_federated_autoencoder_detects_with_a_threshold_from_validation_rows(
    kdd_dir, autoencoder_run
):
    run_dir, results = autoencoder_run
    assert results["models"]["federated_autoencoder"]["roc_auc"] > 0.5
    scorer = AutoencoderScorer(run_dir)
    cfg = compose([*SMALL, f"data_dir={kdd_dir}", "model=autoencoder"])
    with np.load(run_dir / rundir.SCALING_FILE) as stats:
        config = {"scale-mean": stats["mean"].tolist(), "scale-std": stats["std"].tolist()}
    flat = {
        **{f"train.{k}": v for k, v in cfg.train.items()},
        "run-dir": str(run_dir),
        "seed": int(cfg.seed),
    }
    normal, attack = np.zeros(len(ERROR_EDGES) - 1), np.zeros(len(ERROR_EDGES) - 1)
    for pid in range(3):
        site = load_site(flat, pid, config, float(cfg.train.val_fraction))
        errors = scorer.predict_scores(site.X_val)
        normal += np.histogram(errors[site.y_val == 0], ERROR_EDGES)[0]
        attack += np.histogram(errors[site.y_val != 0], ERROR_EDGES)[0]
        # The validation rows are a slice of the site's training shard, apart from its test slice.
        n = len(shards.read_shard(shards.shard_path(run_dir, pid), "test")[1])
        train, val, test = local_split(
            n, float(cfg.train.test_fraction), float(cfg.train.val_fraction), (3, pid)
        )
        assert len(val) == len(site.y_val) and not set(val) & set(test)
    # The saved threshold is the one these validation rows give, and no other rows.
    assert scorer.threshold == threshold_from_counts(ERROR_EDGES, normal, attack)


def test_threshold_maximizes_macro_f1_of_the_counts():
    edges = np.array([0.0, 1.0, 2.0, 3.0, np.inf])
    # Normal rows in the two lowest bins, attacks in the two highest: flag from 2.0.
    assert threshold_from_counts(edges, np.array([5, 5, 0, 0]), np.array([0, 0, 4, 4])) == 2.0
    # No attack among the counted rows: flag what lies above 99 % of the normal rows.
    assert threshold_from_counts(edges, np.array([98, 1, 1, 0]), np.zeros(4)) == 2.0
    assert math.isinf(threshold_from_counts(edges, np.zeros(4), np.zeros(4)))


# --- what a site sends ----------------------------------------------------------------------


@pytest.fixture()
def tiny(tmp_path) -> tuple[PreparedData, list[np.ndarray], Path]:
    rng = np.random.default_rng(1)
    X = rng.normal(size=(600, 8)).astype(np.float32)
    y = (X[:, 0] > 0.8).astype(np.int64)
    data = PreparedData(
        X[:500], y[:500], X[500:], y[500:], list("abcdefgh"), ["normal", "attack"], "binary"
    )
    parts = np.array_split(np.arange(500), 2)
    write_shards(data, parts, tmp_path)
    return data, parts, tmp_path


@pytest.mark.parametrize("model", ["autoencoder", "xgboost"])
def test_a_site_sends_the_model_and_its_counts_never_a_row(tiny, model):
    data, parts, run_dir = tiny
    strategy = "fedxgb_bagging" if model == "xgboost" else "fedavg"
    cfg = compose([f"model={model}", f"strategy={strategy}", "simulation.num_clients=2"])
    settings = {**make_settings(cfg, data, 2, run_dir), "resume": False, "fingerprint": "{}"}
    family = (BoosterFamily if model == "xgboost" else AutoencoderFamily)(settings)
    family.seed_initial(0)
    start = family.initial_arrays()
    site = load_site(settings, 0, {}, family.val_fraction())
    arrays, train_metrics = family.fit(start, site, {}, seed=1)
    # Training: the model's arrays, and scalar metrics (the reply's weight among them).
    assert [a.shape for a in arrays] == [a.shape for a in start] or model == "xgboost"
    assert all(isinstance(v, float | int) for v in train_metrics.values())
    assert train_metrics["num-examples"] <= len(site.y_train)
    evaluation = family.site_metrics(arrays, site, family.evaluate_config())
    scalars = {"loss", *CLIENT_METRICS, "num-examples"}
    lists = {k for k, v in evaluation.items() if isinstance(v, list)}
    assert set(evaluation) - lists == scalars
    if model == "autoencoder":
        # Per-bin counts of the validation rows' errors, on the server's edges: no value.
        assert lists == {ERROR_NORMAL, ERROR_ATTACK}
        counts = [evaluation[k] for k in sorted(lists)]
        assert all(len(c) == len(ERROR_EDGES) - 1 for c in counts)
        assert sum(map(sum, counts)) == len(site.y_val)
        assert all(isinstance(v, int) for c in counts for v in c)
    else:
        assert not lists
        # The booster's bytes are trees: split thresholds, no training row.
        trees = json.loads(booster.from_array(arrays[0]))
        assert len(trees["learner"]["gradient_booster"]["model"]["trees"]) == 1


@pytest.mark.parametrize("keep", [True, False])
def test_a_keras_site_keeps_its_optimizer_between_rounds(tiny, keep):
    data, parts, run_dir = tiny
    cfg = compose(["model=mlp", "simulation.num_clients=2", f"train.keep_optimizer={keep}"])
    settings = {**make_settings(cfg, data, 2, run_dir), "resume": False, "fingerprint": "{}"}
    family = KerasFamily(settings)
    family.init_runtime()
    family.seed_initial(0)
    start = family.initial_arrays()
    # The ClientApp hands the site Flower's context.state, kept per node for the run.
    state = RecordDict()
    steps = []
    for server_round in (1, 2):
        site = load_site(settings, 0, {}, family.val_fraction(), state=state)
        family.fit(start, site, {"server-round": server_round}, seed=server_round)
        if keep:
            steps.append(int(state[OPTIMIZER_STATE].to_numpy_ndarrays()[0]))
    if keep:
        # Adam's step count goes on from round 1's: its moments were restored, not zeroed.
        per_round = math.ceil(len(site.y_train) / cfg.train.batch_size)
        assert steps == [per_round, 2 * per_round]
    else:
        assert OPTIMIZER_STATE not in state
