"""Figures of one run: the partition heatmap, ROC curves, confusion matrices and the data view."""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Iterable, Sequence

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from sklearn.metrics import roc_auc_score, roc_curve

from fedad.evaluation.metrics import attack_score

# Figures are written to files; no display is needed (or present on servers).
matplotlib.use("Agg")


def settled_imports() -> None:
    """Wait until no other thread is half-way through importing IPython.

    The engine starts in a thread while the data is prepared and plotted, and its TensorFlow
    import pulls in Keras, which imports IPython when it is installed; matplotlib, creating a
    figure, reads ``sys.modules["IPython"]`` without the import lock, and a half-imported
    module there ends the run. ``import`` takes that lock, so it returns once IPython is whole.
    """
    if "IPython" in sys.modules:
        importlib.import_module("IPython")


def plot_roc(
    results: Iterable,
    path: str | os.PathLike,
    y_true: np.ndarray | None = None,
) -> str:
    """Draw every model's ROC curve for attack versus normal on one figure.

    Parameters
    ----------
    results : iterable
        :class:`fedad.baselines.runner.ModelResult` objects (their test
        ``scores``, with ``y_true`` given), or ``(name, y_true, scores)``
        tuples. Scores may be class probabilities or 1-D attack scores; labels
        are reduced to the binary view (0 = normal, anything else = attack).
    path : str or PathLike
        Image file to write.
    y_true : np.ndarray, optional
        Test labels for ``ModelResult`` entries.

    Returns
    -------
    str
        ``path``. A model whose labels hold a single class is listed as
        having an undefined curve instead of drawn.
    """
    fig, ax = plt.subplots(figsize=(6, 5))
    for entry in results:
        if isinstance(entry, tuple):
            name, labels, scores = entry
        else:
            if y_true is None:
                raise ValueError("plot_roc needs y_true to draw ModelResult entries")
            name, labels, scores = entry.name, y_true, entry.scores
        positive = np.asarray(labels) != 0
        if positive.all() or not positive.any():
            ax.plot([], [], label=f"{name} (ROC undefined: one class)")
            continue
        s = attack_score(scores)
        fpr, tpr, _ = roc_curve(positive, s)
        ax.plot(fpr, tpr, label=f"{name} (AUC {roc_auc_score(positive, s):.3f})")
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1)
    ax.set_xlabel("false-positive rate (normal flagged)")
    ax.set_ylabel("true-positive rate (attacks caught)")
    ax.set_title("ROC, attack vs normal (test set)")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return str(path)


def plot_confusion(
    confusion: Sequence[Sequence[int]],
    class_names: Sequence[str],
    title: str,
    path: str | os.PathLike,
) -> str:
    """Draw a confusion matrix: colour by row share (recall), text = counts.

    Parameters
    ----------
    confusion : sequence of sequences
        Rows = true class, columns = predicted class (``metrics["confusion"]``).
    class_names : Sequence[str]
        Names along both axes.
    title : str
        Figure title.
    path : str or PathLike
        Image file to write.

    Returns
    -------
    str
        ``path``.
    """
    cm = np.asarray(confusion, dtype=np.int64)
    totals = cm.sum(axis=1, keepdims=True)
    # Row shares keep rare classes visible next to a dominant one.
    shares = np.divide(cm, totals, out=np.zeros(cm.shape), where=totals > 0)
    size = max(4.0, 0.6 * len(class_names) + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(shares, cmap="Blues", vmin=0.0, vmax=1.0)
    ticks = np.arange(len(class_names))
    ax.set_xticks(ticks, labels=class_names, rotation=45, ha="right")
    ax.set_yticks(ticks, labels=class_names)
    for i, j in np.ndindex(cm.shape):
        color = "white" if shares[i, j] > 0.5 else "black"
        ax.text(j, i, str(cm[i, j]), ha="center", va="center", color=color, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return str(path)


def plot_partition(
    summary: pd.DataFrame, class_names: Sequence[str], path: str | os.PathLike, title: str
) -> str:
    """Draw each client's class mix as a heatmap (rows: clients, columns: classes).

    Parameters
    ----------
    summary : pd.DataFrame
        :func:`fedad.data.partition.summarize` output: ``client``, ``n`` and
        one count column per class.
    class_names : Sequence[str]
        The class columns, in order.
    path : str or PathLike
        Image file to write.
    title : str
        Figure title.

    Returns
    -------
    str
        ``path``.
    """
    counts = summary[list(class_names)].to_numpy(dtype=float)
    shares = counts / counts.sum(axis=1, keepdims=True)
    height = min(0.25 * len(summary) + 1.5, 14)
    settled_imports()
    fig, ax = plt.subplots(figsize=(max(4, 0.8 * len(class_names) + 2.5), height))
    image = ax.imshow(shares, aspect="auto", cmap="viridis", vmin=0, vmax=1)
    ax.set_xticks(range(len(class_names)), class_names, rotation=45, ha="right")
    step = max(1, len(summary) // 40)
    ax.set_yticks(range(0, len(summary), step), summary["client"].iloc[::step])
    ax.set_xlabel("class")
    ax.set_ylabel("client")
    ax.set_title(title)
    fig.colorbar(image, ax=ax, label="share of client's rows")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return str(path)


def plot_eda(
    X: np.ndarray,
    attack: np.ndarray,
    feature_names: Sequence[str],
    path: str | os.PathLike,
    seed: int = 0,
    top: int = 8,
    max_rows: int = 20_000,
) -> list[str]:
    """Draw the features that best separate normal from attack traffic, and their correlations.

    Features are ranked by the standardized difference of their means between
    the two classes (``|mean_attack - mean_normal| / pooled std``). Left: each
    top feature's distribution for normal and attack rows; right: their
    correlation heatmap. Pass training rows only: the test set stays unseen.

    Parameters
    ----------
    X : np.ndarray
        Training features, shape ``(n, n_features)``.
    attack : np.ndarray
        True for the attack rows of ``X``.
    feature_names : Sequence[str]
        One name per column.
    path : str or PathLike
        Image file to write.
    seed : int
        Seed of the row sample.
    top : int
        Features shown.
    max_rows : int
        Rows drawn at random (without replacement) to bound the cost.

    Returns
    -------
    list[str]
        The features shown, best separating first.
    """
    attack = np.asarray(attack, dtype=bool)
    if len(X) > max_rows:
        rows = np.random.default_rng(seed).choice(len(X), size=max_rows, replace=False)
        X, attack = X[rows], attack[rows]
    X = np.asarray(X, dtype=np.float64)
    normal_rows, attack_rows = X[~attack], X[attack]
    separation = np.zeros(X.shape[1])
    if len(normal_rows) and len(attack_rows):
        gap = np.abs(attack_rows.mean(axis=0) - normal_rows.mean(axis=0))
        spread = np.sqrt((normal_rows.var(axis=0) + attack_rows.var(axis=0)) / 2)
        np.divide(gap, spread, out=separation, where=spread > 0)
    best = np.argsort(-separation, kind="stable")[: min(top, X.shape[1])]
    names = [str(feature_names[i]) for i in best]

    cols = 4
    hist_rows = -(-len(best) // cols)
    settled_imports()
    fig = plt.figure(figsize=(4 * cols + 7, 3 * max(hist_rows, 2)))
    grid = fig.add_gridspec(max(hist_rows, 2), cols + 2)
    for k, i in enumerate(best):
        ax = fig.add_subplot(grid[k // cols, k % cols])
        bins = np.histogram_bin_edges(X[:, i], bins=30)
        for part, label, color in (
            (normal_rows, "normal", "tab:blue"),
            (attack_rows, "attack", "tab:red"),
        ):
            if len(part):
                ax.hist(
                    part[:, i],
                    # matplotlib's stubs want a Sequence; it takes an array of edges.
                    bins=bins,  # type: ignore[arg-type]
                    density=True,
                    histtype="stepfilled",
                    alpha=0.5,
                    label=label,
                    color=color,
                )
        ax.set_title(f"{names[k]} (d={separation[i]:.2f})", fontsize=9)
        ax.tick_params(labelsize=7)
        if k == 0:
            ax.legend(fontsize=8)
    with np.errstate(invalid="ignore", divide="ignore"):  # a constant column has no correlation
        corr = np.corrcoef(X[:, best], rowvar=False)
    corr = np.nan_to_num(corr, nan=0.0).reshape(len(best), -1)
    ax = fig.add_subplot(grid[:, cols:])
    image = ax.imshow(corr, cmap="coolwarm", vmin=-1, vmax=1)
    ax.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(len(names)), names, fontsize=8)
    ax.set_title("correlation of the top features")
    fig.colorbar(image, ax=ax, shrink=0.7)
    fig.suptitle(
        f"Training rows ({len(X):,} shown): the features that best separate normal from attack"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return names
