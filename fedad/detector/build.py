"""A finished run's detectors: the federated model and the best centralized one (by validation)."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

import numpy as np
from hydra.utils import to_absolute_path
from omegaconf import DictConfig

from fedad import rundir
from fedad.config import checks, to_dict
from fedad.data.prepared import PreparedData
from fedad.data.preprocess import Preprocessor
from fedad.detector.adapters import ANOMALY_SCORE, adapter_for, find_adapter
from fedad.detector.artifact import write
from fedad.detector.scorer import ARGMAX_RULE, POOLED_SITES, THRESHOLD_RULE, TRAIN_ROWS
from fedad.evaluation.comparison import ModelResult
from fedad.federated.checkpoint import data_fingerprint

log = logging.getLogger("fedad")


def check_config(cfg: Mapping) -> list[str]:
    """What is wrong with the ``detector`` settings; empty when they can run.

    Parameters
    ----------
    cfg : Mapping
        The ``detector`` block of the config.

    Returns
    -------
    list[str]
        One phrase per problem, naming the key.
    """
    problems = [checks.flag(cfg, "write", "detector")]
    if cfg.get("target_fpr") is not None:
        problems.append(checks.number(cfg, "target_fpr", "detector", low=0, high=1))
    return [p for p in problems if p]


def choose(models: Sequence[ModelResult]) -> list[ModelResult]:
    """The models that get a detector: the federated one, and the best supervised one.

    The supervised model is the one with the highest validation macro-F1 (rows
    held out of the training data), never a test-set score; ties go to the
    first in the configured order. A model no adapter can save (a family that
    has none yet) is left out, and the log says so.
    """
    chosen = [m for m in models if m.kind == "federated"]
    candidates = [
        m
        for m in models
        if m.kind == "supervised" and m.info.get("validation_macro_f1") is not None
    ]
    if candidates:
        chosen.append(max(candidates, key=lambda m: m.info["validation_macro_f1"]))
    savable = [m for m in chosen if find_adapter(_saved(m)) is not None]
    for m in chosen:
        if m not in savable:
            log.info("no detector for %s: no adapter saves its kind of model yet", m.name)
    return savable


def _saved(model: ModelResult) -> object:
    """What an adapter saves: the federated run's scorer, or a baseline's fitted estimator."""
    # ModelResult.model is any fitted model; a baseline's has .estimator (comparison.py).
    return model.model if model.kind == "federated" else cast(Any, model.model).estimator


def write_detectors(
    cfg: DictConfig,
    data: PreparedData,
    parts: Sequence[np.ndarray],
    models: Sequence[ModelResult],
    run_dir: Path,
) -> dict:
    """Write ``detector/<model>/`` for each model :func:`choose` picks.

    Parameters
    ----------
    cfg : DictConfig
        The run's composed config.
    data : PreparedData
        The run's split, with its fitted preprocessor.
    parts : Sequence[np.ndarray]
        The sites' training rows (part of the data fingerprint, as in checkpoints).
    models : Sequence[ModelResult]
        Every model of the run, scored.
    run_dir : Path
        The run folder.

    Returns
    -------
    dict
        Model name -> the detector folder and why the model was chosen, for
        ``results.json``.
    """
    fingerprint = data_fingerprint(data, parts)
    return {m.name: write_detector(cfg, data, fingerprint, m, run_dir) for m in choose(models)}


def write_detector(
    cfg: DictConfig, data: PreparedData, fingerprint: str, model: ModelResult, run_dir: Path
) -> dict:
    """Write ``detector/<model>/`` for one model of a run.

    Parameters
    ----------
    cfg : DictConfig
        The run's composed config.
    data : PreparedData
        The run's split, with its fitted preprocessor.
    fingerprint : str
        The data fingerprint (:func:`fedad.federated.checkpoint.data_fingerprint`).
    model : ModelResult
        A federated or supervised model of the run.
    run_dir : Path
        The run folder (a federated model's ``scaling.npz`` is read from it, and
        the federated autoencoder's ``threshold.json``).

    Returns
    -------
    dict
        ``folder`` (relative to ``run_dir``) and ``chosen_as``.
    """
    if model.kind == "federated":
        with np.load(run_dir / rundir.SCALING_FILE) as stats:
            mean, std = stats["mean"], stats["std"]
        scaling = POOLED_SITES
        classes = list(range(data.n_classes))
        why = "the federated model"
    else:
        mean, std = data.scaler.mean_, data.scaler.scale_
        scaling = TRAIN_ROWS
        classes = [int(c) for c in cast(Any, model.model).classes]
        validation = model.info.get("validation_macro_f1")
        why = (
            "the centralized supervised model with the highest validation macro-F1 "
            f"({validation:.4f}, on rows held out of the training data)"
            if validation is not None
            else "a centralized supervised model"
        )
    folder = run_dir / rundir.DETECTOR_DIR / model.name
    manifest = _manifest(cfg, data, model, classes, scaling, why, fingerprint, run_dir)
    write(folder, manifest, _saved(model), _preprocessor(data), mean, std)
    return {"folder": str(folder.relative_to(run_dir)), "chosen_as": why}


def _preprocessor(data: PreparedData) -> Preprocessor:
    # fedad.data.prepare always fits one; the field is optional only in the dataclass.
    return cast(Preprocessor, data.preprocessor)


def _manifest(
    cfg: DictConfig,
    data: PreparedData,
    model: ModelResult,
    classes: list[int],
    scaling: str,
    why: str,
    fingerprint: str,
    run_dir: Path,
) -> dict:
    dataset = to_dict(cfg.dataset)
    pre = _preprocessor(data)
    label_columns = [dataset["label_column"]]
    if cfg.task != "binary" and dataset.get("class_column"):
        label_columns.append(dataset["class_column"])
    dropped = [*(dataset.get("drop_columns") or [])]
    if dataset.get("natural_column"):
        dropped.append(dataset["natural_column"])
    return {
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "model": {
            "name": model.name,
            "run_kind": model.kind,
            "classes": classes,
            "chosen_as": why,
            "validation_macro_f1": model.info.get("validation_macro_f1"),
        },
        "reader": {
            "sep": dataset.get("sep", ","),
            "header": bool(dataset.get("header", True)),
            "columns": dataset.get("columns"),
        },
        "labels": {
            "task": cfg.task,
            "label_column": dataset["label_column"],
            "normal_value": dataset["normal_value"],
            "label_case": dataset.get("label_case", "exact"),
            "class_column": dataset.get("class_column"),
            "class_map": dataset.get("class_map"),
        },
        "class_names": list(data.class_names),
        "schema": {
            "features": [{"name": c, "type": "number"} for c in pre.numeric]
            + [{"name": c, "type": "category"} for c in pre.categorical],
            "optional": [*label_columns, *dropped],
            "labels": label_columns,
            "dropped": dropped,
            "encoded_features": list(data.feature_names),
            "log_transform": pre.log_transform,
        },
        "scaling": {"rule": scaling},
        "decision": _decision(model, data, run_dir),
        "data": {
            "dataset": dataset["name"],
            "train_file": dataset.get("train_file") or dataset.get("path"),
            "test_file": dataset.get("test_file"),
            "origin": data.notes.get("origin"),
            "data_dir": to_absolute_path(cfg.data_dir),
            "fingerprint": fingerprint,
            "n_train": int(len(data.y_train)),
            "n_test": int(len(data.y_test)),
        },
        "test_metrics": model.metrics,
    }


def _decision(model: ModelResult, data: PreparedData, run_dir: Path) -> dict:
    if adapter_for(_saved(model)).output == ANOMALY_SCORE:
        return _threshold_decision(run_dir)
    binary = data.n_classes == 2
    rules = {
        ARGMAX_RULE: {
            "threshold": None,
            "description": "the most probable class"
            + (" (attack when its probability passes 0.5)" if binary else ""),
        }
    }
    chosen = model.info.get("validation", {}).get("target_fpr")
    if chosen:
        rules["target_fpr"] = {
            **chosen,
            "description": (
                f"attack when the attack score (1 - p(normal)) is at least the threshold, which "
                f"flagged {chosen['fpr']:.4f} of the normal validation rows (target "
                f"{chosen['target']}); chosen on rows held out of the training data by a refit "
                "of the same model, so the shipped model's rate may differ a little"
            ),
        }
        note = "target_fpr: chosen on validation rows"
    elif model.kind == "federated" and not model.info.get("decision"):
        note = (
            "no target_fpr rule: the federated model has no central validation rows (each "
            "site keeps its own)"
        )
    else:
        note = "no target_fpr rule: detector.target_fpr was null"
    default = ARGMAX_RULE
    decision = model.info.get("decision")
    if decision:
        # The rule the run's comparison scored this model under is the detector's default.
        default = decision["rule"]
        rules[default] = {
            "threshold": decision["threshold"],
            **({"target": decision["target_fpr"]} if decision.get("target_fpr") else {}),
            "description": (
                "attack when the attack score (1 - p(normal)) is at least the threshold, "
                f"which the run chose by {default} on {decision['chosen_on']} (the decision "
                "rule its comparison scored this model under); an attack row's class is the "
                "most probable attack class"
            ),
        }
    return {
        "default": default,
        "attack_score": "1 - p(normal)",
        "rules": rules,
        "note": note,
    }


def _threshold_decision(run_dir: Path) -> dict:
    """The federated autoencoder's one rule: the threshold its run chose (``threshold.json``)."""
    saved = rundir.read_json(run_dir / rundir.THRESHOLD_FILE)
    return {
        "default": THRESHOLD_RULE,
        "attack_score": (
            "the reconstruction error: the mean squared difference between the standardized "
            "row and the autoencoder's reconstruction of it"
        ),
        "rules": {
            THRESHOLD_RULE: {
                "threshold": saved["threshold"],
                "chosen_by": saved["rule"],
                "description": (
                    "attack when the reconstruction error is at least the threshold, which the "
                    f"federated run chose by {saved['rule']}"
                ),
            }
        },
        "note": (
            "no argmax or target_fpr rule: the autoencoder gives an anomaly score, not class "
            "probabilities, and the sites' validation rows stayed at the sites"
        ),
    }
