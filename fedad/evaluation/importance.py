"""Which features the models rely on: permutation importance as the drop in macro-F1."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, cast

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from sklearn.inspection import permutation_importance

from fedad import progress, rundir
from fedad.data.prepared import PreparedData
from fedad.evaluation.comparison import ModelResult
from fedad.evaluation.decision import decide
from fedad.evaluation.metrics import macro_f1

# Figures are written to files; no display is needed (or present on servers).
matplotlib.use("Agg")


class _ScoreFunction:
    """Adapter that lets scikit-learn permute columns for any scoring function."""

    def __init__(self, predict_scores_fn: Callable[[np.ndarray], np.ndarray], threshold):
        self.predict_scores_fn = predict_scores_fn
        self.threshold = threshold

    def fit(self, X, y=None):
        # Already fitted elsewhere; permutation_importance only requires the method.
        return self

    def macro_f1(self, X: np.ndarray, y: np.ndarray) -> float:
        scores = np.asarray(self.predict_scores_fn(X))
        # The model's own decision: argmax, or its calibrated threshold (always, for 1-D).
        pred = decide(scores, self.threshold)
        # 1-D scores are the binary view: two classes.
        return macro_f1(y, pred, scores.shape[1] if scores.ndim == 2 else 2) or 0.0


def permutation_importance_table(
    predict_scores_fn: Callable[[np.ndarray], np.ndarray],
    X: np.ndarray,
    y: np.ndarray,
    feature_names: Sequence[str],
    n_repeats: int = 5,
    max_rows: int = 2000,
    seed: int = 0,
    threshold: float | None = None,
) -> pd.DataFrame:
    """Rank features by how much shuffling each one lowers macro-F1.

    Parameters
    ----------
    predict_scores_fn : callable
        Maps a feature array to class probabilities ``(n, n_classes)``
        (prediction = argmax) or to 1-D attack scores (prediction = score >=
        ``threshold``), e.g. ``result.model.predict_scores``.
    X, y : np.ndarray
        Test features (scaled as the model expects) and labels; for 1-D scores
        ``y`` is the binary view (0 = normal, 1 = attack).
    feature_names : Sequence[str]
        One name per column of ``X``.
    n_repeats : int
        Shuffles per feature.
    max_rows : int
        Rows drawn at random (without replacement) to bound the cost.
    seed : int
        Seed for the row sample and the shuffles.
    threshold : float, optional
        Decision threshold for 1-D scores, e.g. ``result.model.threshold``.

    Returns
    -------
    pd.DataFrame
        Columns ``feature``, ``importance_mean``, ``importance_std`` (macro-F1
        drop), sorted by decreasing mean; a negative value means shuffling helped.
    """
    rng = np.random.default_rng(seed)
    if len(X) > max_rows:
        rows = rng.choice(len(X), size=max_rows, replace=False)
        X, y = X[rows], y[rows]
    wrapper = _ScoreFunction(predict_scores_fn, threshold)
    result = permutation_importance(
        wrapper,
        X,
        y,
        scoring=lambda est, X_, y_: est.macro_f1(X_, y_),
        n_repeats=n_repeats,
        random_state=seed,
        n_jobs=1,  # the scoring function may hold a Keras model, which does not fork well
    )
    table = pd.DataFrame(
        {
            "feature": list(feature_names),
            "importance_mean": result.importances_mean,
            "importance_std": result.importances_std,
        }
    )
    return table.sort_values("importance_mean", ascending=False, ignore_index=True)


def plot_importance_side_by_side(
    tables: dict[str, pd.DataFrame], path: str | os.PathLike, top: int = 15
) -> str:
    """Draw each model's top features as horizontal bars, one panel per model.

    Parameters
    ----------
    tables : dict[str, pd.DataFrame]
        Model name -> output of :func:`permutation_importance_table`.
    path : str or PathLike
        Image file to write (format from the extension).
    top : int
        Features shown per model.

    Returns
    -------
    str
        ``path``.
    """
    n = max(len(tables), 1)
    fig, axes = plt.subplots(1, n, figsize=(5 * n, 0.35 * top + 1.5), squeeze=False)
    for ax, (name, table) in zip(axes[0], tables.items(), strict=False):
        head = table.head(top).iloc[::-1]  # largest at the top
        ax.barh(head["feature"], head["importance_mean"], xerr=head["importance_std"])
        ax.set_title(name)
        ax.set_xlabel("macro-F1 drop when shuffled")
        ax.tick_params(axis="y", labelsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return str(path)


def explain(
    models: Sequence[ModelResult], data: PreparedData, run_dir: Path, seed: int
) -> dict[str, list[str]]:
    """Permutation importance of the federated model and the best centralized one.

    Parameters
    ----------
    models : Sequence[ModelResult]
        Every model of the run.
    data : PreparedData
        The run's split; importance is measured on its test rows.
    run_dir : Path
        Gets ``importance_<model>.csv`` per model and ``importance.png``.
    seed : int
        Seed of the row sample and the shuffles.

    Returns
    -------
    dict[str, list[str]]
        Each explained model's ten most important features.
    """
    _, X_test = data.scaled()
    supervised = [m for m in models if m.kind == "supervised"]
    chosen = [m for m in models if m.kind == "federated"]
    if supervised:
        chosen.append(max(supervised, key=lambda m: m.metrics.get("macro_f1") or 0.0))
    tables = {}
    with progress.steps("permutation importance", len(chosen)) as bar:
        for m in chosen:
            # Decided as the model decides; an anomaly score is one column (binary view).
            threshold = getattr(m.model, "threshold", None)
            binary_view = m.scores is not None and np.ndim(m.scores) == 1
            y_test = (data.y_test != 0).astype(np.int64) if binary_view else data.y_test
            with bar.step(m.name):
                table = permutation_importance_table(
                    cast(Any, m.model).predict_scores,  # every ModelResult's model has it
                    X_test,
                    y_test,
                    data.feature_names,
                    seed=seed,
                    threshold=threshold,
                )
            table.to_csv(run_dir / rundir.importance_csv(m.name), index=False)
            tables[m.name] = table
    if tables:
        plot_importance_side_by_side(tables, run_dir / rundir.IMPORTANCE_PNG)
    return {name: t["feature"].head(10).tolist() for name, t in tables.items()}
