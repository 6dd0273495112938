"""The pinned twin of a histogram run: central XGBoost trained exactly as the federation was."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import xgboost as xgb
from omegaconf import DictConfig

from fedad import rundir
from fedad.config import make_settings
from fedad.data import scaling
from fedad.data.prepared import PreparedData
from fedad.evaluation.comparison import ModelResult
from fedad.evaluation.decision import decide
from fedad.evaluation.metrics import TABLE_METRICS, compute_metrics
from fedad.evaluation.scorer import Scorer
from fedad.federated.families.booster import BoosterFamily
from fedad.federated.histogram import cohort, pinning
from fedad.federated.task import load_site
from fedad.models import booster
from fedad.models.catalog import BOOSTERS

# The pinned twin's name in the comparison; the federated row's gap is taken against it, and
# the plain central XGBoost (the model's usual twin) is named beside it as its ``central``.
PINNED = "xgboost_pinned"
# Who reads the shards in their access log: the twin pools every site's training rows.
READER = "pinned-twin"


class PinnedScorer(Scorer):
    """The pinned twin's booster, deciding by the federated model's threshold (if any).

    Equal to the federated booster, it scores the sites' validation slices alike,
    so the calibrated threshold those counts chose is its own too.
    """

    def __init__(self, model: xgb.Booster, n_classes: int, threshold: float | None) -> None:
        self.model, self.n_classes, self.threshold = model, n_classes, threshold

    def predict_scores(self, X: np.ndarray) -> np.ndarray:
        """Class probabilities."""
        return booster.probabilities(self.model, X, self.n_classes)


def train_pinned(
    X: np.ndarray,
    y: np.ndarray,
    counts: Sequence[int] | np.ndarray,
    cuts: tuple[np.ndarray, np.ndarray],
    train_params: Mapping,
    rounds: int,
    class_weights: bool = True,
) -> xgb.Booster:
    """``xgb.train`` on pooled rows as a histogram session trains: its edges and its weights.

    Parameters
    ----------
    X, y : np.ndarray
        The sites' training rows, pooled (scaled as the sites scaled them).
    counts : Sequence[int]
        The pooled class counts the sites weighted their classes by.
    cuts : tuple[np.ndarray, np.ndarray]
        The session's bin edges (``indptr``, ``values``).
    train_params : Mapping
        The sites' XGBoost parameters (:func:`fedad.models.booster.params`, the run's seed).
    rounds : int
        Boosting rounds: those of the federated booster.
    class_weights : bool
        ``model.class_weights``.

    Returns
    -------
    xgb.Booster
    """
    params, weight = dict(train_params), None
    if class_weights and len(y):
        extra, weight = booster.weighting(y, counts, params["objective"])
        params.update(extra)
    ref = pinning.reference(*cuts, int(params["max_bin"]))
    rows = xgb.QuantileDMatrix(
        np.ascontiguousarray(X, dtype=np.float32),
        label=y,
        weight=weight,
        ref=ref,
        max_bin=int(params["max_bin"]),
    )
    return xgb.train(params, rows, num_boost_round=int(rounds))


def pooled_site_rows(
    cfg: DictConfig, data: PreparedData, parts: Sequence[np.ndarray], run_dir: Path
) -> tuple[np.ndarray, np.ndarray]:
    """Every site's training rows as the site loaded them (scaled, split), pooled in site order."""
    settings = make_settings(cfg, data, len(parts), run_dir)
    held = BoosterFamily(settings).val_fraction()
    config: dict = {}
    if settings["simulation.scaling"] == "federated":
        with np.load(Path(run_dir) / rundir.SCALING_FILE) as stats:
            config = {"scale-mean": stats["mean"].tolist(), "scale-std": stats["std"].tolist()}
    # load_site reads only the scaling entries of a round's config: a plain mapping serves.
    sites = [
        load_site(settings, pid, config, held, reader=READER)  # type: ignore[arg-type]
        for pid in range(len(parts))
    ]
    return np.concatenate([s.X_train for s in sites]), np.concatenate([s.y_train for s in sites])


def with_booster_facts(
    cfg: DictConfig,
    data: PreparedData,
    parts: Sequence[np.ndarray],
    run_dir: Path,
    models: list[ModelResult],
) -> list[ModelResult]:
    """A federated XGBoost run's results with its trees and, for a histogram run, its pinned twin.

    The federated result (first of ``models``) gains ``info["trees"]`` (the
    comparison's tree count: bagging's grow with sites x rounds). A histogram
    run adds :data:`PINNED` (:func:`train_pinned` on the sites' training rows,
    the run's edges and pooled class counts, the federated booster's boosting
    rounds), and its federated row takes that model as its ``twin`` and names
    the plain central XGBoost as its ``central``: the gap to the twin measures
    federation, the gap to ``central`` adds what the pins change. When a round
    sampled fewer sites than all, the edges are those of the last round's
    cohort, and the twin (pooling every site) is near, not equal
    (``info["pinned"]["exact"]``).

    Returns
    -------
    list[ModelResult]
        ``models``, with the twin after the federated result.
    """
    if str(cfg.model.name) not in BOOSTERS or not models:
        return models
    federated = models[0]
    raw = (Path(run_dir) / rundir.BOOSTER_FILE).read_bytes()
    # Kept at round 0 (early stopping), the model is empty: no tree, the base score.
    saved = booster.load(raw) if raw else None
    n_classes = len(data.class_names)
    rounds = int(saved.num_boosted_rounds()) if saved is not None else 0
    per_round = n_classes if n_classes > 2 else 1
    federated.info["trees"] = len(saved.get_dump()) if saved is not None else 0
    pins = pinning.load(run_dir)
    if str(cfg.strategy.name) != cohort.STRATEGY or pins is None:
        return models
    started = time.perf_counter()
    X, y = pooled_site_rows(cfg, data, parts, run_dir)
    indptr, values, counts = pins
    params = booster.params(cfg.model, n_classes, int(cfg.seed))
    model = train_pinned(
        X, y, counts, (indptr, values), params, rounds, bool(cfg.model.get("class_weights", True))
    )
    seconds = time.perf_counter() - started
    scorer = PinnedScorer(model, n_classes, getattr(federated.model, "threshold", None))
    with np.load(Path(run_dir) / rundir.SCALING_FILE) as stats:
        X_test = scaling.standardize(data.X_test, stats["mean"], stats["std"])
    scores = scorer.predict_scores(X_test)
    metrics = compute_metrics(data.y_test, scores, data.class_names, y_pred=scorer.decide(scores))
    info: dict = {
        "params": params,
        "fit_rows": int(len(y)),
        "fit_rows_used": int(len(y)),
        "boosting_rounds": rounds,
        "trees": rounds * per_round,
        "pinned": {
            "bins": pinning.bins_of(indptr),
            "class_counts": [int(c) for c in counts],
            "exact": cohort.actors_needed(cfg.simulation, cohort.STRATEGY) >= len(parts),
        },
    }
    if scorer.threshold is not None:
        argmax = compute_metrics(data.y_test, scores, data.class_names, y_pred=decide(scores, None))
        info["argmax"] = {k: argmax[k] for k in TABLE_METRICS}
        info["decision"] = federated.info.get("decision")
    federated.info["central"] = federated.info.get("twin")
    federated.info["twin"] = PINNED
    twin = ModelResult(PINNED, "supervised", metrics, scores, seconds, scorer, info)
    return [federated, twin, *models[1:]]
