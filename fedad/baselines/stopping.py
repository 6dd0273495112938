"""The centralized twins at convergence: when a twin stops, on which rows, and its budget."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from sklearn.model_selection import train_test_split

from fedad.config import checks
from fedad.models.catalog import TWIN_NAMES

# The models that stop when ``baselines.stop.patience`` is above 0: every centralized twin
# (Keras epochs, XGBoost boosting rounds). The forest keeps its stated budget, n_estimators.
STOPPING = TWIN_NAMES
STOP_KEYS = ("patience", "min_delta", "val_fraction")


@dataclass(frozen=True)
class Stop:
    """When a twin stops training: ``baselines.stop`` with ``patience`` above 0.

    Attributes
    ----------
    patience : int
        Epochs (XGBoost: boosting rounds) without improvement before it stops.
    min_delta : float
        The least fall of the validation loss that counts as an improvement.
    val_fraction : float
        The stratified share of its training rows it stops on (never test rows).
    """

    patience: int
    min_delta: float
    val_fraction: float


def stop_settings(cfg_baselines: Mapping) -> Stop | None:
    """The ``baselines.stop`` block as a :class:`Stop`, or None when stopping is off.

    Parameters
    ----------
    cfg_baselines : Mapping
        A ``conf/baselines/*.yaml`` config; without a ``stop`` block (a caller's
        own dict) stopping is off, the fixed budgets of before.

    Returns
    -------
    Stop or None
        None when ``patience`` is 0.
    """
    block = cfg_baselines.get("stop") or {}
    patience = int(block.get("patience", 0) or 0)
    if patience <= 0:
        return None
    return Stop(patience, float(block.get("min_delta", 0.0)), float(block.get("val_fraction", 0.2)))


def validation_rows(y: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Training rows to fit on and to validate on: a stratified split of ``y``'s positions.

    Parameters
    ----------
    y : np.ndarray
        Class codes of the training rows (never test rows).
    fraction : float
        Share held out for validation.
    seed : int
        Seed of the split.

    Returns
    -------
    tuple[np.ndarray, np.ndarray]
        Positions to fit on, positions to validate on.
    """
    counts = np.bincount(y)
    # Stratify on the class when every class present can sit on both sides, else on the label.
    strata = y if counts[counts > 0].min() >= 2 else (y != 0)
    return train_test_split(
        np.arange(len(y)), test_size=fraction, stratify=strata, random_state=seed
    )


def keras_stopping(stop: Stop, validation: tuple[np.ndarray, np.ndarray]) -> dict[str, Any]:
    """``model.fit`` keyword arguments that stop on ``validation``'s loss, best weights kept.

    Parameters
    ----------
    stop : Stop
        The stopping rule.
    validation : tuple[np.ndarray, np.ndarray]
        The stopping slice: features and targets (classes, or the rows themselves
        for an autoencoder).

    Returns
    -------
    dict
        ``validation_data`` and ``callbacks`` (one ``EarlyStopping``, first).
    """
    import keras

    # restore_best_weights: Keras 3 restores them when training ends, stopped or at the cap.
    callback = keras.callbacks.EarlyStopping(
        monitor="val_loss",
        patience=stop.patience,
        min_delta=stop.min_delta,
        restore_best_weights=True,
    )
    return {"validation_data": validation, "callbacks": [callback]}


def keras_budget(history: Any, epochs: int, fit_kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """The epochs a Keras model ran and the one it kept, for ``results.json``.

    Parameters
    ----------
    history : keras.callbacks.History
        What ``model.fit`` returned.
    epochs : int
        Its epoch cap.
    fit_kwargs : Mapping
        The keyword arguments it ran with (an ``EarlyStopping`` among the
        ``callbacks`` when it could stop).

    Returns
    -------
    dict
        ``epochs`` (the cap), ``epochs_run`` and ``best_epoch`` (1-based; None
        without early stopping: the last epoch is the one kept).
    """
    stopper = next(iter(fit_kwargs.get("callbacks") or []), None)
    best = getattr(stopper, "best_epoch", None)
    return {
        "epochs": int(epochs),
        "epochs_run": len(history.history.get("loss", [])),
        "best_epoch": None if best is None else int(best) + 1,
    }


def stopping_info(stop: Stop, val_rows: int, metric: str, curve: Any) -> dict[str, Any]:
    """What ``results.json`` records of a twin's stopping.

    Parameters
    ----------
    stop : Stop
        The rule.
    val_rows : int
        Rows of the slice it stopped on.
    metric : str
        What it watched on them (``loss``, ``log-loss``, ``reconstruction loss``).
    curve : Sequence[float]
        That metric after each epoch (or boosting round) it ran.

    Returns
    -------
    dict
        The rule's settings, ``val_rows``, ``metric`` and ``curve``.
    """
    values = [float(v) for v in curve]
    return {**asdict(stop), "val_rows": int(val_rows), "metric": metric, "curve": values}


def check_stop(cfg_baselines: Mapping) -> list[str]:
    """What is wrong with ``baselines.stop``; empty when it is fine or absent.

    Parameters
    ----------
    cfg_baselines : Mapping
        A ``conf/baselines/*.yaml`` config.

    Returns
    -------
    list[str]
        One phrase per problem, naming the key.
    """
    block = cfg_baselines.get("stop")
    if block is None:
        return []
    problems: list[str | None] = []
    unknown = sorted(set(block) - set(STOP_KEYS))
    if unknown:
        problems.append(
            f"baselines.stop has unknown setting(s) {', '.join(unknown)} (it accepts: "
            f"{', '.join(STOP_KEYS)})"
        )
    where = "baselines.stop"
    problems.append(
        checks.number(block, "patience", where, whole=True, low=0, hint="0 turns it off")
    )
    problems.append(checks.number(block, "min_delta", where, low=0))
    problems.append(
        checks.number(block, "val_fraction", where, low=0, high=1, low_open=True, high_open=True)
    )
    return [p for p in problems if p]
