"""The one interface every fitted model is scored through: scores, then a decision."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

import numpy as np


class Scorer(ABC):
    """A fitted model as the comparison, importance, SHAP and the detectors use it.

    Subclasses say how rows become scores; the decision is the most probable class
    unless a subclass decides otherwise (a threshold on a 1-D attack score).

    Attributes
    ----------
    detector_kind : str or None
        The detector adapter (``fedad.detector.adapters.ADAPTERS``) that saves this
        scorer itself; None where a detector saves the library model it wraps.
    """

    detector_kind: ClassVar[str | None] = None

    @abstractmethod
    def predict_scores(self, X: np.ndarray) -> np.ndarray:
        """Class probabilities ``(n, n_classes)``, or a 1-D attack score (higher = attack)."""

    def decide(self, scores: np.ndarray) -> np.ndarray:
        """Class codes from :meth:`predict_scores` output (the most probable class)."""
        return np.asarray(scores).argmax(axis=1)

    def predict(self, X: np.ndarray) -> np.ndarray:
        """Class codes for ``X``."""
        return self.decide(self.predict_scores(X))
