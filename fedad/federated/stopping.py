"""Federated early stopping: the rule that ends training on a pooled validation metric."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from fedad.federated.budget import TARGET

# The metrics the rule can watch, each of the sites' pooled validation slices
# (fedad.federated.task.validation_metrics), and whether a larger value is better.
METRICS = {"loss": False, "macro_f1": True}
# Why training ended, as results.json records it: stopped early, ran simulation.num_rounds,
# or the rule was off (patience 0); or one more round would have overspent
# privacy.target_epsilon (fedad.federated.privacy.Private raises StopTraining then).
PATIENCE, MAX_ROUNDS, OFF, BUDGET = "patience", "max_rounds", "off", "budget"
# The setting whose budget can end training, as the flat settings spell it.
TARGET_KEY = f"privacy.{TARGET}"
# The history column of the best round so far: the round whose model a run keeps.
BEST_ROUND = "best_round"


class StopTraining(Exception):
    """The rule, or the privacy budget, says training is over; raised before the next round."""


@dataclass
class EarlyStopping:
    """The rule of ``simulation.stop`` and its state after the rounds seen so far.

    A round improves when its pooled validation metric beats the best so far
    by more than ``min_delta`` (lower for ``loss``, higher for ``macro_f1``);
    the first round measured always does, a round without a value (no
    validation row answered) never does. Training stops once ``patience``
    rounds in a row have not improved; the best round's global model is the
    one a run keeps. ``patience`` 0 turns the rule off: every round runs and
    the last round's model is kept.

    Attributes
    ----------
    metric : str
        One of :data:`METRICS`.
    patience : int
        Rounds without improvement before stopping; 0 = off.
    min_delta : float
        The change a round must exceed to count as an improvement.
    best_value : float or None
        The best value so far (None before the first measured round).
    best_round : int or None
        Its round.
    last_round : int
        The last round the rule has seen.
    best_arrays : list[np.ndarray] or None
        The global model of ``best_round``.
    """

    metric: str
    patience: int
    min_delta: float
    best_value: float | None = None
    best_round: int | None = None
    last_round: int = 0
    best_arrays: list[np.ndarray] | None = field(default=None, repr=False)

    @classmethod
    def from_settings(cls, settings: Mapping[str, Any]) -> EarlyStopping:
        """The rule of the flat run settings (``simulation.stop.*``).

        A run config written before ``simulation.stop`` existed (a prepared
        deployment) holds none of its keys, and ``flwr run`` leaves a key set
        to ``""`` out: such a run trains all its rounds, as it did then.
        """
        return cls(
            metric=str(settings.get("simulation.stop.metric", "loss")),
            patience=int(settings.get("simulation.stop.patience", 0)),
            min_delta=float(settings.get("simulation.stop.min_delta", 0.0)),
        )

    @property
    def on(self) -> bool:
        """Whether the rule may stop training (patience above 0)."""
        return self.patience > 0

    @property
    def column(self) -> str:
        """The history column of the watched metric (``val_loss``, ``val_macro_f1``)."""
        return f"val_{self.metric}"

    @property
    def waited(self) -> int:
        """Rounds seen since the best one (since round 0 before any was measured)."""
        return self.last_round - (self.best_round or 0)

    @property
    def exhausted(self) -> bool:
        """Whether ``patience`` rounds in a row have not improved: training is over."""
        return self.on and self.waited >= self.patience

    def improves(self, value: float | None) -> bool:
        """Whether ``value`` beats the best so far by more than ``min_delta``."""
        if value is None or math.isnan(value):
            return False
        if self.best_value is None:
            return True
        if METRICS[self.metric]:
            return value > self.best_value + self.min_delta
        return value < self.best_value - self.min_delta

    def update(
        self, server_round: int, value: float | None, arrays: Callable[[], list[np.ndarray]]
    ) -> bool:
        """Take round ``server_round``'s value; keep its model (``arrays()``) if it improves.

        Returns
        -------
        bool
            Whether the round improved.
        """
        self.last_round = server_round
        if value is None or not self.improves(value):
            return False
        self.best_value, self.best_round = float(value), server_round
        self.best_arrays = arrays()
        return True

    def snapshot(self) -> EarlyStopping:
        """A copy of the state now, for the round's checkpoint (the arrays are never changed)."""
        return replace(self)

    def state(self) -> dict[str, Any]:
        """What a checkpoint stores besides the best arrays (JSON)."""
        return {
            "best_value": self.best_value,
            "best_round": self.best_round,
            "last_round": self.last_round,
            # Derived, stored for a reader without the settings (checkpoint.stopped_early).
            "stopped": self.exhausted,
        }

    def restore(self, state: Mapping[str, Any], best_arrays: list[np.ndarray] | None) -> None:
        """Take back a checkpoint's :meth:`state` and best arrays (a resumed run)."""
        self.best_value = state.get("best_value")
        self.best_round = state.get("best_round")
        self.last_round = int(state.get("last_round", 0))
        self.best_arrays = best_arrays

    def message(self, num_rounds: int) -> str:
        """The log line saying when and why training ended and which model is kept."""
        kept = (
            f"keeping the model of round {self.best_round} (pooled validation {self.metric} "
            f"{self.best_value:.4g})"
            if self.best_round is not None
            else f"no round had validation rows: keeping the model of round {self.last_round}"
        )
        if self.exhausted and self.last_round < num_rounds:
            return (
                f"early stopping after round {self.last_round} of {num_rounds}: the pooled "
                f"validation {self.metric} has not improved by more than {self.min_delta:g} for "
                f"{self.waited} round{'s' if self.waited != 1 else ''} "
                f"(simulation.stop.patience={self.patience}); {kept}"
            )
        return f"trained all {num_rounds} rounds; {kept}"


def summary(settings: Mapping[str, Any], history: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """``results.json``'s ``info["stopping"]`` of a finished run.

    Parameters
    ----------
    settings : Mapping
        The flat run settings (``simulation.stop.*``, ``simulation.num_rounds``).
    history : Sequence[Mapping]
        ``history.csv``'s rows, round 0 first.

    Returns
    -------
    dict
        ``metric``, ``patience``, ``min_delta``; ``rounds_run`` (rounds
        trained); ``best_round`` (the round whose model was scored and
        written: the last one when the rule is off); ``reason``: ``patience``
        (the rule stopped it before ``simulation.num_rounds``), ``budget`` (one
        more round would have spent more than ``privacy.target_epsilon``; the
        rule is checked first), ``max_rounds`` or ``off``.
    """
    rule = EarlyStopping.from_settings(settings)
    rounds_run = int(history[-1]["round"])
    best = history[-1].get(BEST_ROUND) if rule.on else None
    # The rule's state as training ended, to tell whether it ended training.
    rule.best_round = None if best is None or math.isnan(float(best)) else int(best)
    rule.last_round = rounds_run
    kept = rounds_run if rule.best_round is None else rule.best_round
    short = rounds_run < int(settings["simulation.num_rounds"])
    if short and settings.get(TARGET_KEY) not in (None, "") and not rule.exhausted:
        reason = BUDGET
    elif not rule.on:
        reason = OFF
    else:
        reason = PATIENCE if short else MAX_ROUNDS
    return {
        "metric": rule.metric,
        "patience": rule.patience,
        "min_delta": rule.min_delta,
        "rounds_run": rounds_run,
        "best_round": kept,
        "reason": reason,
    }
