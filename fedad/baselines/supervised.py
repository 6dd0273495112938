"""Centralized supervised classifiers fitted on the pooled training set."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from sklearn.ensemble import RandomForestClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split
from sklearn.utils.class_weight import compute_class_weight, compute_sample_weight
from xgboost import XGBClassifier

from fedad.errors import FedadError
from fedad.evaluation.scorer import Scorer

# Settings each model accepts, with their defaults; the config overrides them.
SUPERVISED_DEFAULTS: dict[str, dict[str, Any]] = {
    "logistic_regression": {
        "C": 1.0,
        "max_iter": 1000,
        "class_weight": "balanced",
        "max_fit_rows": 50_000,
    },
    "random_forest": {
        "n_estimators": 200,
        "max_depth": None,
        "min_samples_leaf": 1,
        "max_fit_rows": 50_000,
    },
    "xgboost": {"n_estimators": 300, "max_depth": 6, "learning_rate": 0.1, "max_fit_rows": 50_000},
    # ``model`` names the entry of the federated model configs to copy; at a million rows,
    # ten epochs over every training row would cost more than the whole federated run.
    "central_cnn": {"model": "cnn", "max_fit_rows": 50_000},
    "central_logistic": {"model": "logistic", "max_fit_rows": 50_000},
    "central_mlp": {"model": "mlp", "max_fit_rows": 50_000},
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
        ``max_fit_rows``).
    """

    estimator: Any
    classes: np.ndarray
    n_classes: int
    fit_rows: int = 0

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
) -> FittedClassifier:
    """Fit one supervised baseline on scaled training rows.

    Parameters
    ----------
    name : str
        A key of :data:`SUPERVISED_DEFAULTS`.
    params : Mapping
        That model's settings, already merged with its defaults.
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
        Epochs for the Keras models (the caller matches the federated budget).
    model_cfgs : Mapping[str, Mapping], optional
        Federated model configs by name (``cnn``, ``logistic``); the Keras
        baselines build the same architecture from them.

    Returns
    -------
    FittedClassifier
    """
    classes = np.unique(y)
    if params.get("max_fit_rows") is not None:
        X, y = capped_rows(X, y, int(params["max_fit_rows"]), seed)
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
    elif name == "xgboost":
        est = _fit_xgboost(params, X, y, classes, seed)
    elif "model" in SUPERVISED_DEFAULTS.get(name, {}):
        est = _fit_keras(params, X, y, n_classes, seed, train_cfg or {}, epochs, model_cfgs or {})
        classes = np.arange(n_classes)
    else:
        raise FedadError(
            f"Unknown supervised baseline '{name}'. Valid names: {', '.join(SUPERVISED_DEFAULTS)}."
        )
    return FittedClassifier(estimator=est, classes=classes, n_classes=n_classes, fit_rows=len(y))


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
    params: Mapping[str, Any], X: np.ndarray, y: np.ndarray, classes: np.ndarray, seed: int
) -> XGBClassifier:
    """Fit XGBoost on class codes re-indexed to the classes present in ``y``."""
    # XGBoost needs contiguous labels; a rare class can be missing from train.
    y_enc = np.searchsorted(classes, y)
    kwargs: dict[str, Any] = {}
    sample_weight = None
    if classes.size == 2:
        n_pos = int((y_enc == 1).sum())
        kwargs["scale_pos_weight"] = (y_enc.size - n_pos) / n_pos
    else:
        sample_weight = compute_sample_weight("balanced", y_enc)
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
    return est.fit(X, y_enc, sample_weight=sample_weight)


def _fit_keras(
    params: Mapping[str, Any],
    X: np.ndarray,
    y: np.ndarray,
    n_classes: int,
    seed: int,
    train_cfg: Mapping,
    epochs: int,
    model_cfgs: Mapping[str, Mapping],
):
    """Train the federated architecture centrally with the federated training settings."""
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
    if patience > 0:
        X, X_val, y, y_val = train_test_split(
            X, y, test_size=float(train_cfg.get("val_fraction", 0.1)), random_state=seed
        )
        fit_kwargs["validation_data"] = (X_val, y_val)
        fit_kwargs["callbacks"] = [
            keras.callbacks.EarlyStopping(patience=patience, restore_best_weights=True)
        ]
    model.fit(
        X,
        y,
        epochs=int(epochs),
        batch_size=int(train_cfg.get("batch_size", 64)),
        class_weight=class_weight,
        shuffle=True,
        verbose=0,
        **fit_kwargs,
    )
    return model
