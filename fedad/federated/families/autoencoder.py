"""A federated autoencoder: normal traffic only at each site, a threshold from error histograms."""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any, cast

import numpy as np

from fedad import rundir
from fedad.evaluation.decision import threshold_from_counts as counted_threshold
from fedad.evaluation.metrics import compute_metrics
from fedad.federated.families.classifier import KerasFamily, KerasScorer, local_model, train_local
from fedad.federated.task import POOLED, Site, client_metrics, validation_counts
from fedad.models.inference import SERVER_BATCH, predict, reconstruction_error

log = logging.getLogger(__name__)

# Bin edges of the reconstruction errors that sites count (mean squared error of the
# standardized features): log-spaced, 5.9 % apart, from 1e-4 to 1e4, with open ends.
ERROR_EDGES = np.concatenate([[0.0], np.logspace(-4, 4, 321), [np.inf]])
# The validation errors' counts per bin, normal and attack rows apart: pooled counts (summed
# over the sites exactly, never averaged).
ERROR_NORMAL, ERROR_ATTACK = f"{POOLED}error-normal", f"{POOLED}error-attack"
# With no attack among the validation rows, flag what is above this share of normal rows.
NORMAL_QUANTILE = 0.99


class AutoencoderFamily(KerasFamily):
    """A dense autoencoder trained on each site's normal rows; the score is its error.

    Rows are flagged as attacks when their reconstruction error reaches a
    threshold the server chooses each round from what the sites send: counts
    of their validation rows' errors on the bin edges the server announces
    (:data:`ERROR_EDGES`), normal and attack apart. No row leaves a site. The
    threshold maximizes the macro-F1 of the pooled validation counts.
    """

    def __init__(self, settings) -> None:
        super().__init__(settings)
        self.threshold = math.inf

    @property
    def calibrated(self) -> bool:
        """False: the autoencoder's threshold has its own protocol (error histograms)."""
        return False

    def val_fraction(self) -> float:
        """The threshold needs validation rows whether or not early stopping is on."""
        return float(self.settings["train.val_fraction"])

    def fit(
        self, arrays: list[np.ndarray], site: Site, config: Mapping, seed: int
    ) -> tuple[list[np.ndarray], dict[str, float]]:
        """Train on the site's normal rows; a site with none trains nothing and says so."""
        normal = site.X_train[site.y_train == 0]
        if not len(normal):
            log.warning("a site holds no normal training rows: it trains nothing this round")
            return arrays, {
                "train_loss": math.nan,
                "train_epochs": 0.0,
                "skipped": 1.0,
                "num-examples": 0,
            }
        held_out = site.X_val[site.y_val == 0]
        history = train_local(
            local_model(self.settings),
            arrays,
            normal,
            normal,
            self.settings,
            mu=float(config.get("proximal-mu", 0.0)),
            seed=seed,
            validation=(held_out, held_out),
            state=site.state if self.settings["train.keep_optimizer"] else None,
            correction=self.correction,
        )
        weights = local_model(self.settings).get_weights()
        return weights, {**history, "skipped": 0.0, "num-examples": len(normal)}

    def scores(self, arrays: list[np.ndarray], X: np.ndarray) -> np.ndarray:
        """Reconstruction errors: the mean squared error of each row's features."""
        if self._server_model is not None:
            self._server_model.set_weights(arrays)
            rebuilt = self._server_model.predict(X, batch_size=SERVER_BATCH, verbose=0)
        else:
            model = local_model(self.settings)
            model.set_weights(arrays)
            rebuilt = predict(model, X)
        return reconstruction_error(X, rebuilt)

    def metrics(
        self, arrays: list[np.ndarray], X: np.ndarray, y: np.ndarray, config: Mapping
    ) -> dict[str, float]:
        """Metrics with the threshold in ``config`` (none yet: nothing flagged)."""
        errors = self.scores(arrays, X)
        threshold = float(config.get("threshold", math.inf))
        # Anomaly scores are binary: every targeted attack class is the attack class.
        targets = [1] if config.get("attack-targets") is not None else None
        return anomaly_metrics(y, errors, threshold, self.class_names, targets)

    def site_metrics(self, arrays: list[np.ndarray], site: Site, config: Mapping) -> dict[str, Any]:
        """Test-slice metrics plus the validation errors' counts per bin, normal and attack."""
        out = super().site_metrics(arrays, site, config)
        edges = np.asarray(config.get("error-edges", ERROR_EDGES), dtype=np.float64)
        errors = self.scores(arrays, site.X_val)
        for key, rows in ((ERROR_NORMAL, site.y_val == 0), (ERROR_ATTACK, site.y_val != 0)):
            counts, _ = np.histogram(errors[rows], bins=edges)
            out[key] = counts.astype(np.int64).tolist()
        return out

    def validation_counts(
        self, arrays: list[np.ndarray], site: Site, config: Mapping
    ) -> dict[str, Any]:
        """Counts of the validation slice: the error summed over its normal rows, the confusion.

        The loss is what the site trains down: the reconstruction error of
        normal traffic (attack rows are meant to reconstruct badly). The
        confusion flags rows at the threshold in force (``config``), attack
        rows included.
        """
        errors = self.scores(arrays, site.X_val) if len(site.y_val) else np.empty(0)
        threshold = float(config.get("threshold", math.inf))
        attack = (np.asarray(site.y_val) != 0).astype(np.int64)
        return validation_counts(attack, errors >= threshold, errors[attack == 0], 2)

    def evaluate_config(self) -> dict[str, Any]:
        """The bin edges, and the threshold so far (for the sites' test-slice metrics)."""
        config: dict[str, Any] = {"error-edges": ERROR_EDGES.tolist()}
        if math.isfinite(self.threshold):
            config["threshold"] = self.threshold
        return config

    def after_evaluate(self, aggregated: Mapping[str, Any]) -> None:
        """Choose the threshold from the pooled validation counts."""
        if ERROR_NORMAL in aggregated:
            self.threshold = threshold_from_counts(
                ERROR_EDGES,
                np.asarray(aggregated[ERROR_NORMAL]),
                np.asarray(aggregated[ERROR_ATTACK]),
            )

    def history_fields(self) -> dict[str, float]:
        """The threshold the round's server evaluation used."""
        return {"threshold": self.threshold}

    def restore(self, row: Mapping[str, Any]) -> None:
        """The threshold of the round a resumed run continues from."""
        self.threshold = float(row.get("threshold", math.inf))

    def save(self, arrays: list[np.ndarray], run_dir: Path) -> Path:
        """The Keras model, and ``threshold.json`` beside it."""
        path = super().save(arrays, run_dir)
        rule = "max macro-F1 of the sites' pooled validation error counts"
        rundir.write_json(
            Path(run_dir) / rundir.THRESHOLD_FILE, {"threshold": self.threshold, "rule": rule}
        )
        return path


class AutoencoderScorer(KerasScorer):
    """The saved federated autoencoder and its threshold."""

    # Its outputs are attack scores, not a classifier's probabilities: its own adapter.
    detector_kind = "autoencoder"

    def __init__(self, run_dir: Path) -> None:
        super().__init__(run_dir)
        self.threshold = float(rundir.read_json(Path(run_dir) / rundir.THRESHOLD_FILE)["threshold"])

    def predict_scores(self, X: np.ndarray) -> np.ndarray:
        """Reconstruction errors (higher = more attack-like)."""
        return reconstruction_error(X, super().predict_scores(X))


def anomaly_metrics(
    y: np.ndarray,
    errors: np.ndarray,
    threshold: float,
    class_names: list[str],
    targets: list[int] | None = None,
) -> dict[str, float]:
    """``loss`` (the mean error) and the client metrics, rows flagged at ``threshold``.

    ``targets`` adds ``attack_success`` (see :func:`fedad.federated.task.client_metrics`).
    """
    y_binary = (np.asarray(y) != 0).astype(np.int64)
    full = compute_metrics(y_binary, errors, class_names, y_pred=(errors >= threshold))
    out = {"loss": float(np.mean(errors)) if len(errors) else math.nan}
    return {**out, **client_metrics(full, targets)}


def threshold_from_counts(edges: np.ndarray, normal: np.ndarray, attack: np.ndarray) -> float:
    """The bin edge from which flagging rows maximizes macro-F1 of the counted rows.

    Parameters
    ----------
    edges : np.ndarray
        ``k + 1`` bin edges.
    normal, attack : np.ndarray
        ``k`` counts of normal and attack rows' errors per bin.

    Returns
    -------
    float
        Rows with an error at or above it are attacks. Without attack rows,
        the edge above :data:`NORMAL_QUANTILE` of the normal rows; without
        any row, infinity (nothing flagged).
    """
    normal, attack = np.asarray(normal, dtype=np.float64), np.asarray(attack, dtype=np.float64)
    if normal.sum() + attack.sum() == 0:
        return math.inf
    if attack.sum() == 0:
        share = np.cumsum(normal) / normal.sum()
        return float(edges[int(np.searchsorted(share, NORMAL_QUANTILE)) + 1])
    # The calibrated decision's count rule, on the error histograms.
    return cast(float, counted_threshold(edges, normal, attack, "max_macro_f1"))
