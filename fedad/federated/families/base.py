"""How one model family trains at a site and is scored by the server: the apps' one interface."""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from fedad import rundir
from fedad.config import Settings
from fedad.evaluation.decision import score_counts
from fedad.evaluation.scorer import Scorer
from fedad.federated.stopping import EarlyStopping
from fedad.federated.task import (
    ASK_SCORES,
    ASK_VALIDATION,
    SCORE_ATTACK,
    SCORE_NORMAL,
    Site,
    evaluation_metrics,
    row_losses,
    run_decision,
    validation_counts,
)


class RunScorer(Scorer):
    """A saved global model, loaded to score rows: the federated model's result in a run.

    Attributes
    ----------
    path : Path
        The model file (a detector copies it byte for byte).
    """

    path: Path

    def load_threshold(self, run_dir: Path) -> None:
        """Decide by the run's calibrated threshold (``threshold.json``), when it chose one."""
        path = Path(run_dir) / rundir.THRESHOLD_FILE
        if path.is_file():
            self.threshold = float(rundir.read_object(path)["threshold"])


class Family(ABC):
    """One model family as the ServerApp and the ClientApp see it.

    Model arrays travel as a list of NumPy arrays (an ArrayRecord): Keras
    weights, or a booster's JSON bytes. The server keeps an instance for the
    whole run (it may hold state between rounds, such as the autoencoder's
    threshold); sites make one per message.

    Parameters
    ----------
    settings : Mapping
        Flat run settings.

    Attributes
    ----------
    correction : list[np.ndarray] or None
        Added to every gradient of the next :meth:`fit`, one array per model
        array (SCAFFOLD's ``c - c_i``: :mod:`fedad.federated.scaffold`); None:
        none. Families that take no gradient steps never get one.
    """

    correction: list[np.ndarray] | None = None

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.class_names: list[str] = json.loads(str(settings["class-names"]))
        self.decision = run_decision(settings)

    @property
    def calibrated(self) -> bool:
        """Whether the global model decides by a threshold the sites' counts calibrate.

        True under a calibrated ``decision.rule`` for a family whose scores are class
        probabilities; the autoencoder keeps its own threshold protocol.
        """
        return self.decision.rule != "argmax"

    def init_runtime(self) -> None:  # noqa: B027
        """Set up the site's process before its first model call (nothing by default)."""

    def val_fraction(self) -> float:
        """Share of a site's rows held out for validation (early stopping, thresholds).

        Drawn when local (``train.early_stopping_patience``) or federated
        (``simulation.stop.patience``) early stopping is on; else none, so the
        site trains on every row that is not its local test slice.
        """
        local = int(self.settings["train.early_stopping_patience"]) > 0
        use = local or EarlyStopping.from_settings(self.settings).on or self.calibrated
        return float(self.settings["train.val_fraction"]) if use else 0.0

    def seed_initial(self, seed: int) -> None:  # noqa: B027
        """Seed what :meth:`initial_arrays` draws from (nothing to seed by default)."""

    @abstractmethod
    def initial_arrays(self) -> list[np.ndarray]:
        """The global model before round 1 (drawn from the current random state)."""

    @abstractmethod
    def fit(
        self, arrays: list[np.ndarray], site: Site, config: Mapping, seed: int
    ) -> tuple[list[np.ndarray], dict[str, float]]:
        """Train from the global ``arrays`` on the site; return its reply's arrays and metrics.

        The metrics hold ``num-examples``, the weight of the reply.
        """

    @abstractmethod
    def scores(self, arrays: list[np.ndarray], X: np.ndarray) -> np.ndarray:
        """Scores of ``X`` under the model ``arrays``: probabilities or 1-D attack scores."""

    def metrics(
        self, arrays: list[np.ndarray], X: np.ndarray, y: np.ndarray, config: Mapping
    ) -> dict[str, float]:
        """``loss`` and the client metrics of the model ``arrays`` on ``X, y``.

        ``config["attack-targets"]`` (the server's, under a targeted attack) adds
        ``attack_success``.
        """
        targets = config.get("attack-targets")
        return evaluation_metrics(y, self.scores(arrays, X), self.class_names, targets)

    def site_metrics(self, arrays: list[np.ndarray], site: Site, config: Mapping) -> dict[str, Any]:
        """What a site's evaluate reply holds: metrics on its local test slice.

        When the config asks (:data:`~fedad.federated.task.ASK_VALIDATION`:
        federated early stopping), also its validation slice's counts
        (:meth:`validation_counts`), which the server sums over the sites; and
        (:data:`~fedad.federated.task.ASK_SCORES`: a calibrated decision, in
        the final evaluation) counts of its validation rows' attack scores per
        bin (:func:`fedad.evaluation.decision.score_counts`).
        """
        metrics = self.metrics(arrays, site.X_test, site.y_test, config)
        out: dict[str, Any] = {**metrics, "num-examples": len(site.y_test)}
        if config.get(ASK_VALIDATION, False):
            out.update(self.validation_counts(arrays, site, config))
        if config.get(ASK_SCORES, False):
            scores = self.scores(arrays, site.X_val) if len(site.y_val) else np.empty((0, 2))
            normal, attack = score_counts(site.y_val, scores)
            out.update({SCORE_NORMAL: normal, SCORE_ATTACK: attack})
        return out

    def validation_counts(
        self, arrays: list[np.ndarray], site: Site, config: Mapping
    ) -> dict[str, Any]:
        """The validation slice as counts: cross-entropy summed over its rows, argmax confusion.

        For a family whose :meth:`scores` are class probabilities (Keras
        classifiers, boosters); see :func:`fedad.federated.task.validation_counts`.
        """
        n_classes = len(self.class_names)
        if not len(site.y_val):
            return validation_counts(site.y_val, site.y_val, np.empty(0), n_classes)
        probabilities = self.scores(arrays, site.X_val)
        return validation_counts(
            site.y_val,
            probabilities.argmax(axis=1),
            row_losses(site.y_val, probabilities),
            n_classes,
        )

    def evaluate_config(self) -> dict[str, Any]:
        """Extra entries of each round's evaluate config (none for most families)."""
        return {}

    def after_evaluate(self, aggregated: Mapping[str, Any]) -> None:  # noqa: B027
        """Take what the sites' aggregated evaluation says (the autoencoder's threshold).

        Most families learn nothing from it, so the default does nothing.
        """

    def history_fields(self) -> dict[str, float]:
        """What the family adds to each round's history row (and takes back on resume)."""
        return {}

    def restore(self, row: Mapping[str, Any]) -> None:  # noqa: B027
        """Take back the state a resumed run's last history row holds (nothing by default)."""

    @abstractmethod
    def save(self, arrays: list[np.ndarray], run_dir: Path) -> Path:
        """Write the final global model into ``run_dir``; return its path."""
