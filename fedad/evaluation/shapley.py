"""SHAP values: exact TreeSHAP for the tree baselines, expected gradients for the federated one."""

from __future__ import annotations

import copy
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from fedad import progress, rundir
from fedad.data.prepared import PreparedData
from fedad.evaluation.comparison import ModelResult

# Figures are written to files; no display is needed (or present on servers).
matplotlib.use("Agg")

# The centralized baselines TreeExplainer explains exactly (path-dependent TreeSHAP).
TREE_MODELS = ("random_forest", "xgboost")
# Test rows explained per model, drawn at random once per run (seeded) and shared by all:
# exact TreeSHAP of a fully grown 200-tree forest takes ~65 ms a row on one core.
EXPLAINED_ROWS = 200
# Training rows (never test rows) the federated model's expected gradients integrate over,
# and the gradient samples drawn per explained row.
BACKGROUND_ROWS = 100
GRADIENT_SAMPLES = 200
# Trees of a random forest explained, drawn at random (seeded): the forest's output is the mean
# of its trees', so theirs is an unbiased estimate of its SHAP values. A tree's cost grows with
# its leaves, hence with the fit rows: a fully grown tree on 80,000 34-class rows takes ~26 ms
# a row, and all 200 trees over 200 rows would take 17 minutes.
FOREST_TREES = 10


def explain_shap(
    models: Sequence[ModelResult], data: PreparedData, run_dir: Path, seed: int
) -> dict:
    """SHAP values of the tree baselines and the federated model on a sample of test rows.

    Every value is a feature's push towards *attack*: for class probabilities
    it is minus the value for the normal class (the attack score is ``1 -
    p(normal)``), so binary and multiclass runs read the same way.

    Parameters
    ----------
    models : Sequence[ModelResult]
        Every model of the run. Explained: those named in :data:`TREE_MODELS`
        and the federated model, by expected gradients for a Keras classifier
        and exactly for a booster; the federated autoencoder's anomaly score
        is left out.
    data : PreparedData
        The run's split: the explained rows come from its test part, the
        federated model's background from its training part.
    run_dir : Path
        Gets ``shap_<model>.csv`` and ``shap_<model>.png`` per explained model.
    seed : int
        Seed of the row samples and the gradient samples.

    Returns
    -------
    dict
        What ``results.json`` records under ``shap``: the sample sizes and,
        per model, the method, the output explained and the ten features of
        largest mean absolute SHAP value.
    """
    chosen = [m for m in models if m.kind == "federated" or m.name in TREE_MODELS]
    if not chosen:
        return {}
    X_train, X_test = data.scaled()
    rng = np.random.default_rng(seed)
    X = _sample(X_test, EXPLAINED_ROWS, rng)
    background = _sample(X_train, BACKGROUND_ROWS, rng)
    facts: dict = {
        "explained_test_rows": len(X),
        "background_train_rows": len(background),
        "models": {},
    }
    with progress.steps("SHAP", len(chosen)) as bar:
        for m in chosen:
            with bar.step(m.name) as step:
                explained = _explain(m, X, background, data.n_classes, seed)
                if explained is None:
                    step.note = "not explained: an anomaly score, not class probabilities"
                    continue
                values, method, output, trees = explained
                table = shap_table(values, data.feature_names)
                table.to_csv(run_dir / rundir.shap_csv(m.name), index=False)
                plot_shap(
                    values,
                    X,
                    data.feature_names,
                    f"{m.name}: SHAP on {len(X)} test rows ({output})",
                    run_dir / rundir.shap_png(m.name),
                )
                facts["models"][m.name] = {
                    "method": method,
                    "output": output,
                    "top": table["feature"].head(10).tolist(),
                    **trees,
                }
    return facts


def _explain(
    m: ModelResult, X: np.ndarray, background: np.ndarray, n_classes: int, seed: int
) -> tuple[np.ndarray, str, str, dict] | None:
    """SHAP values of one model, its method, the output explained and, for a forest, its trees.

    None for an anomaly score.
    """
    tree = "TreeExplainer (exact, tree path dependent)"
    # A baseline's fitted model (.estimator, .classes) or the federated scorer (.model).
    fitted: Any = m.model
    if m.kind != "federated":
        output = "attack log-odds" if m.name == "xgboost" else "attack probability"
        estimator, trees = sub_forest(fitted.estimator, FOREST_TREES, seed)
        return tree_shap(estimator, fitted.classes, X), tree, output, trees
    if fitted.predict_scores(X[:1]).ndim == 1:  # the federated autoencoder's anomaly score
        return None
    import xgboost

    if isinstance(fitted.model, xgboost.Booster):
        values = tree_shap(fitted.model, np.arange(n_classes), X)
        return values, tree, "attack log-odds", {}
    method = f"GradientExplainer (expected gradients, {GRADIENT_SAMPLES} samples)"
    values = gradient_shap(fitted.model, X, background, seed)
    return values, method, "attack probability", {}


def sub_forest(estimator, max_trees: int, seed: int) -> tuple[object, dict]:
    """A random forest cut to ``max_trees`` of its trees (a seeded draw), else ``estimator``.

    Parameters
    ----------
    estimator : object
        A fitted model; only a scikit-learn forest (``estimators_``) is cut.
    max_trees : int
        Trees kept.
    seed : int
        Seed of the draw.

    Returns
    -------
    tuple[object, dict]
        The model to explain (the forest itself is left whole) and, for a
        forest, ``trees_explained`` and ``trees`` (what ``results.json`` records).
    """
    trees = getattr(estimator, "estimators_", None)
    if trees is None:
        return estimator, {}
    if len(trees) <= max_trees:
        return estimator, {"trees_explained": len(trees), "trees": len(trees)}
    kept = np.sort(np.random.default_rng(seed).choice(len(trees), max_trees, replace=False))
    cut = copy.copy(estimator)
    cut.estimators_ = [trees[i] for i in kept]
    cut.n_estimators = max_trees
    return cut, {"trees_explained": max_trees, "trees": len(trees)}


def tree_shap(estimator, classes: np.ndarray, X: np.ndarray) -> np.ndarray:
    """Exact SHAP values of a fitted forest or booster, towards attack.

    Parameters
    ----------
    estimator : object
        A fitted scikit-learn forest or XGBoost classifier (see :func:`sub_forest`
        to explain part of a large forest).
    classes : np.ndarray
        The class code of each of the estimator's outputs (class 0 = normal).
    X : np.ndarray
        Rows to explain, as the estimator saw its training rows.

    Returns
    -------
    np.ndarray
        Shape ``(len(X), n_features)``.
    """
    import shap

    values = np.asarray(shap.TreeExplainer(estimator).shap_values(X))
    if values.ndim == 2:  # one output: the second class against the first (normal)
        return values
    return -values[:, :, int(np.flatnonzero(classes == 0)[0])]


def gradient_shap(model, X: np.ndarray, background: np.ndarray, seed: int) -> np.ndarray:
    """SHAP values of a Keras classifier by expected gradients, towards attack.

    Parameters
    ----------
    model : keras.Model
        Its output is class probabilities, class 0 normal.
    X : np.ndarray
        Rows to explain (scaled as the model expects).
    background : np.ndarray
        Reference rows the gradients are integrated from.
    seed : int
        Seed of the gradient samples.

    Returns
    -------
    np.ndarray
        Shape ``(len(X), n_features)``.
    """
    import shap

    with warnings.catch_warnings():
        # Keras notes that SHAP passes a bare tensor where the model was built on a list.
        warnings.filterwarnings("ignore", message=".*structure of `inputs`.*")
        # One batch per explained row, and the normal class's output alone: SHAP draws the
        # same samples for every output, so the values are those of the first of all outputs,
        # for 1/n_classes of the gradients.
        explainer = shap.GradientExplainer(model, background, batch_size=GRADIENT_SAMPLES)
        values, _ = explainer.shap_values(
            X,
            nsamples=GRADIENT_SAMPLES,
            rseed=seed,
            ranked_outputs=np.zeros((len(X), 1), dtype=np.int64),
            output_rank_order="custom",
        )
    return -np.asarray(values)[:, :, 0]


def shap_table(values: np.ndarray, feature_names: Sequence[str]) -> pd.DataFrame:
    """Rank features by mean absolute SHAP value.

    Parameters
    ----------
    values : np.ndarray
        SHAP values, shape ``(n_rows, n_features)``.
    feature_names : Sequence[str]
        One name per column.

    Returns
    -------
    pd.DataFrame
        Columns ``feature``, ``mean_abs_shap`` and ``mean_shap`` (its sign:
        on average towards attack when positive), largest first.
    """
    table = pd.DataFrame(
        {
            "feature": list(feature_names),
            "mean_abs_shap": np.abs(values).mean(axis=0),
            "mean_shap": values.mean(axis=0),
        }
    )
    return table.sort_values("mean_abs_shap", ascending=False, ignore_index=True)


def plot_shap(
    values: np.ndarray,
    X: np.ndarray,
    feature_names: Sequence[str],
    title: str,
    path: str | os.PathLike,
    top: int = 15,
) -> str:
    """Draw SHAP's beeswarm: one dot per row and feature, coloured by the feature's value.

    Parameters
    ----------
    values : np.ndarray
        SHAP values, shape ``(n_rows, n_features)``.
    X : np.ndarray
        The explained rows (the colour scale).
    feature_names : Sequence[str]
        One name per column.
    title : str
        Figure title.
    path : str or PathLike
        Image file to write.
    top : int
        Features shown (the rest are summed into one row).

    Returns
    -------
    str
        ``path``.
    """
    import shap

    explanation = shap.Explanation(values, data=X, feature_names=list(feature_names))
    shap.plots.beeswarm(explanation, max_display=top, show=False, plot_size=(8, 0.4 * top + 1.5))
    fig = plt.gcf()
    fig.axes[0].set_title(title, fontsize=10)
    fig.axes[0].set_xlabel("SHAP value (towards attack)")
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return str(path)


def _sample(X: np.ndarray, rows: int, rng: np.random.Generator) -> np.ndarray:
    if len(X) <= rows:
        return X
    return X[np.sort(rng.choice(len(X), size=rows, replace=False))]
