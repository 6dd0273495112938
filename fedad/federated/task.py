"""What both Flower apps share: the run settings, a site's data and the evaluation metrics."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import numpy as np
from flwr.app import ConfigRecord, RecordDict, UserConfigValue

from fedad.config import Settings
from fedad.data import scaling
from fedad.evaluation.decision import Rule
from fedad.evaluation.metrics import METRIC_NAMES, attack_success_rate, compute_metrics
from fedad.federated import shards

# Metrics every evaluate reply carries (NaN where undefined), so that all replies
# have the same keys, as Flower's aggregation requires.
CLIENT_METRICS = (
    *METRIC_NAMES,
    # How many classes the slice holds: 1 marks a site whose local test slice cannot
    # measure a detector (one class), kept, not refused.
    "classes_scored",
)
# Reply metrics whose key starts with this are counts, pooled exactly: the server sums them
# over a round's replies (lists elementwise) instead of averaging them, and keeps them out of
# the strategy's weighted mean (fedad.federated.rounds.Rounds).
POOLED = "sum-"
# The evaluate-config key that asks a site for its validation slice's counts.
ASK_VALIDATION = "validation-counts"
# Those counts: the loss summed over the rows it is defined on, those rows, and the
# confusion matrix (rows = true class, columns = predicted) flattened row by row.
# The final evaluation's key that asks a site for counts of its validation rows' attack scores
# on the bin edges of fedad.evaluation.decision (the calibrated decision's histogram protocol),
# and those counts, normal and attack rows apart: counts only, no row's score leaves a site.
ASK_SCORES = "score-counts"
SCORE_NORMAL, SCORE_ATTACK = f"{POOLED}score-normal", f"{POOLED}score-attack"
VAL_LOSS, VAL_ROWS, VAL_CONFUSION = (
    f"{POOLED}val-loss",
    f"{POOLED}val-rows",
    f"{POOLED}val-confusion",
)


@dataclass
class Site:
    """One client's shard, scaled and split into local train, validation and test.

    ``state`` is what the site keeps from one round to its next: the ClientApp
    passes Flower's ``context.state``, which the engine keeps per node for the
    run (a Keras site keeps its optimizer's moments there).
    """

    X_train: np.ndarray
    y_train: np.ndarray
    X_val: np.ndarray
    y_val: np.ndarray
    X_test: np.ndarray
    y_test: np.ndarray
    state: RecordDict = field(default_factory=RecordDict)


def run_settings(defaults: Settings, run_config: Settings) -> dict[str, UserConfigValue]:
    """Return ``defaults`` updated with the values ``run_config`` sets.

    Parameters
    ----------
    defaults : Mapping
        Settings passed in code (the Simulation Engine's); empty under ``flwr run``.
    run_config : Mapping
        ``context.run_config``.

    Returns
    -------
    dict
        The settings the apps read; a run-config value ``""`` counts as not set.

    Notes
    -----
    Flower rejects a ``flwr run --run-config`` key that ``[tool.flwr.app.config]``
    in pyproject.toml does not declare, and hands the apps every declared key.
    Which keys a run has depends on its model and strategy (FedAvg takes no
    ``proximal_mu``), so pyproject.toml declares them all as ``""`` and only the
    values that ``python -m fedad.deployment`` writes for the run may count.
    """
    return {**defaults, **{k: v for k, v in run_config.items() if v != ""}}


def evaluation_metrics(
    y: np.ndarray,
    scores: np.ndarray,
    class_names: list[str],
    targets: Sequence[int] | None = None,
) -> dict:
    """Return cross-entropy ``loss`` plus :data:`CLIENT_METRICS`, NaN where undefined.

    Parameters
    ----------
    y : np.ndarray
        True class codes.
    scores : np.ndarray
        Predicted probabilities ``(n, n_classes)``.
    class_names : list[str]
        Class code to name.
    targets : Sequence[int], optional
        Classes a targeted attack relabels as normal: adds ``attack_success``
        (:func:`fedad.evaluation.metrics.attack_success_rate`).

    Returns
    -------
    dict
        Plain floats, ready for a MetricRecord.
    """
    full = compute_metrics(y, scores, class_names)
    return {"loss": cross_entropy(y, scores), **client_metrics(full, targets)}


def client_metrics(full: dict, targets: Sequence[int] | None = None) -> dict[str, float]:
    """:data:`CLIENT_METRICS` of a :func:`~fedad.evaluation.metrics.compute_metrics` result.

    As floats: NaN where undefined; with ``targets``, also ``attack_success`` (NaN when the
    rows hold none of the targeted classes).
    """
    out = {key: math.nan if full[key] is None else float(full[key]) for key in CLIENT_METRICS}
    if targets is not None:
        rate = attack_success_rate(full["confusion"], targets)
        out["attack_success"] = math.nan if rate is None else rate
    return out


def cross_entropy(y: np.ndarray, scores: np.ndarray) -> float:
    """Mean negative log-probability of the true class (NaN for no rows)."""
    if len(y) == 0:
        return math.nan
    return float(np.mean(row_losses(y, scores)))


def row_losses(y: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """Each row's negative log-probability of its true class (probabilities clipped at 1e-7)."""
    p = scores[np.arange(len(y)), np.asarray(y, dtype=np.int64)]
    return -np.log(np.clip(p, 1e-7, 1.0))


def validation_counts(
    y: np.ndarray, y_pred: np.ndarray, losses: np.ndarray, n_classes: int
) -> dict[str, Any]:
    """A site's validation slice as counts only, for the server to pool exactly.

    Parameters
    ----------
    y, y_pred : np.ndarray
        True and predicted class codes of the slice's rows.
    losses : np.ndarray
        The loss of each row it is defined on (every row, or an autoencoder's
        normal rows).
    n_classes : int
        Classes of the task: the confusion matrix is ``n_classes`` square.

    Returns
    -------
    dict
        :data:`VAL_LOSS` (the sum), :data:`VAL_ROWS` (how many losses) and
        :data:`VAL_CONFUSION` (flattened), ready for a MetricRecord.
    """
    codes = np.asarray(y, dtype=np.int64) * n_classes + np.asarray(y_pred, dtype=np.int64)
    confusion = np.bincount(codes, minlength=n_classes * n_classes)
    return {
        VAL_LOSS: float(np.sum(losses, dtype=np.float64)),
        VAL_ROWS: len(losses),
        VAL_CONFUSION: [int(v) for v in confusion],
    }


def validation_metrics(pooled: Mapping[str, Any]) -> dict[str, float]:
    """``val_loss`` and ``val_macro_f1`` of the sites' pooled :func:`validation_counts`.

    The loss is the pooled sum over the pooled rows; macro-F1 averages the F1
    of the classes the pooled rows hold, as
    :func:`fedad.evaluation.metrics.macro_f1` does for rows. NaN without rows.
    """
    rows = int(pooled.get(VAL_ROWS, 0))
    loss = float(pooled[VAL_LOSS]) / rows if rows else math.nan
    cells = np.asarray(pooled.get(VAL_CONFUSION, []), dtype=np.float64)
    k = math.isqrt(cells.size)
    confusion = cells.reshape(k, k)
    tp = np.diag(confusion)
    support, predicted = confusion.sum(axis=1), confusion.sum(axis=0)
    present = support > 0
    f1 = 2 * tp[present] / (support[present] + predicted[present])
    return {"val_loss": loss, "val_macro_f1": float(np.mean(f1)) if present.any() else math.nan}


def run_decision(settings: Mapping[str, Any]) -> Rule:
    """The run's decision rule (``decision.*``); argmax for settings written before it existed."""
    target = settings.get("decision.target_fpr")
    return Rule(
        str(settings.get("decision.rule", "argmax") or "argmax"),
        target_fpr=None if target in (None, "") else float(cast(float, target)),
    )


def load_site(
    settings: Settings,
    partition_id: int,
    config: ConfigRecord,
    val_fraction: float = 0.0,
    state: RecordDict | None = None,
    reader: str | None = None,
) -> Site:
    """Read this client's shard, scale it and split it into train/validation/test.

    With federated scaling the server's pooled ``scale-mean``/``scale-std`` are
    in ``config``; otherwise the site scales with its own shard's statistics.
    The split depends only on the seed and the partition id, so a site keeps
    the same local test slice in every round. ``val_fraction`` of the rows
    left after the test slice are held out for validation (the family says
    how many: early stopping, the autoencoder's threshold). ``state`` is the
    site's memory between rounds (``context.state``); a fresh one by default.
    ``reader`` names who reads in the shards' access log (the site by default).
    """
    X, y = shards.read_shard(
        shards.shard_path(cast(str, settings["run-dir"]), partition_id),
        reader or shards.site_reader(partition_id),
    )
    mean, std = site_scaling(X, config)
    X = scaling.standardize(X, mean, std)
    train, val, test = local_split(
        len(y),
        float(settings["train.test_fraction"]),
        val_fraction,
        seed=(int(settings["seed"]), partition_id),
    )
    site = Site(X[train], y[train], X[val], y[val], X[test], y[test])
    if state is not None:
        site.state = state
    return site


def site_scaling(X: np.ndarray, config: ConfigRecord) -> tuple[np.ndarray, np.ndarray]:
    """The mean and std a site standardizes with: the server's pooled ones, else its own."""
    if "scale-mean" in config:
        return np.asarray(config["scale-mean"]), np.asarray(config["scale-std"])
    return scaling.pooled_moments([scaling.site_sums(X)])


def local_split(
    n: int, test_fraction: float, val_fraction: float, seed: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Return shuffled ``(train, val, test)`` row indices for a shard of ``n`` rows.

    A non-zero fraction gets at least one row and training always keeps at
    least one, so tiny shards still train and report.
    """
    order = np.random.default_rng(seed).permutation(n)

    def size(total: int, fraction: float) -> int:
        if fraction <= 0 or total < 2:
            return 0
        return min(max(1, round(total * fraction)), total - 1)

    n_test = size(n, test_fraction)
    n_val = size(n - n_test, val_fraction)
    return order[n_test + n_val :], order[n_test : n_test + n_val], order[:n_test]


def balanced_weights(y: np.ndarray) -> np.ndarray:
    """Per-row weights ``n / (k * count(class))`` over the k classes present locally."""
    classes, inverse, counts = np.unique(y, return_inverse=True, return_counts=True)
    return (len(y) / (len(classes) * counts[inverse])).astype(np.float32)
