"""A run's cross-source matrix: each source's detector trained alone, then every prediction."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import cast

import numpy as np
from omegaconf import DictConfig
from sklearn.preprocessing import StandardScaler

from fedad.baselines.runner import run_baselines, with_twin
from fedad.config import available_options, load_option, to_dict
from fedad.data.prepared import PreparedData
from fedad.evaluation import cross_source
from fedad.evaluation.comparison import ModelResult
from fedad.evaluation.decision import Rule
from fedad.evaluation.scorer import Scorer

log = logging.getLogger("fedad")


def cross_source_matrix(
    cfg: DictConfig, data: PreparedData, models: Sequence[ModelResult], run_dir: Path
) -> dict:
    """Train each source's detector alone, then write the matrix of every detector on each source.

    The detectors: one per source, the run's central twin family
    (:data:`fedad.models.catalog.TWINS`) trained by the baselines' own code on
    that source's training rows alone (its own scaler, fitted on them; its
    threshold from its own validation rows); the federated models; the
    central twin on the pooled training rows. Each decides every test row under
    the run's decision rule, and the matrix is computed from those decisions.

    Parameters
    ----------
    cfg : DictConfig
        The composed config.
    data : PreparedData
        The run's data, with ``sources_train`` and ``sources_test``.
    models : Sequence[ModelResult]
        The run's models, scored on the test set.
    run_dir : Path
        Gets ``cross_source.csv`` and ``cross_source_predictions.csv``.

    Returns
    -------
    dict
        What ``results.json`` records under ``cross_source``.
    """
    if data.sources_train is None or data.sources_test is None:
        raise ValueError("the cross-source matrix needs a federation of sources' data")
    baselines = with_twin(to_dict(cfg.baselines), str(cfg.model.name))
    twin = baselines["twin"]
    flags: dict[str, np.ndarray] = {}
    trained_on: dict[str, str] = {}
    for source in dict.fromkeys(data.sources_train):
        name = cross_source.alone_name(str(source))
        flags[name] = _alone(cfg, baselines, data, str(source))
        trained_on[name] = str(source)
    for model in models:
        if model.scores is None or not (model.kind == "federated" or model.name == twin):
            continue
        flags[model.name] = cast(Scorer, model.model).decide(model.scores)
        trained_on[model.name] = (
            cross_source.FEDERATED if model.kind == "federated" else cross_source.POOLED
        )
    classes = data.types_test if data.types_test is not None else _class_names(data)
    frame = cross_source.predictions(data.sources_test, classes, data.y_test != 0, flags)
    return cross_source.write(run_dir, frame, trained_on)


def _alone(cfg: DictConfig, baselines: dict, data: PreparedData, source: str) -> np.ndarray:
    """The twin family fitted on ``source``'s training rows alone: its decisions on the test set."""
    twin = baselines["twin"]
    rows = np.asarray(data.sources_train == source)
    # The baselines' progress names the twin alone; this line says which rows it learns from.
    log.info("cross-source: %s on the %d training rows of %s alone", twin, rows.sum(), source)
    own = dataclasses.replace(
        data,
        X_train=data.X_train[rows],
        y_train=data.y_train[rows],
        groups_train=None,
        types_train=None,
        sources_train=None,
        # What one organisation knows: the scale of its own training rows.
        scaler=StandardScaler().fit(data.X_train[rows]),
    )
    model_cfgs = {name: load_option("model", name) for name in available_options("model")}
    model_cfgs[cfg.model.name] = cfg.model
    [result] = run_baselines(
        {**baselines, "models": {twin: baselines["models"][twin]}},
        own,
        cfg.train,
        keras_epochs=int(cfg.simulation.num_rounds) * int(cfg.train.local_epochs),
        seed=int(cfg.seed),
        model_cfgs=model_cfgs,
        decision=Rule(str(cfg.decision.rule), target_fpr=cfg.decision.target_fpr),
    )
    return cast(Scorer, result.model).decide(cast(np.ndarray, result.scores))


def _class_names(data: PreparedData) -> np.ndarray:
    """Each test row's class name (multiclass: the labels are the attack types)."""
    return np.asarray(data.class_names, dtype=object)[data.y_test]
