"""Run the configured centralized baselines and score them on the test set."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from functools import partial
from typing import Any

import numpy as np
from sklearn.model_selection import StratifiedKFold, train_test_split

from fedad import progress
from fedad.baselines.stopping import STOPPING, check_stop, stop_settings, validation_rows
from fedad.baselines.supervised import SUPERVISED_DEFAULTS, fit_supervised
from fedad.baselines.twins import check_caps, fit_caps, plain, selected
from fedad.baselines.unsupervised import (
    FIT_ON,
    UNSUPERVISED_DEFAULTS,
    fit_detector,
    resolve_contamination,
)
from fedad.config import checks
from fedad.data.prepared import PreparedData
from fedad.errors import FedadError
from fedad.evaluation.comparison import Kind, ModelResult
from fedad.evaluation.decision import ARGMAX, Rule, calibrate, threshold_from_scores
from fedad.evaluation.metrics import (
    attack_score,
    compute_metrics,
    threshold_for_fpr,
)
from fedad.models.catalog import TWINS

BASELINES = tuple(SUPERVISED_DEFAULTS) + tuple(UNSUPERVISED_DEFAULTS)


def run_baselines(
    cfg_baselines: Mapping,
    data: PreparedData,
    train_cfg: Mapping,
    keras_epochs: int,
    seed: int,
    model_cfgs: Mapping[str, Mapping] | None = None,
    validate: bool = False,
    target_fpr: float | None = None,
    decision: Rule = ARGMAX,
) -> list[ModelResult]:
    """Fit every baseline named in the config on ``data.scaled()`` and score it on test.

    Supervised models train on all training rows and predict the argmax class;
    with ``validate`` each is also refit on a stratified share of the training
    rows and scored on the rest (``baselines.val_fraction``), which gives the
    validation macro-F1 a detector is chosen by.
    Unsupervised detectors work on the binary view (normal vs any attack, also
    for the multiclass task): a stratified validation slice of the training
    rows orients their score and tunes their threshold; they fit on the rest.
    With ``baselines.stop.patience`` above 0 each twin-capable model
    (:data:`fedad.baselines.stopping.STOPPING`) stops on a stratified
    ``stop.val_fraction`` of its training rows (the autoencoder: on the normal
    rows of its validation slice); with ``validate`` that one fit, on the rest,
    also gives its validation score on those rows (``validation.refit`` false).
    Each model fits on at most its ``max_fit_rows`` rows; ``auto`` resolves by
    :func:`fedad.baselines.twins.fit_cap` (every row for the run's twin).

    Parameters
    ----------
    cfg_baselines : Mapping
        A ``conf/baselines/*.yaml`` config: ``models`` (name -> settings),
        ``cv_folds``, ``val_fraction``, ``fit_on``, ``contamination``, ``stop``
        and, from :func:`with_twin`, ``twin``.
    data : PreparedData
        The split the federated model uses.
    train_cfg : Mapping
        The federated ``train`` config; the central Keras models use its batch
        size, learning rate, optimizer, class weights and early stopping.
    keras_epochs : int
        Epochs for the central Keras models (fair budget: federated rounds x
        local epochs).
    seed : int
        Random seed for every model and split.
    model_cfgs : Mapping[str, Mapping], optional
        Federated model configs by name (``cnn``, ``logistic``); required when
        ``central_cnn`` or ``central_logistic`` is selected.
    validate : bool
        Score each supervised model on validation rows of the training data
        (a hold-out refit): ``info["validation_macro_f1"]`` and
        ``info["validation"]``.
    target_fpr : float, optional
        With ``validate``, also choose the attack-score threshold that flags
        at most this share of the validation rows' normal traffic (a detector's
        extra ``target_fpr`` rule).
    decision : Rule
        The run's decision rule (``decision.*``): a calibrated rule
        (``max_macro_f1``, ``target_fpr``) chooses each supervised model's
        threshold on its validation rows (as with ``validate``) and scores the
        test set under it, keeping the argmax metrics in ``info["argmax"]``;
        the unsupervised detectors' thresholds follow ``target_fpr`` on their
        own validation slice (else they maximize its macro-F1, as always).

    Returns
    -------
    list[ModelResult]
        In config order. ``info`` records ``params`` (as configured), ``fit_cap``
        (the cap in force, rows and why; None when it is at or above the
        training rows, so cannot bite), ``fit_rows`` and
        ``fit_rows_used``, and the budget: ``epochs``, ``epochs_run``,
        ``best_epoch`` (Keras), ``boosting_rounds``, ``trees`` and
        ``best_iteration`` (XGBoost), ``trees`` (the forest), ``stopping``.

    Raises
    ------
    FedadError
        On an unknown model or setting name, or a bad ``cv_folds``,
        ``val_fraction``, ``fit_on``, ``contamination``, ``stop`` or
        ``max_fit_rows``; before any model trains.
    """
    checks.raise_problems(check_config(cfg_baselines), "Cannot run the baselines")
    models = selected(cfg_baselines)
    if not models:
        return []
    cv_folds = int(cfg_baselines.get("cv_folds", 0) or 0)
    val_fraction = float(cfg_baselines.get("val_fraction", 0.2))
    fit_on = str(cfg_baselines.get("fit_on", "normal"))
    contamination = cfg_baselines.get("contamination", "auto")
    stop = stop_settings(cfg_baselines)
    caps = fit_caps(models, cfg_baselines.get("twin"), len(data.y_train), data.n_classes)
    X_train, X_test = data.scaled()

    def fit_sup(name: str, params: Mapping) -> Callable:
        # fit(X, y), or fit(X, y, validation=(X_val, y_val)) for a stopping model's slice.
        return partial(
            fit_supervised,
            name,
            params,
            n_classes=data.n_classes,
            seed=seed,
            train_cfg=train_cfg,
            epochs=keras_epochs,
            model_cfgs=model_cfgs,
            stop=stop,
        )

    def fit_unsup(name: str, params: Mapping) -> Callable:
        def fit(X: np.ndarray, y_binary: np.ndarray):
            X_pool, X_val, y_pool, y_val = _validation_split(X, y_binary, val_fraction, seed)
            return fit_detector(
                name,
                params,
                X_pool,
                y_pool,
                X_val,
                y_val,
                fit_on=fit_on,
                contamination=contamination,
                seed=seed,
                keras_fit={
                    "train_cfg": train_cfg,
                    "epochs": keras_epochs,
                    "model_cfgs": model_cfgs,
                    "stop": stop,
                },
                target_fpr=decision.target_fpr if decision.rule == "target_fpr" else None,
            )

        return fit

    results = []
    with progress.steps("baselines", len(models)) as bar:
        for name, params in models.items():
            kind: Kind = "supervised" if name in SUPERVISED_DEFAULTS else "unsupervised"
            cap = caps.get(name)
            fitting = {**params, "max_fit_rows": cap["rows"]} if cap else _uncapped(params)
            fit = (fit_sup if kind == "supervised" else fit_unsup)(name, fitting)
            # A stopping twin's slice, carved here so its fit_rows and validation say so.
            split = None
            if stop is not None and kind == "supervised" and name in STOPPING:
                split = validation_rows(data.y_train, stop.val_fraction, seed)
            with bar.step(name) as step:
                if (validate or decision.rule != "argmax") and kind == "supervised":
                    result = _run_validated(
                        name,
                        fit,
                        fitting,
                        data,
                        (X_train, X_test),
                        seed,
                        cv_folds,
                        val_fraction if stop is None or split is None else stop.val_fraction,
                        target_fpr,
                        split,
                        decision,
                    )
                else:
                    rows, held = split or (None, None)
                    result = _run_one(
                        name, kind, fit, data, X_train, X_test, seed, cv_folds, rows, held
                    )
                result.info["params"] = params
                if name in caps:
                    result.info["fit_cap"] = cap
                step.note = f"macro-F1 {result.metrics['macro_f1']:.3f}"
            results.append(result)
    return results


def with_twin(cfg_baselines: Mapping, model: str) -> dict:
    """``cfg_baselines`` with the federated model's centralized twin among its models.

    Parameters
    ----------
    cfg_baselines : Mapping
        A ``conf/baselines/*.yaml`` config.
    model : str
        The federated model's name (``cnn``, ``xgboost`` ...).

    Returns
    -------
    dict
        A plain copy; the twin (:data:`fedad.models.catalog.TWINS`) is added with
        its default settings when the config does not select it, and named in
        ``twin``: its ``max_fit_rows: auto`` then lifts its cap.
    """
    config = plain(cfg_baselines)
    models = dict(config.get("models") or {})
    twin = TWINS[model]
    if twin not in models:
        models[twin] = {**SUPERVISED_DEFAULTS, **UNSUPERVISED_DEFAULTS}[twin]
    return {**config, "models": models, "twin": twin}


def check_config(cfg_baselines: Mapping) -> list[str]:
    """What is wrong with a ``baselines`` config; empty when every model can run.

    Parameters
    ----------
    cfg_baselines : Mapping
        A ``conf/baselines/*.yaml`` config.

    Returns
    -------
    list[str]
        One phrase per problem, naming the key.
    """
    problems: list[str | None] = []
    models = cfg_baselines.get("models") or {}
    for name, params in models.items():
        defaults = {**SUPERVISED_DEFAULTS, **UNSUPERVISED_DEFAULTS}.get(name)
        if defaults is None:
            problems.append(
                f"baselines.models has no model '{name}' (valid names: {', '.join(BASELINES)})"
            )
            continue
        unknown = sorted(set(params or {}) - set(defaults))
        if unknown:
            problems.append(
                f"baselines.models.{name} has unknown setting(s) {', '.join(unknown)} (it "
                f"accepts: {', '.join(defaults) or 'no settings'})"
            )
    cv_folds = cfg_baselines.get("cv_folds", 0) or 0
    if checks.number({"cv_folds": cv_folds}, "cv_folds", "baselines", whole=True, low=0) or (
        cv_folds == 1
    ):
        problems.append(f"baselines.cv_folds must be 0 (none) or at least 2, got {cv_folds!r}")
    if any(name in UNSUPERVISED_DEFAULTS for name in models):
        problems.append(
            checks.number(
                cfg_baselines,
                "val_fraction",
                "baselines",
                low=0,
                high=1,
                low_open=True,
                high_open=True,
            )
        )
        problems.append(checks.choice(cfg_baselines, "fit_on", "baselines", FIT_ON))
        try:
            resolve_contamination(cfg_baselines.get("contamination", "auto"), np.zeros(0))
        except FedadError:
            problems.append(
                "baselines.contamination must be 'auto' or a number in (0, 0.5], got "
                f"{cfg_baselines.get('contamination')!r}"
            )
    problems += check_stop(cfg_baselines) + check_caps(cfg_baselines)
    return [p for p in problems if p]


def _uncapped(params: dict[str, Any]) -> dict[str, Any]:
    """``params`` with no cap on its fit rows, where it has one that cannot bite."""
    return {**params, "max_fit_rows": None} if "max_fit_rows" in params else params


def _validation_split(X: np.ndarray, y_binary: np.ndarray, fraction: float, seed: int):
    """Carve a stratified validation slice (both classes present) from training rows."""
    if np.unique(y_binary).size < 2:
        raise FedadError(
            "The unsupervised baselines need both normal and attack rows in the training "
            "data to orient their scores and tune a threshold; this training set has only "
            f"{'attack' if y_binary.all() else 'normal'} rows."
        )
    return train_test_split(X, y_binary, test_size=fraction, stratify=y_binary, random_state=seed)


def _run_one(
    name: str,
    kind: Kind,
    fit: Callable,
    data: PreparedData,
    X_train: np.ndarray,
    X_test: np.ndarray,
    seed: int,
    cv_folds: int,
    rows: np.ndarray | None = None,
    held: np.ndarray | None = None,
) -> ModelResult:
    """Fit one model on all training rows (or ``rows`` of them), score it on test, cross-validate.

    ``held`` are the training rows a stopping model stops on. Cross-validation,
    when asked, runs over all training rows.
    """
    unsupervised = kind == "unsupervised"
    binary_view = unsupervised and data.task != "binary"
    if unsupervised:
        y_train = (data.y_train != 0).astype(np.int64)
        y_test = (data.y_test != 0).astype(np.int64)
        class_names = (
            list(data.class_names) if data.task == "binary" else [data.class_names[0], "attack"]
        )
    else:
        if np.unique(data.y_train).size < 2:
            raise FedadError(
                "The supervised baselines need at least two classes in the training data; "
                f"it holds only '{data.class_names[int(data.y_train[0])]}'."
            )
        y_train, y_test, class_names = data.y_train, data.y_test, list(data.class_names)

    X_fit, y_fit = (X_train, y_train) if rows is None else (X_train[rows], y_train[rows])
    extra = {} if held is None else {"validation": (X_train[held], y_train[held])}
    start = time.perf_counter()
    fitted = fit(X_fit, y_fit, **extra)
    seconds = time.perf_counter() - start
    info: dict[str, Any] = {"binary_view": binary_view}
    if unsupervised:
        model, fit_info = fitted
        info.update(fit_info)
    else:
        model = fitted
        info["fit_rows"] = int(len(y_fit))
        info["fit_rows_used"] = int(model.fit_rows)
        info.update(model.budget)
    metrics, scores = _scored(model, X_test, y_test, class_names)
    if cv_folds:
        info["cv"] = _cross_validate(fit, X_train, y_train, class_names, cv_folds, seed)
    return ModelResult(name, kind, metrics, scores, seconds, model, info)


def _cross_validate(
    fit: Callable,
    X: np.ndarray,
    y: np.ndarray,
    class_names: list[str],
    folds: int,
    seed: int,
) -> dict:
    """Macro-F1 of ``fit`` over stratified folds of the training rows."""
    splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    scores = []
    for train_idx, held_idx in splitter.split(X, y):
        m, _ = _score_held(fit, X, y, train_idx, held_idx, class_names)
        scores.append(m["macro_f1"])
    return {
        "folds": folds,
        "macro_f1_mean": float(np.mean(scores)),
        "macro_f1_std": float(np.std(scores)),
        "macro_f1_folds": [float(s) for s in scores],
    }


def _score_held(
    fit: Callable,
    X: np.ndarray,
    y: np.ndarray,
    fit_idx: np.ndarray,
    held_idx: np.ndarray,
    class_names: list[str],
) -> tuple[dict, np.ndarray]:
    """Fit on rows ``fit_idx``; the metrics and scores of rows ``held_idx``."""
    fitted = fit(X[fit_idx], y[fit_idx])
    model = fitted[0] if isinstance(fitted, tuple) else fitted
    return _scored(model, X[held_idx], y[held_idx], class_names)


def _scored(model, X: np.ndarray, y: np.ndarray, class_names: list[str]) -> tuple[dict, np.ndarray]:
    """The metrics and scores of a fitted model on rows ``X`` of classes ``y``."""
    scores = model.predict_scores(X)
    return compute_metrics(y, scores, class_names, y_pred=model.decide(scores)), scores


def _run_validated(
    name: str,
    fit: Callable,
    params: Mapping,
    data: PreparedData,
    arrays: tuple[np.ndarray, np.ndarray],
    seed: int,
    cv_folds: int,
    fraction: float,
    target_fpr: float | None,
    split: tuple[np.ndarray, np.ndarray] | None = None,
    decision: Rule = ARGMAX,
) -> ModelResult:
    """A supervised model's result and its validation macro-F1 on a held-out share of train.

    The validation model is refit on the rest of the training rows, unless
    the model's ``max_fit_rows`` cap leaves it fewer rows than that rest: then
    a single capped fit, drawn from the rest, gives both the result and the
    validation score (``validation.refit`` is false): half the cost of a
    capped model, whose fit rows are a draw either way. A stopping model
    (``split``: the rows it fits on and stops on) is that one fit too: its
    stopping slice is its validation slice. A calibrated ``decision`` chooses
    the model's threshold on the validation rows' scores and rescores the test
    set under it (the argmax metrics kept in ``info["argmax"]``).
    """
    X_train, X_test = arrays
    if split is not None:
        (fit_idx, held_idx), shared = split, True
    else:
        fit_idx, held_idx = validation_rows(data.y_train, fraction, seed)
        cap = params.get("max_fit_rows")
        shared = cap is not None and len(fit_idx) > int(cap)
    rows = fit_idx if shared else None
    stops_on = held_idx if split is not None else None
    result = _run_one(
        name, "supervised", fit, data, X_train, X_test, seed, cv_folds, rows, stops_on
    )
    held = _hold_out(
        fit, X_train, data, fit_idx, held_idx, target_fpr, result.model if shared else None
    )
    threshold = threshold_from_scores(
        data.y_train[held_idx], held.pop("scores"), decision.rule, decision.target_fpr
    )
    held["fraction"], held["refit"] = fraction, not shared
    result.info["validation_macro_f1"] = held.pop("macro_f1")
    result.info["validation"] = held
    if threshold is not None:
        calibrate(result, threshold, decision, data.y_test, list(data.class_names))
    return result


def _hold_out(
    fit: Callable,
    X: np.ndarray,
    data: PreparedData,
    fit_idx: np.ndarray,
    held_idx: np.ndarray,
    target_fpr: float | None,
    fitted: object | None = None,
) -> dict:
    """Validation macro-F1 of a supervised model fitted on rows ``fit_idx``, scored on ``held_idx``.

    ``fitted`` is that model when it exists already; else ``fit`` makes it.
    The test rows play no part, so picking the best model by this number is fair.
    ``scores`` holds the held-out rows' scores (for a calibrated decision).
    """
    y = data.y_train
    class_names = list(data.class_names)
    if fitted is None:
        metrics, scores = _score_held(fit, X, y, fit_idx, held_idx, class_names)
    else:
        metrics, scores = _scored(fitted, X[held_idx], y[held_idx], class_names)
    held = {"macro_f1": metrics["macro_f1"], "rows": int(len(held_idx)), "scores": scores}
    if target_fpr is not None:
        threshold = threshold_for_fpr(y[held_idx], attack_score(scores), target_fpr)
        flagged = attack_score(scores) >= threshold
        normal = y[held_idx] == 0
        held["target_fpr"] = {
            "target": target_fpr,
            "threshold": threshold,
            "fpr": float(flagged[normal].mean()),
            "recall": float(flagged[~normal].mean()) if (~normal).any() else None,
        }
    return held
