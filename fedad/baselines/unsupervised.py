"""Centralized anomaly detectors that score rows as attack versus normal."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from sklearn.ensemble import IsolationForest
from sklearn.kernel_approximation import Nystroem
from sklearn.linear_model import SGDOneClassSVM
from sklearn.metrics import roc_auc_score
from sklearn.neighbors import LocalOutlierFactor
from sklearn.pipeline import make_pipeline
from sklearn.svm import OneClassSVM

from fedad.baselines.stopping import Stop, keras_budget, keras_stopping, stopping_info
from fedad.baselines.supervised import AUTO
from fedad.errors import FedadError
from fedad.evaluation.metrics import threshold_for_fpr, tune_threshold
from fedad.evaluation.scorer import Scorer

# Settings each detector accepts, with their defaults; the config overrides them.
UNSUPERVISED_DEFAULTS: dict[str, dict[str, Any]] = {
    "isolation_forest": {"n_estimators": 200, "max_samples": "auto"},
    # Exact kernel OCSVM is quadratic in rows; above max_exact_rows it becomes a
    # Nystroem kernel map (n_components) followed by a linear SGD one-class SVM.
    "one_class_svm": {"gamma": "scale", "max_exact_rows": 10000, "n_components": 300},
    # LOF is quadratic too; above max_fit_rows it fits on a random subsample.
    "local_outlier_factor": {"n_neighbors": 20, "max_fit_rows": 20000},
    # The federated autoencoder's twin: the same network on the pooled normal rows, for the
    # federated training budget (train.* settings, rounds x local epochs) on at most
    # max_fit_rows random fit rows (auto: every one as the run's twin); `model` picks
    # conf/model/<name>.yaml.
    "central_autoencoder": {"model": "autoencoder", "max_fit_rows": AUTO},
}
FIT_ON = ("normal", "all")
CONTAMINATION_FLOOR = 0.01
N_JOBS = 2


@dataclass
class FittedDetector(Scorer):
    """A fitted detector with its orientation and its tuned threshold.

    Attributes
    ----------
    estimator : object
        The scikit-learn detector (or Nystroem + SGD pipeline).
    sign : float
        ``1.0``, or ``-1.0`` when the validation check flipped the score.
    method : str
        The path that ran: ``exact``, ``nystroem_sgd`` or ``subsample``.
    threshold : float
        Attack score from which a row is flagged as an attack (set once tuned on
        validation rows; the :class:`~fedad.evaluation.scorer.Scorer` field).
    """

    estimator: Any
    sign: float
    method: str
    threshold: float | None = None

    def predict_scores(self, X: np.ndarray) -> np.ndarray:
        """Return the attack score per row: higher means more anomalous."""
        # score_samples is higher for normal-looking rows, hence the minus.
        return -self.sign * self.estimator.score_samples(X)


def resolve_contamination(value: Any, y_fit_binary: np.ndarray) -> float:
    """Turn the ``contamination`` setting into the expected outlier share of the fit rows.

    Parameters
    ----------
    value : "auto" or float
        ``auto`` takes the attack share of the rows the detector is fitted on,
        clipped to ``[0.01, 0.5]``: the training attack share with ``fit_on:
        all``, and the floor 0.01 with ``fit_on: normal``, whose rows are all
        labelled normal. A number must lie in ``(0, 0.5]``.
    y_fit_binary : np.ndarray
        1 for attack rows among the fit rows, else 0.

    Returns
    -------
    float
    """
    if value == "auto":
        share = float(np.mean(y_fit_binary)) if y_fit_binary.size else 0.0
        return float(np.clip(share, CONTAMINATION_FLOOR, 0.5))
    try:
        share = float(value)
    except (TypeError, ValueError):
        share = float("nan")
    if not 0.0 < share <= 0.5:
        raise FedadError(
            f"baselines.contamination must be 'auto' or a number in (0, 0.5], got {value!r}. "
            "It is the expected share of anomalies among the rows a detector is fitted on."
        )
    return share


def fit_detector(
    name: str,
    params: Mapping[str, Any],
    X_pool: np.ndarray,
    y_pool_binary: np.ndarray,
    X_val: np.ndarray,
    y_val_binary: np.ndarray,
    *,
    fit_on: str,
    contamination: Any,
    seed: int,
    keras_fit: Mapping | None = None,
    target_fpr: float | None = None,
) -> tuple[FittedDetector, dict]:
    """Fit one detector, orient its score and tune its threshold on validation rows.

    Parameters
    ----------
    name : str
        A key of :data:`UNSUPERVISED_DEFAULTS`.
    params : Mapping
        That detector's settings, already merged with its defaults.
    X_pool, y_pool_binary : np.ndarray
        Scaled training rows left after carving the validation slice, and
        their labels (1 = attack). ``fit_on: normal`` fits on the normal ones.
    X_val, y_val_binary : np.ndarray
        Validation slice carved from the training data (never the test set):
        it orients the score (``fit_on: all`` only) and sets the threshold.
    fit_on : str
        ``normal`` or ``all``.
    contamination : "auto" or float
        See :func:`resolve_contamination`.
    seed : int
        Random seed.
    keras_fit : Mapping, optional
        For ``central_autoencoder``: ``train_cfg``, ``epochs`` and ``model_cfgs``
        (the federated training settings and model configs), and ``stop`` (a
        :class:`fedad.baselines.stopping.Stop`: it stops on the reconstruction loss
        of the validation slice's normal rows, the slice that sets its threshold).
    target_fpr : float, optional
        The decision rule ``target_fpr``: the threshold flags at most this share of
        the validation slice's normal rows; else it maximizes their macro-F1.

    Returns
    -------
    tuple[FittedDetector, dict]
        The detector, and facts to report: ``method``, ``fit_on``,
        ``fit_rows`` (rows available), ``fit_rows_used``, ``contamination``,
        ``val_roc_auc`` (after orientation), ``flipped``, ``threshold``; the
        autoencoder adds its budget (``epochs``, ``epochs_run``, ``best_epoch``,
        ``stopping``).
    """
    if fit_on not in FIT_ON:
        raise FedadError(
            f"baselines.fit_on must be one of {', '.join(FIT_ON)}, got {fit_on!r}: 'normal' "
            "fits detectors on normal training rows only, 'all' on every training row."
        )
    X_fit = X_pool[y_pool_binary == 0] if fit_on == "normal" else X_pool
    y_fit = y_pool_binary[y_pool_binary == 0] if fit_on == "normal" else y_pool_binary
    if len(X_fit) < 2:
        raise FedadError(
            f"The unsupervised baselines found {len(X_fit)} training row(s) to fit on with "
            f"fit_on={fit_on}. They need normal (label 0) training rows; use fit_on=all or a "
            "dataset with normal traffic in its training part."
        )
    c = resolve_contamination(contamination, y_fit)
    rng = np.random.default_rng(seed)
    budget: dict[str, Any] = {}
    if name == "isolation_forest":
        est, method, used = _isolation_forest(params, X_fit, c, seed)
    elif name == "one_class_svm":
        est, method, used = _one_class_svm(params, X_fit, c, seed)
    elif name == "local_outlier_factor":
        est, method, used = _local_outlier_factor(params, X_fit, c, rng)
    elif name == "central_autoencoder":
        normal_val = X_val[y_val_binary == 0]
        est, method, used, budget = _autoencoder(
            params, X_fit, seed, keras_fit or {}, rng, normal_val
        )
    else:
        raise FedadError(
            f"Unknown unsupervised baseline '{name}'. Valid names: "
            f"{', '.join(UNSUPERVISED_DEFAULTS)}."
        )
    detector = FittedDetector(estimator=est, sign=1.0, threshold=0.0, method=method)
    val_scores = detector.predict_scores(X_val)
    val_auc = float(roc_auc_score(y_val_binary, val_scores))
    # Fitted on mostly-attack rows, "anomalous" can mean "normal": check on
    # validation rows and turn the score around when it ranks backwards.
    flipped = fit_on == "all" and val_auc < 0.5
    if flipped:
        detector.sign, val_scores, val_auc = -1.0, -val_scores, 1.0 - val_auc
    if target_fpr is None:
        detector.threshold = tune_threshold(y_val_binary, val_scores)
    else:
        detector.threshold = threshold_for_fpr(y_val_binary, val_scores, target_fpr)
    info = {
        "method": method,
        "fit_on": fit_on,
        "fit_rows": int(len(X_fit)),
        "fit_rows_used": int(used),
        "contamination": c,
        "val_roc_auc": val_auc,
        "flipped": bool(flipped),
        "threshold": detector.threshold,
        "threshold_rule": "max_macro_f1" if target_fpr is None else "target_fpr",
        **budget,
    }
    return detector, info


def _isolation_forest(params: Mapping, X: np.ndarray, c: float, seed: int):
    est = IsolationForest(
        n_estimators=int(params["n_estimators"]),
        max_samples=params["max_samples"],
        contamination=c,
        n_jobs=N_JOBS,
        random_state=seed,
    ).fit(X)
    return est, "exact", len(X)


def _one_class_svm(params: Mapping, X: np.ndarray, nu: float, seed: int):
    gamma = params["gamma"]
    if gamma == "scale":
        # Resolved here so the exact and the approximate kernel agree.
        spread = X.shape[1] * float(X.var())
        gamma = 1.0 / spread if spread > 0 else 1.0
    gamma = float(gamma)
    if len(X) <= int(params["max_exact_rows"]):
        return OneClassSVM(kernel="rbf", gamma=gamma, nu=nu).fit(X), "exact", len(X)
    n_components = min(int(params["n_components"]), len(X))
    est = make_pipeline(
        Nystroem(kernel="rbf", gamma=gamma, n_components=n_components, random_state=seed),
        SGDOneClassSVM(nu=nu, random_state=seed),
    ).fit(X)
    return est, "nystroem_sgd", len(X)


def _at_most(
    X: np.ndarray, max_rows: int | None, rng: np.random.Generator
) -> tuple[np.ndarray, str]:
    """At most ``max_rows`` random rows of ``X`` (all when None), and ``exact`` or ``subsample``."""
    if max_rows is None or len(X) <= int(max_rows):
        return X, "exact"
    return X[rng.choice(len(X), size=int(max_rows), replace=False)], "subsample"


def _local_outlier_factor(params: Mapping, X: np.ndarray, c: float, rng: np.random.Generator):
    X, method = _at_most(X, params["max_fit_rows"], rng)
    est = LocalOutlierFactor(
        n_neighbors=min(int(params["n_neighbors"]), len(X) - 1),
        novelty=True,
        contamination=c,
        n_jobs=N_JOBS,
    ).fit(X)
    return est, method, len(X)


class ReconstructionError:
    """A fitted Keras autoencoder as a detector: ``score_samples`` is minus the error.

    Attributes
    ----------
    model : keras.Model
        The autoencoder.
    """

    def __init__(self, model: Any) -> None:
        self.model = model

    def score_samples(self, X: np.ndarray) -> np.ndarray:
        """Minus the mean squared reconstruction error (higher = more normal), as sklearn's."""
        rebuilt = np.concatenate(
            [self.model.predict_on_batch(X[i : i + 4096]) for i in range(0, len(X), 4096)]
        )
        return -np.mean((X.astype(np.float64) - rebuilt.astype(np.float64)) ** 2, axis=1)


def _autoencoder(
    params: Mapping,
    X: np.ndarray,
    seed: int,
    keras_fit: Mapping,
    rng: np.random.Generator,
    X_val: np.ndarray,
):
    """The federated autoencoder's architecture, trained on at most ``max_fit_rows`` fit rows.

    With ``keras_fit["stop"]`` it trains until the reconstruction loss of the
    normal validation rows ``X_val`` stops improving, keeping the best epoch's weights.
    """
    import keras

    from fedad.models.keras_models import build_model

    train_cfg = keras_fit.get("train_cfg") or {}
    model_cfgs = keras_fit.get("model_cfgs") or {}
    stop: Stop | None = keras_fit.get("stop")
    if params["model"] not in model_cfgs:
        raise FedadError(
            f"central_autoencoder needs the '{params['model']}' model config, but the caller "
            f"passed only: {', '.join(model_cfgs) or 'none'}."
        )
    given = len(X)
    X, method = _at_most(X, params.get("max_fit_rows"), rng)
    fit_kwargs: dict[str, Any] = {}
    if stop is not None and len(X_val):
        # Capped, it stops on as large a share of the normal validation rows as it fits on.
        X_val, _ = _at_most(X_val, max(1, round(len(X_val) * len(X) / given)), rng)
        fit_kwargs = keras_stopping(stop, (X_val, X_val))
    keras.utils.set_random_seed(seed)
    model = build_model(
        model_cfgs[params["model"]],
        X.shape[1],
        2,
        float(train_cfg.get("learning_rate", 0.001)),
        str(train_cfg.get("optimizer", "adam")),
    )
    epochs = int(keras_fit.get("epochs", 1))
    history = model.fit(
        X,
        X,
        epochs=epochs,
        batch_size=int(train_cfg.get("batch_size", 64)),
        shuffle=True,
        verbose=0,
        **fit_kwargs,
    )
    budget = keras_budget(history, epochs, fit_kwargs)
    if stop is not None and fit_kwargs:
        curve = history.history["val_loss"]
        budget["stopping"] = stopping_info(stop, len(X_val), "reconstruction loss", curve)
    return ReconstructionError(model), method, len(X), budget
