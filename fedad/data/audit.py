"""Data audits: how well each feature alone separates normal from attack, and classes too small."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import pandas as pd
from sklearn.metrics import roc_auc_score

log = logging.getLogger(__name__)

N_BINS = 64
# A test class with fewer rows than this is flagged: one row then moves its recall by more
# than ten points, so its per-class scores, and the macro averages, rest on noise.
MIN_CLASS_ROWS = 10


def single_feature_auc(
    frame: pd.DataFrame, is_attack: np.ndarray, seed: int = 0, max_rows: int = 50_000
) -> pd.DataFrame:
    """Score every column by how well it alone predicts the binary label.

    Each column becomes a lookup table from its value bin (64 quantile bins for
    numbers, the category for text) to the attack rate, learnt on one half of
    the rows and scored by ROC-AUC on the other half, then the halves swap.
    A bin table catches non-monotone giveaways such as attack time windows in a
    timestamp, which a plain ROC-AUC of the raw value misses.

    Parameters
    ----------
    frame : pd.DataFrame
        Raw feature columns of the training part.
    is_attack : np.ndarray
        1 for attack rows, 0 for normal ones.
    seed : int
        Seed for the half split and the row sample.
    max_rows : int
        Audit at most this many rows (a random sample) to bound the cost.

    Returns
    -------
    pd.DataFrame
        Columns ``feature`` and ``auc``, most separating first.
    """
    rng = np.random.default_rng(seed)
    y = np.asarray(is_attack, dtype=int)
    rows = rng.permutation(len(y))[:max_rows]
    frame, y = frame.iloc[rows].reset_index(drop=True), y[rows]
    half = rng.random(len(y)) < 0.5
    scores = []
    for col in frame.columns:
        keys = _bin_keys(frame[col])
        scores.append((col, _cross_fit_auc(keys, y, half)))
    table = pd.DataFrame(scores, columns=["feature", "auc"])
    return table.sort_values("auc", ascending=False, ignore_index=True)


def flag(table: pd.DataFrame, threshold: float) -> list[str]:
    """Log and return the features whose single-feature AUC reaches ``threshold``."""
    hits = table.loc[table["auc"] >= threshold]
    if len(hits):
        listed = ", ".join(f"{name} ({auc:.3f})" for name, auc in hits.itertuples(index=False))
        log.warning(
            "leakage audit: %d feature(s) alone separate attack from normal with ROC-AUC >= "
            "%.2f: %s. If any is an identifier or a timestamp, add it to dataset.drop_columns.",
            len(hits),
            threshold,
            listed,
        )
    return hits["feature"].tolist()


def _bin_keys(column: pd.Series) -> np.ndarray:
    numbers = pd.to_numeric(column, errors="coerce")
    if numbers.notna().mean() >= 0.5:
        ranks = numbers.rank(method="dense", na_option="keep")
        edges = np.unique(np.nanquantile(ranks, np.linspace(0, 1, N_BINS + 1)))
        keys = np.digitize(ranks.fillna(-1), edges[1:-1])
        return np.where(numbers.isna(), -1, keys)
    return pd.factorize(column.astype(str).str.strip())[0]


def _cross_fit_auc(keys: np.ndarray, y: np.ndarray, half: np.ndarray) -> float:
    predicted = np.empty(len(y))
    for fit in (half, ~half):
        rates = pd.Series(y[fit]).groupby(keys[fit]).mean()
        predicted[~fit] = pd.Series(keys[~fit]).map(rates).fillna(y[fit].mean()).to_numpy()
    if len(np.unique(y)) < 2:
        return float("nan")
    return float(roc_auc_score(y, predicted))


def small_classes(y_true: np.ndarray, class_names: Sequence[str]) -> dict[str, int]:
    """Classes with fewer than :data:`MIN_CLASS_ROWS` rows in ``y_true``, with their counts.

    Parameters
    ----------
    y_true : np.ndarray
        True class codes of a test set.
    class_names : Sequence[str]
        One name per class code.

    Returns
    -------
    dict[str, int]
        Class name to row count (0 for a class of the task the rows do not hold).
    """
    counts = np.bincount(np.asarray(y_true, dtype=np.int64), minlength=len(class_names))
    return {str(n): int(c) for n, c in zip(class_names, counts, strict=True) if c < MIN_CLASS_ROWS}
