"""What a run shows: SHAP values, the data view, library versions and progress lines."""

from __future__ import annotations

import json
import logging
from importlib.metadata import version

import numpy as np
import pandas as pd
import pytest
from sklearn.preprocessing import StandardScaler

from fedad import progress, rundir
from fedad.baselines.supervised import fit_supervised
from fedad.data.prepared import PreparedData
from fedad.evaluation.comparison import ModelResult
from fedad.evaluation.plots import plot_eda
from fedad.evaluation.shapley import (
    BACKGROUND_ROWS,
    EXPLAINED_ROWS,
    GRADIENT_SAMPLES,
    explain_shap,
    gradient_shap,
    sub_forest,
    tree_shap,
)
from fedad.versions import versions

# Only column 2 decides the class; the other columns are noise.
SIGNAL = 2


def _data(n: int, classes: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, 6)).astype(np.float32)
    edges = np.quantile(X[:, SIGNAL], np.linspace(0, 1, classes + 1)[1:-1])
    return X, np.searchsorted(edges, X[:, SIGNAL]).astype(np.int64)


def _attack_probability(model, X) -> np.ndarray:
    return 1.0 - model.predict_scores(X)[:, 0]


@pytest.mark.parametrize("name", ["random_forest", "xgboost"])
@pytest.mark.parametrize("classes", [2, 3])
def test_tree_shap_adds_up_to_the_model_output_towards_attack(name, classes):
    X, y = _data(600, classes)
    params = {"random_forest": {"n_estimators": 20, "max_depth": 6, "min_samples_leaf": 1}}
    params["xgboost"] = {"n_estimators": 20, "max_depth": 3, "learning_rate": 0.3}
    model = fit_supervised(name, params[name], X, y, classes, seed=0)
    rows = X[:40]
    values = tree_shap(model.estimator, model.classes, rows)
    assert values.shape == rows.shape
    total = values.sum(axis=1)
    if name == "random_forest" or classes == 2:
        # Exact: SHAP values add up to the output (less a constant) — the attack probability
        # for the forest, the booster's attack log-odds for a binary XGBoost.
        output = (
            _attack_probability(model, rows)
            if name == "random_forest"
            else model.estimator.predict(rows, output_margin=True)
        )
        assert np.allclose(total - total[0], output - output[0], atol=1e-4)
    else:
        # Multiclass XGBoost: minus the normal class's log-odds, which falls as attack rises.
        margin = model.estimator.predict(rows, output_margin=True)[:, 0]
        assert np.allclose(total - total[0], -(margin - margin[0]), atol=1e-4)
    assert np.abs(values).mean(axis=0).argmax() == SIGNAL


def test_a_large_forest_is_explained_on_a_seeded_draw_of_its_trees():
    X, y = _data(600, 3)
    params = {"n_estimators": 30, "max_depth": 6, "min_samples_leaf": 1}
    model = fit_supervised("random_forest", params, X, y, 3, seed=0)
    cut, trees = sub_forest(model.estimator, 5, seed=1)
    assert trees == {"trees_explained": 5, "trees": 30}
    assert len(model.estimator.estimators_) == 30  # the run's forest stays whole
    assert sub_forest(model.estimator, 5, seed=1)[0].estimators_ == cut.estimators_
    rows = X[:40]
    values = tree_shap(cut, model.classes, rows)
    # Exact for the drawn trees: the values add up to their mean attack probability.
    drawn = 1.0 - cut.predict_proba(rows)[:, 0]
    total = values.sum(axis=1)
    assert np.allclose(total - total[0], drawn - drawn[0], atol=1e-4)
    assert np.abs(values).mean(axis=0).argmax() == SIGNAL
    assert sub_forest(model.estimator, 30, seed=1) == (
        model.estimator,
        {"trees_explained": 30, "trees": 30},
    )


def test_expected_gradients_of_the_normal_output_alone_equal_shaps_for_every_output():
    import keras
    import shap

    from fedad.models.keras_models import build_model

    X, y = _data(300, 4)
    keras.utils.set_random_seed(0)
    net = build_model({"name": "logistic"}, 6, 4, learning_rate=0.05, optimizer="adam")
    net.fit(X, y, epochs=3, batch_size=32, verbose=0)
    rows, background = X[:12], X[100:150]
    # fedad asks for the normal class's output alone; SHAP's default computes all four.
    ours = gradient_shap(net, rows, background, seed=3)
    every_output = shap.GradientExplainer(net, background).shap_values(
        rows, nsamples=GRADIENT_SAMPLES, rseed=3
    )
    assert np.asarray(every_output).shape == (12, 6, 4)
    again = -np.asarray(every_output)[:, :, 0]
    np.testing.assert_allclose(ours, again, rtol=1e-5, atol=1e-7)


def test_explain_shap_writes_a_table_and_figure_per_model_and_records_the_samples(tmp_path):
    import keras

    from fedad.federated.families.classifier import KerasScorer
    from fedad.models.keras_models import build_model

    X, y = _data(400, 2)
    data = PreparedData(
        X_train=X[:300],
        y_train=y[:300],
        X_test=X[300:],
        y_test=y[300:],
        feature_names=[f"f{i}" for i in range(6)],
        class_names=["normal", "attack"],
        task="binary",
        scaler=StandardScaler().fit(X[:300]),
    )
    X_train, _ = data.scaled()
    keras.utils.set_random_seed(0)
    net = build_model({"name": "logistic"}, 6, 2, learning_rate=0.05, optimizer="adam")
    net.fit(X_train, data.y_train, epochs=20, batch_size=32, verbose=0)
    net.save(tmp_path / rundir.MODEL_FILE)
    forest = fit_supervised(
        "random_forest",
        {"n_estimators": 10, "max_depth": 4, "min_samples_leaf": 1},
        X_train,
        data.y_train,
        2,
        0,
    )
    models = [
        ModelResult("federated_logistic", "federated", {}, None, 1.0, KerasScorer(tmp_path)),
        ModelResult("random_forest", "supervised", {}, None, 1.0, forest),
        ModelResult("logistic_regression", "supervised", {}, None, 1.0, None),
    ]
    facts = explain_shap(models, data, tmp_path, seed=0)

    assert facts["explained_test_rows"] == min(EXPLAINED_ROWS, 100)
    assert facts["background_train_rows"] == min(BACKGROUND_ROWS, 300)
    assert set(facts["models"]) == {"federated_logistic", "random_forest"}  # no linear model
    assert facts["models"]["random_forest"]["trees"] == 10
    json.dumps(facts)  # results.json can hold it
    for name, fact in facts["models"].items():
        table = pd.read_csv(tmp_path / rundir.shap_csv(name))
        assert list(table.columns) == ["feature", "mean_abs_shap", "mean_shap"]
        assert table["feature"].iloc[0] == f"f{SIGNAL}" == fact["top"][0]
        assert (tmp_path / rundir.shap_png(name)).stat().st_size > 0
    assert "GradientExplainer" in facts["models"]["federated_logistic"]["method"]


def test_eda_ranks_the_separating_feature_first_and_draws_the_figure(tmp_path):
    X, y = _data(2000, 2)
    path = tmp_path / rundir.EDA_PNG
    shown = plot_eda(X, y != 0, [f"f{i}" for i in range(6)], path, seed=0, top=4, max_rows=500)
    assert shown[0] == f"f{SIGNAL}" and len(shown) == 4
    assert path.stat().st_size > 0
    # One class only: nothing separates, the figure is still drawn.
    assert len(plot_eda(X, np.zeros(len(X), bool), list("abcdef"), path, top=3)) == 3


def test_versions_name_every_library_that_changes_the_numbers():
    found = versions()
    for name in ("numpy", "pandas", "scikit-learn", "xgboost", "keras", "ray", "flwr"):
        assert found[name] == version(name), name
    assert found["flwr-datasets"] == version("flwr-datasets")
    tensorflow = found["tensorflow"]  # installed as tensorflow-cpu on x86-64 Linux
    assert tensorflow and tensorflow.split(".")[0] == "2"
    assert found["python"].count(".") == 2 and found["fedad"]


def test_progress_logs_one_line_per_step_with_its_time_and_note(caplog):
    with caplog.at_level(logging.INFO, logger="fedad"):
        with progress.step("data: reading") as step:
            step.note = "10 rows"
        with progress.steps("baselines", 2) as bar:
            for name in ("a", "b"):
                with bar.step(name) as one:
                    one.note = f"score {name}"
    lines = [r.getMessage() for r in caplog.records if r.name == "fedad"]
    assert len(lines) == 3
    assert lines[0].startswith("data: reading: done in ") and lines[0].endswith("(10 rows)")
    assert lines[1].startswith("baselines 1/2: a done in ") and lines[1].endswith("(score a)")
    assert lines[2].startswith("baselines 2/2: b done in ")
    assert [progress.clock(s) for s in (7, 65, 3725)] == ["0:07", "1:05", "1:02:05"]
