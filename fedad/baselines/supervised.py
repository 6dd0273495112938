"""Centralized supervised classifiers fitted on the pooled training set."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from sklearn.ensemble import RandomForestClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split
from sklearn.utils.class_weight import compute_class_weight, compute_sample_weight
from xgboost import XGBClassifier
from xgboost.callback import EarlyStopping

from fedad.baselines.stopping import (
    STOPPING,
    Stop,
    keras_budget,
    keras_stopping,
    stopping_info,
    validation_rows,
)
from fedad.errors import FedadError
from fedad.evaluation.scorer import Scorer

# max_fit_rows: AUTO on a model that can be a twin caps it at FIT_ROWS as a plain baseline (its
# cost grows with rows, and at a million rows it would dominate the run) and lifts the cap on the
# run's twin, so the reference learns from every training row the federation uses
# (fedad.baselines.twins.fit_cap).
AUTO = "auto"
FIT_ROWS = 50_000
# Settings each model accepts, with their defaults; the config overrides them.
SUPERVISED_DEFAULTS: dict[str, dict[str, Any]] = {
    "logistic_regression": {
        "C": 1.0,
        "max_iter": 1000,
        "class_weight": "balanced",
        "max_fit_rows": FIT_ROWS,
    },
    "random_forest": {
        "n_estimators": 200,
        "max_depth": None,
        "min_samples_leaf": 1,
        "max_fit_rows": FIT_ROWS,
    },
    "xgboost": {"n_estimators": 300, "max_depth": 6, "learning_rate": 0.1, "max_fit_rows": AUTO},
    # ``model`` names the entry of the federated model configs to copy; at a million rows,
    # ten epochs over every training row would cost more than the whole federated run, so
    # only the run's twin lifts the cap.
    "central_cnn": {"model": "cnn", "max_fit_rows": AUTO},
    "central_logistic": {"model": "logistic", "max_fit_rows": AUTO},
    "central_mlp": {"model": "mlp", "max_fit_rows": AUTO},
}
N_JOBS = 2
PREDICT_BATCH = 4096


@dataclass
class FittedClassifier(Scorer):
    """A fitted classifier whose scores have one column per class of the task.

    Attributes
    ----------
    estimator : object
        The scikit-learn, XGBoost or Keras model.
    classes : np.ndarray
        Class codes in the order of the estimator's output columns (a class
        absent from the training rows has no column there).
    n_classes : int
        Number of classes of the task.
    fit_rows : int
        Training rows the estimator was fitted on (fewer than given above
        ``max_fit_rows``, and without the stopping slice).
    budget : dict
        The training it got, for ``results.json``: ``epochs``, ``epochs_run``
        and ``best_epoch`` (Keras), ``boosting_rounds`` and ``trees`` (XGBoost,
        the forest), and ``stopping`` when it stopped on a validation slice.
    """

    estimator: Any
    classes: np.ndarray
    n_classes: int
    fit_rows: int = 0
    budget: dict = field(default_factory=dict)

    def predict_scores(self, X: np.ndarray) -> np.ndarray:
        """Return class probabilities of shape ``(n, n_classes)``."""
        if hasattr(self.estimator, "predict_proba"):
            proba = self.estimator.predict_proba(X)
        else:
            # predict_on_batch, not predict(): permutation importance calls this hundreds of
            # times, and predict() sets up a data pipeline on every call.
            proba = np.concatenate(
                [
                    self.estimator.predict_on_batch(X[i : i + PREDICT_BATCH])
                    for i in range(0, len(X), PREDICT_BATCH)
                ]
            )
        full = np.zeros((len(X), self.n_classes), dtype=np.float64)
        full[:, self.classes] = proba
        return full


def fit_supervised(
    name: str,
    params: Mapping[str, Any],
    X: np.ndarray,
    y: np.ndarray,
    n_classes: int,
    seed: int,
    *,
    train_cfg: Mapping | None = None,
    epochs: int = 1,
    model_cfgs: Mapping[str, Mapping] | None = None,
    stop: Stop | None = None,
    validation: tuple[np.ndarray, np.ndarray] | None = None,
) -> FittedClassifier:
    """Fit one supervised baseline on scaled training rows.

    Parameters
    ----------
    name : str
        A key of :data:`SUPERVISED_DEFAULTS`.
    params : Mapping
        That model's settings, already merged with its defaults, its
        ``max_fit_rows`` a number or None (the runner resolves ``auto``).
    X, y : np.ndarray
        Scaled training features and class codes.
    n_classes : int
        Number of classes of the task.
    seed : int
        Random seed.
    train_cfg : Mapping, optional
        The federated ``train`` config (``batch_size``, ``learning_rate``,
        ``optimizer``, ``class_weights``, ``early_stopping_patience``,
        ``val_fraction``); needed by the Keras models only.
    epochs : int
        Epochs for the Keras models (the caller matches the federated budget);
        with ``stop``, their cap.
    model_cfgs : Mapping[str, Mapping], optional
        Federated model configs by name (``cnn``, ``logistic``); the Keras
        baselines build the same architecture from them.
    stop : Stop, optional
        Stop the Keras models and XGBoost (:data:`fedad.baselines.stopping.STOPPING`)
        when their validation loss stops improving, keeping the best epoch's
        weights or the best round's trees; other models ignore it.
    validation : tuple[np.ndarray, np.ndarray], optional
        With ``stop``, the rows to stop on, held out of ``X`` by the caller;
        without them a stratified ``stop.val_fraction`` of ``X`` is held out here.

    Returns
    -------
    FittedClassifier
    """
    stops = stop is not None and name in STOPPING
    if stop is not None and stops and validation is None:
        fit_idx, held_idx = validation_rows(y, stop.val_fraction, seed)
        X, y, validation = X[fit_idx], y[fit_idx], (X[held_idx], y[held_idx])
    classes = np.unique(y)
    given = len(y)
    if params.get("max_fit_rows") is not None:
        X, y = capped_rows(X, y, int(params["max_fit_rows"]), seed)
    if stops and validation is not None and len(y) < given:
        # The stopping slice shrinks with the fit rows: a capped model would otherwise score
        # more rows each epoch than it trains on.
        validation = capped_rows(*validation, round(len(validation[1]) * len(y) / given), seed)
    budget: dict[str, Any] = {}
    if name == "logistic_regression":
        est = LogisticRegression(
            C=float(params["C"]),
            max_iter=int(params["max_iter"]),
            class_weight=params["class_weight"],
            random_state=seed,
        ).fit(X, y)
    elif name == "random_forest":
        est = RandomForestClassifier(
            n_estimators=int(params["n_estimators"]),
            max_depth=params["max_depth"],
            min_samples_leaf=int(params["min_samples_leaf"]),
            class_weight="balanced_subsample",
            n_jobs=N_JOBS,
            random_state=seed,
        ).fit(X, y)
        budget["trees"] = len(est.estimators_)
    elif name == "xgboost":
        est, budget = _fit_xgboost(params, X, y, classes, seed, stop if stops else None, validation)
    elif "model" in SUPERVISED_DEFAULTS.get(name, {}):
        est, budget = _fit_keras(
            params,
            X,
            y,
            n_classes,
            seed,
            train_cfg or {},
            epochs,
            model_cfgs or {},
            (stop, validation) if stop is not None and stops else None,
        )
        classes = np.arange(n_classes)
    else:
        raise FedadError(
            f"Unknown supervised baseline '{name}'. Valid names: {', '.join(SUPERVISED_DEFAULTS)}."
        )
    return FittedClassifier(
        estimator=est, classes=classes, n_classes=n_classes, fit_rows=len(y), budget=budget
    )


def capped_rows(
    X: np.ndarray, y: np.ndarray, max_rows: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """At most about ``max_rows`` rows, drawn per class in proportion, every class kept.

    Parameters
    ----------
    X, y : np.ndarray
        Training features and class codes.
    max_rows : int
        The cap; at or below it the rows come back unchanged.
    seed : int
        Seed of the draw.

    Returns
    -------
    tuple[np.ndarray, np.ndarray]
        The kept rows in their original order. A class keeps at least one row,
        so a long tail can add up to one row per class over the cap.
    """
    if len(y) <= max_rows:
        return X, y
    rng = np.random.default_rng(seed)
    share = max_rows / len(y)
    keep = []
    for code in np.unique(y):
        rows = np.flatnonzero(y == code)
        take = max(1, int(round(share * rows.size)))
        keep.append(rng.choice(rows, size=take, replace=False))
    kept = np.sort(np.concatenate(keep))
    return X[kept], y[kept]


def _fit_xgboost(
    params: Mapping[str, Any],
    X: np.ndarray,
    y: np.ndarray,
    classes: np.ndarray,
    seed: int,
    stop: Stop | None = None,
    validation: tuple[np.ndarray, np.ndarray] | None = None,
) -> tuple[XGBClassifier, dict[str, Any]]:
    """Fit XGBoost on class codes re-indexed to the classes present in ``y``, and its budget.

    With ``stop`` it boosts up to ``n_estimators`` rounds, stops after
    ``stop.patience`` rounds without its validation log-loss improving by more
    than ``stop.min_delta`` and keeps the trees up to the best round only, so
    every prediction uses them.
    """
    # XGBoost needs contiguous labels; a rare class can be missing from train.
    y_enc = np.searchsorted(classes, y)
    kwargs: dict[str, Any] = {}
    fit_kwargs: dict[str, Any] = {}
    sample_weight = None
    if classes.size == 2:
        n_pos = int((y_enc == 1).sum())
        kwargs["scale_pos_weight"] = (y_enc.size - n_pos) / n_pos
    else:
        sample_weight = compute_sample_weight("balanced", y_enc)
    if stop is not None and validation is not None:
        # A class only the validation rows hold has no output to score it against.
        known = np.isin(validation[1], classes)
        X_val, y_val = validation[0][known], np.searchsorted(classes, validation[1][known])
        kwargs["callbacks"] = [
            EarlyStopping(rounds=stop.patience, min_delta=stop.min_delta, save_best=True)
        ]
        fit_kwargs = {"eval_set": [(X_val, y_val)], "verbose": False}
    est = XGBClassifier(
        n_estimators=int(params["n_estimators"]),
        max_depth=int(params["max_depth"]),
        learning_rate=float(params["learning_rate"]),
        tree_method="hist",
        n_jobs=N_JOBS,
        random_state=seed,
        verbosity=0,
        **kwargs,
    )
    est.fit(X, y_enc, sample_weight=sample_weight, **fit_kwargs)
    rounds = int(est.get_booster().num_boosted_rounds())
    # One tree per round for two classes, one per class and round (softprob) above.
    budget: dict[str, Any] = {
        "boosting_rounds": rounds,
        "trees": rounds * (classes.size if classes.size > 2 else 1),
    }
    if stop is not None and fit_kwargs:
        # save_best cut the booster after its best round: rounds == best_iteration + 1.
        budget["best_iteration"] = int(est.best_iteration)
        (curve,) = est.evals_result()["validation_0"].values()
        budget["stopping"] = stopping_info(
            stop, len(fit_kwargs["eval_set"][0][1]), "log-loss", curve
        )
        # The callback has done its work; a fitted model keeps no reference to it.
        est.set_params(callbacks=None)
    return est, budget


def _fit_keras(
    params: Mapping[str, Any],
    X: np.ndarray,
    y: np.ndarray,
    n_classes: int,
    seed: int,
    train_cfg: Mapping,
    epochs: int,
    model_cfgs: Mapping[str, Mapping],
    stopping: tuple[Stop, tuple[np.ndarray, np.ndarray] | None] | None = None,
) -> tuple[Any, dict[str, Any]]:
    """Train the federated architecture centrally with the federated training settings.

    With ``stopping`` (the rule and its validation slice) it trains up to
    ``epochs`` and keeps the best epoch's weights; else the federated
    ``train.early_stopping_patience`` applies, as at the sites.
    """
    model_name = str(params["model"])
    if model_name not in model_cfgs:
        raise FedadError(
            f"The central Keras baseline needs the '{model_name}' model config, but the "
            f"caller passed only: {', '.join(model_cfgs) or 'none'}. Pass model_cfgs with "
            "the cnn and logistic configs from conf/model/."
        )
    # Imported here: TensorFlow takes seconds to load and most runs skip these models.
    import keras

    from fedad.models.keras_models import build_model

    keras.utils.set_random_seed(seed)
    model = build_model(
        model_cfgs[model_name],
        n_features=X.shape[1],
        n_classes=n_classes,
        learning_rate=float(train_cfg.get("learning_rate", 0.001)),
        optimizer=str(train_cfg.get("optimizer", "adam")),
    )
    class_weight = None
    if train_cfg.get("class_weights", False):
        present = np.unique(y)
        weights = compute_class_weight("balanced", classes=present, y=y)
        class_weight = {c: 1.0 for c in range(n_classes)}
        class_weight.update({int(c): float(w) for c, w in zip(present, weights, strict=True)})
    fit_kwargs: dict[str, Any] = {}
    patience = int(train_cfg.get("early_stopping_patience", 0))
    if stopping is not None and stopping[1] is not None:
        fit_kwargs = keras_stopping(stopping[0], stopping[1])
    elif patience > 0:
        X, X_val, y, y_val = train_test_split(
            X, y, test_size=float(train_cfg.get("val_fraction", 0.1)), random_state=seed
        )
        fit_kwargs["validation_data"] = (X_val, y_val)
        fit_kwargs["callbacks"] = [
            keras.callbacks.EarlyStopping(patience=patience, restore_best_weights=True)
        ]
    history = model.fit(
        X,
        y,
        epochs=int(epochs),
        batch_size=int(train_cfg.get("batch_size", 64)),
        class_weight=class_weight,
        shuffle=True,
        verbose=0,
        **fit_kwargs,
    )
    budget = keras_budget(history, epochs, fit_kwargs)
    if stopping is not None and stopping[1] is not None:
        curve = history.history["val_loss"]
        budget["stopping"] = stopping_info(stopping[0], len(stopping[1][1]), "loss", curve)
    return model, budget
