"""The one interface every fitted model is scored through: scores, then a decision."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

import numpy as np

from fedad.evaluation.decision import decide


class Scorer(ABC):
    """A fitted model as the comparison, importance, SHAP and the detectors use it.

    Subclasses say how rows become scores; the decision is the most probable class, or,
    with a ``threshold``, attack versus normal at that attack score
    (:func:`fedad.evaluation.decision.decide`).

    Attributes
    ----------
    detector_kind : str or None
        The detector adapter (``fedad.detector.adapters.ADAPTERS``) that saves this
        scorer itself; None where a detector saves the library model it wraps.
    threshold : float or None
        The attack score from which a row is an attack, chosen on validation rows; None
        decides by the most probable class (a 1-D anomaly score always needs one).
    """

    detector_kind: ClassVar[str | None] = None
    threshold: float | None = None

    @abstractmethod
    def predict_scores(self, X: np.ndarray) -> np.ndarray:
        """Class probabilities ``(n, n_classes)``, or a 1-D attack score (higher = attack)."""

    def decide(self, scores: np.ndarray) -> np.ndarray:
        """Class codes from :meth:`predict_scores` output, under :attr:`threshold`."""
        return decide(scores, self.threshold)

    def predict(self, X: np.ndarray) -> np.ndarray:
        """Class codes for ``X``."""
        return self.decide(self.predict_scores(X))
