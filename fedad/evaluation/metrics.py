"""Test-set metrics shared by the federated model and every baseline."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from sklearn.metrics import (
    average_precision_score,
    confusion_matrix,
    f1_score,
    precision_score,
    recall_score,
    roc_auc_score,
)

from fedad.errors import FedadError

# Every scalar metric :func:`compute_metrics` returns, in the order tables show them.
METRIC_NAMES = (
    "accuracy",
    "precision",
    "recall",
    "f1",
    "macro_f1",
    "weighted_f1",
    "roc_auc",
    "pr_auc",
    "fpr",
)
# The ones a comparison table and ``fedad.score`` show (weighted F1 stays in results.json).
TABLE_METRICS = tuple(m for m in METRIC_NAMES if m != "weighted_f1")


def attack_score(scores: np.ndarray) -> np.ndarray:
    """Reduce model output to one attack score per row (higher = more attack-like).

    Parameters
    ----------
    scores : np.ndarray
        Class probabilities of shape ``(n, n_classes)`` with class 0 = normal,
        or an attack score of shape ``(n,)`` (returned as is).

    Returns
    -------
    np.ndarray
        ``float64`` array of shape ``(n,)``: ``1 - p[:, 0]`` for probabilities.
    """
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim == 1:
        return scores
    if scores.ndim == 2:
        return 1.0 - scores[:, 0]
    raise ValueError(f"scores must be 1-D or 2-D, got shape {scores.shape}")


def tune_threshold(y_true_binary: np.ndarray, attack_scores: np.ndarray) -> float:
    """Pick the attack-score threshold that maximizes macro-F1 on labelled data.

    Use it on a validation slice carved from the training data only; tuning on
    the test set would leak the test labels into the reported scores. A row is
    flagged as an attack when its score is ``>= threshold``. The candidates are
    the observed scores; the returned value is the midpoint between the best
    one and the next lower observed score, so it splits the data the same way
    but sits in the gap rather than on a training point.

    Parameters
    ----------
    y_true_binary : np.ndarray
        0 = normal, anything else = attack.
    attack_scores : np.ndarray
        Shape ``(n,)``, higher = more attack-like.

    Returns
    -------
    float
        The threshold.
    """
    y = np.asarray(y_true_binary) != 0
    s = np.asarray(attack_scores, dtype=np.float64)
    n_pos = int(y.sum())
    n_neg = y.size - n_pos
    if n_pos == 0 or n_neg == 0:
        raise FedadError(
            "Cannot tune a detection threshold: the validation slice holds only "
            f"{'attack' if n_neg == 0 else 'normal'} rows. The training data needs both "
            "normal and attack rows for the unsupervised baselines to pick a threshold."
        )
    order = np.argsort(-s, kind="stable")
    s_sorted, y_sorted = s[order], y[order]
    # Index of the last row of each run of equal scores: flagging every row with
    # score >= that value flags exactly rows [0, idx].
    last = np.flatnonzero(np.r_[s_sorted[1:] != s_sorted[:-1], True])
    tp = np.cumsum(y_sorted)[last]
    fp = (last + 1) - tp
    fn = n_pos - tp
    tn = n_neg - fp
    f1_attack = 2 * tp / (2 * tp + fp + fn)
    f1_normal = 2 * tn / (2 * tn + fn + fp)
    best = int(np.argmax((f1_attack + f1_normal) / 2))
    value = s_sorted[last[best]]
    if best + 1 < last.size:
        return float((value + s_sorted[last[best + 1]]) / 2)
    return float(value)


def threshold_for_fpr(y_true_binary: np.ndarray, attack_scores: np.ndarray, target: float) -> float:
    """The lowest attack-score threshold that flags at most ``target`` of the normal rows.

    Use it on validation rows, never on the test set. A row is flagged as an
    attack when its score is ``>= threshold``.

    Parameters
    ----------
    y_true_binary : np.ndarray
        0 = normal, anything else = attack.
    attack_scores : np.ndarray
        Shape ``(n,)``, higher = more attack-like.
    target : float
        The largest share of normal rows to flag, in [0, 1].

    Returns
    -------
    float
        The threshold; ties at it are flagged together, so the share reached
        may be below ``target``.
    """
    normal = np.sort(np.asarray(attack_scores, dtype=np.float64)[np.asarray(y_true_binary) == 0])
    if normal.size == 0:
        raise FedadError(
            "Cannot choose a threshold for a target false-positive rate: the validation rows "
            "hold no normal row."
        )
    allowed = int(np.floor(target * normal.size))
    if allowed >= normal.size:
        return float(normal[0])
    # Just above the highest normal score that must stay unflagged.
    return float(np.nextafter(normal[normal.size - 1 - allowed], np.inf))


def scored_classes(y_true: np.ndarray, n_classes: int) -> list[int]:
    """The classes the macro averages run over: those of the task that ``y_true`` holds.

    A class the test rows do not hold cannot be measured, whatever a model
    predicts: averaging over the labels a model happens to predict instead
    would score two models on different sets of classes. Predictions of an
    absent class still cost: they are missed rows of the true classes.

    Parameters
    ----------
    y_true : np.ndarray
        True class codes.
    n_classes : int
        Classes the task defines (codes ``0 .. n_classes - 1``).

    Returns
    -------
    list[int]
        Sorted class codes.
    """
    counts = np.bincount(np.asarray(y_true, dtype=np.int64), minlength=n_classes)
    return [c for c in range(n_classes) if counts[c] > 0]


def macro_f1(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> float | None:
    """Macro-F1 over :func:`scored_classes`; None without rows.

    Parameters
    ----------
    y_true, y_pred : np.ndarray
        True and predicted class codes.
    n_classes : int
        Classes the task defines.

    Returns
    -------
    float or None
        The unweighted mean of the per-class F1 of the classes ``y_true`` holds
        (a class present but never predicted scores 0).
    """
    labels = scored_classes(y_true, n_classes)
    if not labels:
        return None
    return float(f1_score(y_true, y_pred, labels=labels, average="macro", zero_division=0))


def _clean(value: float | None) -> float | None:
    """Return a plain float, or None where the metric is undefined (NaN)."""
    if value is None:
        return None
    value = float(value)
    return None if math.isnan(value) else value


def _ratio(num: int, den: int) -> float | None:
    return float(num) / den if den else None


def attack_success_rate(confusion: Sequence[Sequence[int]], targets: Sequence[int]) -> float | None:
    """Share of the rows of the ``targets`` classes predicted normal (class 0).

    The success of a targeted poisoning attack that relabels those attacks as
    normal: 1 - their detection rate. None when the test set holds none of them.

    Parameters
    ----------
    confusion : Sequence[Sequence[int]]
        Rows = true class, columns = predicted class (``compute_metrics``'s ``confusion``).
    targets : Sequence[int]
        The targeted class codes (never 0, the normal class).

    Returns
    -------
    float or None
    """
    cm = np.asarray(confusion)
    rows = cm[list(targets)]
    return _ratio(int(rows[:, 0].sum()), int(rows.sum()))


def compute_metrics(
    y_true: np.ndarray,
    scores: np.ndarray,
    class_names: Sequence[str],
    y_pred: np.ndarray | None = None,
) -> dict:
    """Score predictions against true labels; every value is JSON-serialisable.

    Parameters
    ----------
    y_true : np.ndarray
        True class codes, shape ``(n,)``; 0 = normal.
    scores : np.ndarray
        Class probabilities ``(n, n_classes)``, or for the binary task an attack
        score ``(n,)`` (higher = more attack-like, e.g. from an anomaly detector).
    class_names : Sequence[str]
        One name per class code; two names means the binary task.
    y_pred : np.ndarray, optional
        Predicted class codes. Default: argmax of the probabilities, or
        ``score >= 0.5`` for 1-D scores (pass ``y_pred`` for a tuned threshold).

    Returns
    -------
    dict
        ``accuracy``; ``precision``, ``recall``, ``f1`` (binary: of the attack
        class; multiclass: macro); ``macro_f1``, ``weighted_f1``; ``roc_auc``
        and ``pr_auc`` (average precision; binary: attack class on the attack
        score; multiclass: one-vs-rest macro over the classes present in
        ``y_true``); ``fpr`` (share of true normal rows predicted as anything
        but normal); ``per_class_recall`` (name -> value); ``confusion`` (rows =
        true, columns = predicted, all classes); ``n``; ``classes_scored``
        (how many classes the averages run over). A metric that is undefined on
        this data (AUC with one class in ``y_true``, precision with no predicted
        attacks, ...) is ``None``. Macro and weighted F1, and multiclass
        precision and recall, average over :func:`scored_classes` (the classes of
        the task that ``y_true`` holds), whatever a model predicts, so every
        model is scored on the same classes; an undefined per-class value (a
        class never predicted has no precision) counts as 0.
    """
    y_true = np.asarray(y_true).astype(np.int64)
    scores = np.asarray(scores, dtype=np.float64)
    n_classes = len(class_names)
    if scores.ndim == 1 and n_classes != 2:
        raise ValueError("1-D attack scores are only defined for the binary task")
    if scores.shape[0] != y_true.shape[0]:
        raise ValueError(f"{scores.shape[0]} scores for {y_true.shape[0]} labels")
    if y_pred is None:
        y_pred = (scores >= 0.5).astype(np.int64) if scores.ndim == 1 else scores.argmax(axis=1)
    y_pred = np.asarray(y_pred).astype(np.int64)

    n = int(y_true.size)
    labels = list(range(n_classes))
    cm = confusion_matrix(y_true, y_pred, labels=labels) if n else np.zeros((n_classes,) * 2)
    support = cm.sum(axis=1)
    per_class_recall = {
        str(name): _ratio(int(cm[i, i]), int(support[i])) for i, name in enumerate(class_names)
    }
    present = scored_classes(y_true, n_classes)
    averaged = {"labels": present, "zero_division": 0}

    macro = macro_f1(y_true, y_pred, n_classes)
    weighted_f1 = f1_score(y_true, y_pred, average="weighted", **averaged) if n else None

    if n_classes == 2:
        tp, fp, fn = int(cm[1, 1]), int(cm[0, 1]), int(cm[1, 0])
        precision = _ratio(tp, tp + fp)
        recall = _ratio(tp, tp + fn)
        f1 = _ratio(2 * tp, 2 * tp + fp + fn)
        roc_auc = pr_auc = None
        if len(present) == 2:
            positive = y_true == 1
            s = attack_score(scores)
            roc_auc = roc_auc_score(positive, s)
            pr_auc = average_precision_score(positive, s)
    else:
        precision = recall = None
        if n:
            precision = precision_score(y_true, y_pred, average="macro", **averaged)
            recall = recall_score(y_true, y_pred, average="macro", **averaged)
        f1 = macro
        roc_auc = pr_auc = None
        if len(present) >= 2:
            aucs = [roc_auc_score(y_true == c, scores[:, c]) for c in present]
            aps = [average_precision_score(y_true == c, scores[:, c]) for c in present]
            roc_auc, pr_auc = float(np.mean(aucs)), float(np.mean(aps))

    n_normal = int(support[0])
    return {
        "accuracy": _ratio(int(np.trace(cm)), n),
        "precision": _clean(precision),
        "recall": _clean(recall),
        "f1": _clean(f1),
        "macro_f1": _clean(macro),
        "weighted_f1": _clean(weighted_f1),
        "roc_auc": _clean(roc_auc),
        "pr_auc": _clean(pr_auc),
        "fpr": _ratio(n_normal - int(cm[0, 0]), n_normal),
        "per_class_recall": per_class_recall,
        "confusion": [[int(v) for v in row] for row in cm],
        "n": n,
        "classes_scored": len(present),
    }
