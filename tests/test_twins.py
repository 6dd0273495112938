"""The centralized twins at convergence, on every training row, and their budgets compared."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from sklearn.model_selection import train_test_split
from sklearn.preprocessing import StandardScaler

from fedad.baselines import runner, stopping, twins, unsupervised
from fedad.baselines.runner import run_baselines, with_twin
from fedad.baselines.stopping import validation_rows
from fedad.data.prepared import PreparedData
from fedad.errors import FedadError
from fedad.evaluation import comparison
from fedad.evaluation.comparison import ModelResult
from fedad.evaluation.metrics import macro_f1

TRAIN_CFG = {"batch_size": 32, "learning_rate": 0.01, "optimizer": "adam"}
STOP = {"patience": 2, "min_delta": 0.0, "val_fraction": 0.2}
MODEL_CFGS = {
    "cnn": {"name": "cnn", "filters": 4, "kernel_size": 3, "dense_units": 8, "dropout": 0.1},
    "logistic": {"name": "logistic"},
    "autoencoder": {"name": "autoencoder", "units": 8, "bottleneck": 2, "dropout": 0.0},
}


def prepared(X: np.ndarray, y: np.ndarray, n_classes: int = 2, seed: int = 0) -> PreparedData:
    """A stratified 75/25 split of ``X``, ``y`` as the arrays every model shares."""
    X_tr, X_te, y_tr, y_te = train_test_split(X, y, test_size=0.25, stratify=y, random_state=seed)
    names = ["normal", "attack"] if n_classes == 2 else ["normal", *"abcdefgh"[: n_classes - 1]]
    return PreparedData(
        X_train=X_tr.astype(np.float32),
        y_train=y_tr.astype(np.int64),
        X_test=X_te.astype(np.float32),
        y_test=y_te.astype(np.int64),
        feature_names=[f"f{i}" for i in range(X.shape[1])],
        class_names=names,
        task="binary" if n_classes == 2 else "multiclass",
        scaler=StandardScaler().fit(X_tr),
    )


def signal(n: int, d: int, seed: int, n_classes: int = 2, noise: float = 1.0) -> PreparedData:
    """Classes that shift the mean of every feature, blurred by ``noise``; every row unique."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, n_classes, n)
    X = y[:, None] * 0.6 + rng.normal(0.0, noise, (n, d))
    return prepared(X, y, n_classes, seed)


def noise(n: int, d: int, seed: int) -> PreparedData:
    """Labels unrelated to the features: nothing to learn, so validation loss soon plateaus."""
    rng = np.random.default_rng(seed)
    return prepared(rng.normal(size=(n, d)), rng.integers(0, 2, n), 2, seed)


def by_name(results: list[ModelResult]) -> dict[str, ModelResult]:
    return {r.name: r for r in results}


def test_a_keras_twin_stops_on_a_plateau_and_keeps_its_best_epoch():
    pytest.importorskip("keras")
    data = noise(500, 8, seed=1)
    cfg = with_twin({"stop": STOP, "models": {}}, "logistic")
    # A fast learning rate: the loss falls to its floor within a few epochs, then wanders.
    train_cfg = {**TRAIN_CFG, "learning_rate": 0.1}
    (twin,) = run_baselines(cfg, data, train_cfg, 30, seed=0, model_cfgs=MODEL_CFGS, validate=True)
    info = twin.info
    curve = info["stopping"]["curve"]
    assert info["epochs"] == 30
    assert info["epochs_run"] == len(curve) < 30
    # Stopped by patience: the best epoch is `patience` epochs before the last one.
    assert info["best_epoch"] == info["epochs_run"] - STOP["patience"]
    assert info["best_epoch"] == int(np.argmin(curve)) + 1
    # The weights kept are the best epoch's: on the stopping slice, its loss is the minimum.
    fit_idx, held_idx = validation_rows(data.y_train, STOP["val_fraction"], 0)
    X_train = data.scaled()[0]
    loss = twin.model.estimator.evaluate(
        X_train[held_idx], data.y_train[held_idx], batch_size=32, verbose=0, return_dict=True
    )["loss"]
    assert loss == pytest.approx(min(curve), rel=1e-5)
    # One fit on the rest gives both the result and its validation score on that slice.
    assert info["fit_rows"] == info["fit_rows_used"] == len(fit_idx)
    assert info["stopping"]["val_rows"] == len(held_idx)
    held = info["validation"]
    assert held["refit"] is False and held["rows"] == len(held_idx) and held["fraction"] == 0.2
    predicted = twin.model.predict(X_train[held_idx])
    assert info["validation_macro_f1"] == pytest.approx(
        macro_f1(data.y_train[held_idx], predicted, 2)
    )


def test_xgboost_keeps_the_trees_up_to_its_best_round_and_predicts_with_them():
    xgboost = pytest.importorskip("xgboost")
    data = signal(1200, 6, seed=2, noise=2.5)
    cfg = {
        "stop": {**STOP, "patience": 3},
        "models": {"xgboost": {"n_estimators": 200, "learning_rate": 0.5}},
    }
    (r,) = run_baselines(cfg, data, TRAIN_CFG, 1, seed=0)
    info, booster = r.info, r.model.estimator.get_booster()
    curve = info["stopping"]["curve"]
    # Noisy labels, a fast learning rate: the validation log-loss turns up long before 200.
    assert len(curve) == info["best_iteration"] + 1 + 3 < 200
    assert info["best_iteration"] == int(np.argmin(curve))
    assert info["trees"] == info["boosting_rounds"] == info["best_iteration"] + 1
    assert booster.num_boosted_rounds() == info["trees"]
    X_test = data.scaled()[1]
    kept = booster.predict(xgboost.DMatrix(X_test), iteration_range=(0, info["trees"]))
    np.testing.assert_allclose(r.scores[:, 1], kept, rtol=1e-6)


def test_multiclass_xgboost_counts_a_tree_per_class_and_round():
    pytest.importorskip("xgboost")
    data = signal(900, 6, seed=3, n_classes=4, noise=2.0)
    cfg = {"stop": STOP, "models": {"xgboost": {"n_estimators": 100, "learning_rate": 0.5}}}
    (r,) = run_baselines(cfg, data, TRAIN_CFG, 1, seed=0)
    assert r.info["boosting_rounds"] == r.info["best_iteration"] + 1 < 100
    assert r.info["trees"] == 4 * r.info["boosting_rounds"]
    (off,) = run_baselines({"models": cfg["models"]}, data, TRAIN_CFG, 1, seed=0)
    assert off.info["trees"] == 4 * 100 and "stopping" not in off.info


def test_the_stopping_slice_holds_training_rows_only(monkeypatch):
    pytest.importorskip("keras")
    data = signal(600, 6, seed=4)
    X_train, X_test = data.scaled()
    seen: dict[str, np.ndarray] = {}
    real_fit, real_stopping = runner.fit_supervised, unsupervised.keras_stopping

    def spy_fit(name, params, X, y, *args, validation=None, **kwargs):
        seen[name], seen[f"{name}_fit"] = validation[0], X
        return real_fit(name, params, X, y, *args, validation=validation, **kwargs)

    def spy_stopping(stop, validation):
        seen["central_autoencoder"] = validation[0]
        return real_stopping(stop, validation)

    monkeypatch.setattr(runner, "fit_supervised", spy_fit)
    monkeypatch.setattr(unsupervised, "keras_stopping", spy_stopping)
    cfg = {
        "stop": STOP,
        "models": {
            "central_logistic": {},
            "xgboost": {"n_estimators": 20},
            "central_autoencoder": {},
        },
    }
    run_baselines(cfg, data, TRAIN_CFG, 3, seed=0, model_cfgs=MODEL_CFGS)
    train_rows = {row.tobytes() for row in X_train}
    test_rows = {row.tobytes() for row in X_test}
    normal_train = {row.tobytes() for row in X_train[data.y_train == 0]}
    for name in ("central_logistic", "xgboost", "central_autoencoder"):
        held = {row.tobytes() for row in seen[name]}
        assert held and held <= train_rows and not held & test_rows, name
    for name in ("central_logistic", "xgboost"):
        fitted = {row.tobytes() for row in seen[f"{name}_fit"]}
        # The slice and the fit rows split the training rows between them.
        assert not fitted & {row.tobytes() for row in seen[name]}
        assert len(fitted) + len(seen[name]) == len(train_rows)
    assert {row.tobytes() for row in seen["central_autoencoder"]} <= normal_train


def _federated(twin: ModelResult, info: dict) -> ModelResult:
    """A federated row beside ``twin``: its metrics a little lower, its budgets in ``info``."""
    metrics = {k: v - 0.01 if isinstance(v, float) else v for k, v in twin.metrics.items()}
    return ModelResult("federated_xgboost", "federated", metrics, None, 1.0, None, info)


def test_a_capped_twin_is_flagged_with_the_rows_of_both_sides():
    pytest.importorskip("xgboost")
    data = signal(800, 6, seed=5)
    capped_cfg = with_twin(
        {"models": {"xgboost": {"n_estimators": 20, "max_fit_rows": 200}}}, "xgboost"
    )
    (capped,) = run_baselines(capped_cfg, data, TRAIN_CFG, 1, seed=0)
    used = capped.info["fit_rows_used"]
    assert 200 <= used <= 202 < capped.info["fit_rows"] == len(data.y_train)
    assert capped.info["fit_cap"] == {"rows": 200, "why": "set"}
    info = {"twin": "xgboost", "rounds": 10, "stopping": {"rounds_run": 6}, "local_epochs": 2}
    fed = _federated(capped, {**info, "train_rows": 512})
    frame = comparison.table([fed, capped])
    row = frame.iloc[0]
    assert (row["rounds_run"], row["local_epochs"], row["fed_rows"]) == (6, 2, 512)
    assert (row["twin_trees"], row["twin_rows"], row["twin_cap"]) == (20, used, "200 (set)")
    text = comparison.to_markdown(frame)
    assert "⚠ federated_xgboost: the gap is computed against a capped reference" in text
    assert f"fitted on {used:,} training rows, capped at 200 (set);" in text
    assert "the federation's sites trained on 512" in text

    # Uncapped (auto, the run's twin): every training row, nothing flagged.
    (whole,) = run_baselines(with_twin({"models": {}}, "xgboost"), data, TRAIN_CFG, 1, 0)
    assert whole.info["fit_rows_used"] == len(data.y_train) and whole.info["fit_cap"] is None
    frame = comparison.table([_federated(whole, {**info, "rounds": 10}), whole])
    assert frame.iloc[0]["rounds_run"] == 6 and frame.iloc[0]["twin_trees"] == 300
    assert pd.isna(frame.iloc[0]["twin_cap"]) and pd.isna(frame.iloc[0]["fed_rows"])
    assert "⚠" not in comparison.to_markdown(frame)
    assert pd.isna(frame.iloc[0]["fed_trees"]) and pd.isna(frame.iloc[0]["central"])

    # A twin pinned to the federation's training (a histogram run's): the gap is taken to it,
    # and the plain central XGBoost's is said beside it, split into federation and pins.
    pinned_info = {**info, "twin": "xgboost_pinned", "central": "xgboost", "trees": 12}
    fed = _federated(whole, pinned_info)
    pinned = ModelResult("xgboost_pinned", "supervised", fed.metrics, None, 1.0, None, {})
    row = comparison.table([fed, pinned, whole]).iloc[0]
    gap = fed.metrics["macro_f1"] - whole.metrics["macro_f1"]
    assert (row["twin"], row["gap_macro_f1"], row["central"], row["fed_trees"]) == (
        "xgboost_pinned",
        0.0,
        "xgboost",
        12,
    )
    assert row["gap_central_macro_f1"] == pytest.approx(gap)
    text = comparison.to_markdown(comparison.table([fed, pinned, whole]))
    assert f"Against the unpinned central xgboost, the macro-F1 gap is {gap:+.4f}: +0.0000" in text


def test_auto_caps_a_baseline_lifts_the_twin_and_keeps_a_many_class_xgboost(monkeypatch):
    pytest.importorskip("xgboost")
    # At test size the cap is lowered, so it bites as 50,000 does at a million rows.
    monkeypatch.setattr(twins, "FIT_ROWS", 300)
    data = signal(800, 6, seed=6, n_classes=4)
    cfg = {"models": {"xgboost": {"n_estimators": 10}}}
    (baseline,) = run_baselines(cfg, data, TRAIN_CFG, 1, seed=0)
    (twin,) = run_baselines(with_twin(cfg, "xgboost"), data, TRAIN_CFG, 1, seed=0)
    assert baseline.info["fit_cap"] == {"rows": 300, "why": "auto"}
    assert 300 <= baseline.info["fit_rows_used"] <= 303
    assert twin.info["fit_cap"] is None and twin.info["fit_rows_used"] == len(data.y_train)
    assert baseline.info["params"]["max_fit_rows"] == twin.info["params"]["max_fit_rows"] == "auto"
    monkeypatch.setattr(twins, "MANY_CLASSES", 3)
    (many,) = run_baselines(with_twin(cfg, "xgboost"), data, TRAIN_CFG, 1, seed=0)
    assert many.info["fit_cap"] == {"rows": 300, "why": "XGBoost twin above 3 classes"}


def test_the_cache_tells_jobs_apart_only_where_a_cap_bites(monkeypatch):
    data = signal(400, 4, seed=7)
    models = {"central_cnn": {"model": "cnn"}, "central_mlp": {"model": "mlp"}}
    as_cnn = twins.cache_inputs(with_twin({"models": models}, "cnn"), data)
    as_mlp = twins.cache_inputs(with_twin({"models": models}, "mlp"), data)
    assert as_cnn == as_mlp and "twin" not in as_cnn
    monkeypatch.setattr(twins, "FIT_ROWS", 100)
    as_cnn = twins.cache_inputs(with_twin({"models": models}, "cnn"), data)
    as_mlp = twins.cache_inputs(with_twin({"models": models}, "mlp"), data)
    assert as_cnn != as_mlp
    assert as_cnn["fit_caps"] == {"central_cnn": None, "central_mlp": {"rows": 100, "why": "auto"}}


def test_stop_off_and_an_uncapped_twin_give_the_numbers_of_before():
    pytest.importorskip("keras")
    data = signal(700, 9, seed=8, noise=1.5)
    small = {
        "logistic_regression": {"max_iter": 300},
        "xgboost": {"n_estimators": 30},
        "central_cnn": {},
        "central_logistic": {},
        "central_autoencoder": {},
        "isolation_forest": {"n_estimators": 30},
    }
    # Before: every model capped at 50,000 rows (more than there are), no stopping, no twin.
    before_cfg = {
        "val_fraction": 0.2,
        "models": {
            name: {**params, "max_fit_rows": 50_000} if name != "isolation_forest" else params
            for name, params in small.items()
        },
    }
    now_cfg = with_twin(
        {"val_fraction": 0.2, "stop": {**STOP, "patience": 0}, "models": small}, "cnn"
    )
    kwargs = {"model_cfgs": MODEL_CFGS, "validate": True, "target_fpr": 0.05}
    before = by_name(run_baselines(before_cfg, data, TRAIN_CFG, 2, seed=0, **kwargs))
    now = by_name(run_baselines(now_cfg, data, TRAIN_CFG, 2, seed=0, **kwargs))
    assert list(before) == list(now) == list(small)
    for name in small:
        b, n = before[name], now[name]
        assert n.metrics == b.metrics, name
        np.testing.assert_array_equal(n.scores, b.scores)
        for key in ("fit_rows", "fit_rows_used", "validation_macro_f1", "validation"):
            assert n.info.get(key) == b.info.get(key), (name, key)
        assert "stopping" not in n.info
    assert now["central_cnn"].info["epochs_run"] == 2 and now["xgboost"].info["trees"] == 30


def test_the_price_states_the_kept_round_and_reaches_the_twin_like_with_like():
    # A calibrated twin (0.95) whose argmax macro-F1 is 0.90; the federated curve, scored at
    # argmax each round, reaches 0.895 at round 3; early stopping kept round 4 of 6.
    twin_metrics = {"macro_f1": 0.95, "roc_auc": 0.99, "fpr": 0.05}
    twin_info = {"argmax": {"macro_f1": 0.90, "fpr": 0.10}, "decision": {"rule": "max_macro_f1"}}
    twin = ModelResult("xgboost", "supervised", twin_metrics, None, 1.0, None, twin_info)
    curve = {
        "round": [0, 1, 2, 3, 4, 5, 6],
        "macro_f1": [0.4, 0.7, 0.85, 0.895, 0.91, 0.90, 0.905],
        "seconds": [0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0],
        "mb": [0.0, 2.0, 4.0, 6.0, 8.0, 10.0, 12.0],
    }
    stop = {"rounds_run": 6, "best_round": 4}
    fed = _federated(twin, {"twin": "xgboost", "curve": curve, "stopping": stop})
    row = comparison.table([fed, twin]).iloc[0]
    assert (row["kept_round"], row["kept_seconds"], row["kept_mb"]) == (4, 4.0, 8.0)
    assert (row["reach_round"], row["reach_seconds"], row["reach_mb"]) == (3, 3.0, 6.0)
    assert row["gap_macro_f1"] == pytest.approx(-0.01)
    # Without early stopping the last round is the one kept; a twin out of reach gives none.
    far = ModelResult("xgboost", "supervised", {"macro_f1": 0.99}, None, 1.0, None, {})
    row = comparison.table([_federated(far, {"twin": "xgboost", "curve": curve}), far]).iloc[0]
    assert row["kept_round"] == 6 and pd.isna(row["reach_round"])


@pytest.mark.parametrize(
    ("stop", "models", "needle"),
    [
        ({"patience": -1}, {}, "baselines.stop.patience must be a whole number >= 0"),
        ({"patience": 2, "min_delta": -0.1}, {}, "baselines.stop.min_delta"),
        ({"patience": 2, "val_fraction": 1.0}, {}, "baselines.stop.val_fraction"),
        ({"patience": 2, "rounds": 3}, {}, "unknown setting(s) rounds"),
        ({}, {"random_forest": {"max_fit_rows": "auto"}}, "random_forest.max_fit_rows"),
        ({}, {"xgboost": {"max_fit_rows": "lots"}}, "or auto, got 'lots'"),
        ({}, {"xgboost": {"max_fit_rows": 0}}, "xgboost.max_fit_rows"),
    ],
)
def test_bad_stop_and_cap_settings_name_the_key(stop, models, needle):
    data = signal(100, 3, seed=9)
    with pytest.raises(FedadError) as err:
        run_baselines({"stop": stop, "models": models or {"xgboost": {}}}, data, TRAIN_CFG, 1, 0)
    assert needle in str(err.value)


def test_stop_settings_off_by_default():
    assert stopping.stop_settings({}) is None
    assert stopping.stop_settings({"stop": {"patience": 0}}) is None
    assert stopping.stop_settings({"stop": STOP}) == stopping.Stop(2, 0.0, 0.2)
