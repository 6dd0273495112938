"""Federated training of one detector across simulated sites, on Flower's Simulation Engine."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import pandas as pd
from omegaconf import DictConfig, OmegaConf

from fedad import rundir
from fedad.config import content, make_settings
from fedad.data import scaling
from fedad.data.prepared import PreparedData
from fedad.errors import FedadError
from fedad.evaluation import fairness
from fedad.evaluation.comparison import ModelResult
from fedad.evaluation.decision import decide
from fedad.evaluation.metrics import TABLE_METRICS, attack_success_rate, compute_metrics
from fedad.federated import (
    attacks,
    checkpoint,
    pooled_sites,
    privacy,
    secagg,
    shards,
    site_state,
    stopping,
)
from fedad.federated import client_app as plain_client
from fedad.federated.families.registry import family_class, load_scorer
from fedad.federated.histogram import cohort
from fedad.federated.local_only import train_alone
from fedad.federated.secagg import client as secagg_client
from fedad.federated.server_app import server_app
from fedad.models.catalog import TWINS, federated_name

if TYPE_CHECKING:
    from fedad.federated.engine import EngineStart


@dataclass
class FederatedResult(ModelResult):
    """The federated model's result, with what only a federated run has.

    ``info`` holds, besides what every result holds, ``strategy``, ``rounds``,
    ``validation_macro_f1`` (the sites' held-out slices, safe to tune on),
    ``twin``, ``mb_exchanged``, ``curve`` (per-round test macro-F1, cumulative
    seconds and MB), ``stopping`` (federated early stopping: ``metric``,
    ``patience``, ``min_delta``, ``rounds_run``, ``best_round`` — the round
    whose model is scored and saved — and ``reason``: ``patience``,
    ``max_rounds`` or ``off``; :func:`fedad.federated.stopping.summary`),
    ``attack`` (its settings, the malicious sites, the attackers the
    strategy assumed), ``privacy`` (its settings and the final
    epsilon), ``note`` (what the comparison shows beside the model, ``ε = 3.2,
    δ = 1e-05``) and ``scaling_sites`` (how many sites' sums gave the pooled
    scaling statistics: all, or a sample past ``server_app.SCALING_SITES``).
    ``model`` is the saved global model (``model.path``: ``.keras``, or the
    booster's ``.json``), loaded; its inputs are standardized with the
    ``mean``/``std`` of ``scaling.npz`` in the same folder. ``train_seconds``
    is the whole simulation's wall time, Ray and actor start-up included (what
    of it is left once ``started`` has overlapped the data preparation).

    Attributes
    ----------
    history : pd.DataFrame
        One row per round; round 0 is the initial model. Server-side metrics
        on the global test set (``loss``, ``accuracy``, ``macro_f1``, ...),
        the clients' weighted training metrics (``train_*``) and evaluation
        metrics (``client_*``), ``failures`` (failed training replies),
        ``eval_failures``, ``seconds`` (the round's wall time; round 0's starts
        once the server's model is built) and ``started_at`` (when the round
        began, epoch seconds).
    clients : pd.DataFrame
        One row per site: the final model on the site's local test slice.
    """

    history: pd.DataFrame = field(default_factory=pd.DataFrame)
    clients: pd.DataFrame = field(default_factory=pd.DataFrame)


def run_federated(
    cfg: DictConfig,
    data: PreparedData,
    partitions: Sequence[np.ndarray],
    run_dir: Path,
    resume: bool = False,
    started: EngineStart | None = None,
) -> list[ModelResult]:
    """Train the configured model with Flower across ``len(partitions)`` simulated sites.

    Parameters
    ----------
    cfg : DictConfig
        The composed config; reads ``seed``, ``model``, ``strategy``,
        ``train`` and ``simulation``.
    data : PreparedData
        Unscaled train/test arrays.
    partitions : Sequence[np.ndarray]
        Row indices into ``data.X_train`` for each client.
    run_dir : Path
        Output folder: ``shards/`` (one folder per site, read only by that
        site, plus ``access.log``), ``history.csv``, ``clients.csv``,
        ``global_model.keras``, ``scaling.npz`` and ``checkpoint/`` (see
        :mod:`fedad.federated.checkpoint`).
    resume : bool
        Continue from the checkpoint in ``run_dir`` (after its last complete
        round, up to ``simulation.num_rounds``) instead of starting over; a
        fresh run deletes any checkpoint there.
    started : EngineStart, optional
        Ray and the actors from :func:`start_engine`, started while the data
        was prepared; without it they start here.

    Returns
    -------
    list[ModelResult]
        The federated model (a :class:`FederatedResult`), then each site alone
        (:func:`fedad.federated.local_only.train_alone`: the mean over the sites
        and the worst site; none with ``simulation.local_sites=0``). With
        ``simulation.central_sites``, ``clients.csv`` also scores the model trained
        on the sites' pooled rows (:func:`fedad.federated.pooled_sites.score_sites`).

    Raises
    ------
    FedadError
        If a setting is out of range or a partition is empty; when resuming, if
        there is no checkpoint or it was written with other settings or data;
        if a round gets fewer training replies than ``simulation.min_clients``
        (the last complete round is checkpointed first).
    """
    # Imported here, not with the package: it imports Ray, which the apps' own
    # processes under `flwr run` (one per message at a site) never use.
    from fedad.federated import engine

    run_dir = Path(run_dir)
    settings = prepare_sites(cfg, data, partitions, run_dir, resume)
    settings.update(secagg.run_settings(cfg))
    secagg.check_sites(settings, [len(p) for p in partitions])
    apps = secagg_client if secagg.on(settings) else plain_client
    sim = cfg.simulation
    stop = threading.Event()
    # The engine's {node id: partition id}, for the ServerApp.
    partitions_of: Future[dict[int, int]] = Future()
    start = time.perf_counter()
    engine.simulate(
        server_app(settings, stop, partitions_of),
        apps.client_app(settings),
        len(partitions),
        **_engine_settings(cfg),
        stop=stop,
        started=started,
        partitions=partitions_of,
    )
    train_seconds = time.perf_counter() - start

    scorer = load_scorer(str(cfg.model.name), run_dir, data.n_classes)
    with np.load(run_dir / rundir.SCALING_FILE) as stats:
        X_test = scaling.standardize(data.X_test, stats["mean"], stats["std"])
        scaling_sites = int(stats["sites"])
    scores = scorer.predict_scores(X_test)
    y_true = data.y_test if scores.ndim == 2 else (data.y_test != 0).astype(np.int64)
    metrics = compute_metrics(y_true, scores, data.class_names, y_pred=scorer.decide(scores))
    history = pd.read_csv(run_dir / rundir.HISTORY_FILE)
    info = {**run_info(cfg, settings, history, len(partitions)), "scaling_sites": scaling_sites}
    if "attack_success" in history:
        targets = [1] if scores.ndim == 1 else attacks.targets(settings, data.class_names)
        # A targeted attack ran (the history has its success): its targets are known.
        targets = cast(list[int], targets)
        metrics["attack_success"] = attack_success_rate(metrics["confusion"], targets)
    if info["privacy"]["name"] != "none":
        metrics["epsilon"] = info["privacy"]["epsilon"]
    if scores.ndim == 2 and scorer.threshold is not None:
        # A calibrated decision (decision.rule): the metrics above are under its threshold,
        # chosen from the sites' counts; the argmax ones go beside them.
        argmax = compute_metrics(y_true, scores, data.class_names, y_pred=decide(scores, None))
        info["argmax"] = {k: argmax[k] for k in TABLE_METRICS}
        info["decision"] = rundir.read_object(run_dir / rundir.THRESHOLD_FILE)
    # The budget of the federated side, beside its twin's (the comparison's price table).
    info["local_epochs"] = int(
        cfg.model.local_rounds if "local_rounds" in cfg.model else cfg.train.local_epochs
    )
    info["train_rows"] = int(sum(len(p) for p in partitions))
    info["stopping"] = stopping.summary(settings, history.to_dict("records"))
    # The kept round's: with early stopping, the best round's, not the last one's.
    kept = history[history["round"] <= info["stopping"]["best_round"]]
    validation = kept["client_macro_f1"].dropna()
    federated = FederatedResult(
        name=federated_name(str(cfg.model.name)),
        kind="federated",
        metrics=metrics,
        scores=scores,
        train_seconds=train_seconds,
        model=scorer,
        info={
            "strategy": cfg.strategy.name,
            "rounds": int(sim.num_rounds),
            # Clients' held-out slices of their own shards: safe to tune on, unlike the test set.
            "validation_macro_f1": float(validation.iloc[-1]) if len(validation) else None,
            "twin": TWINS[cfg.model.name],
            "mb_exchanged": float(history["mb_cumulative"].iloc[-1]),
            "curve": {
                "round": history["round"].astype(int).tolist(),
                "macro_f1": history["macro_f1"].tolist(),
                "seconds": history["seconds"].cumsum().round(2).tolist(),
                "mb": history["mb_cumulative"].round(4).tolist(),
            },
            **info,
        },
        history=history,
        clients=pd.read_csv(run_dir / rundir.CLIENTS_FILE),
    )
    sizes = [len(p) for p in partitions]
    if sim.central_sites:
        pooled_sites.score_sites(settings, len(partitions))
        fairness.audit_run(run_dir)
    alone = train_alone(settings, data, sizes, int(sim.local_sites)) if int(sim.local_sites) else []
    return [federated, *alone]


def start_engine(cfg: DictConfig) -> EngineStart:
    """Start Ray and ``cfg``'s actors now, each importing the model's framework as it starts.

    For :func:`run_federated`'s ``started``: begun before the data is
    prepared, the start overlaps the preparation. ``close()`` it when the run
    ends, whether or not the simulation ran.
    """
    from fedad.federated import engine

    return engine.EngineStart(
        **_engine_settings(cfg), warm_up=partial(family_class, str(cfg.model.name))
    )


def _engine_settings(cfg: DictConfig) -> dict:
    sim = cfg.simulation
    return {
        "client_resources": OmegaConf.to_container(sim.client_resources, resolve=True) or {},
        "ray_init_args": OmegaConf.to_container(sim.ray_init_args, resolve=True) or {},
        "address": sim.get("address"),
        "cohort": cohort.actors_needed(sim, str(cfg.strategy.name)),
    }


def run_info(
    cfg: DictConfig, settings: dict, history: pd.DataFrame, num_sites: int
) -> dict[str, Any]:
    """What ``results.json`` records of the run's attack and privacy (:class:`FederatedResult`)."""
    attack = attacks.describe(settings, num_sites)
    if attack["name"] != "none" and "num_malicious_nodes" in cfg.strategy:
        attack["assumed_by_strategy"] = int(cfg.strategy.num_malicious_nodes)
    rows = history.to_dict("records")
    dp = privacy.describe(settings, rows)
    note = privacy.label(dp)
    return {"attack": attack, "privacy": dp, **({"note": note} if note else {})}


def prepare_sites(
    cfg: DictConfig,
    data: PreparedData,
    partitions: Sequence[np.ndarray],
    run_dir: Path,
    resume: bool = False,
) -> dict[str, bool | int | float | str]:
    """Check the settings, write one shard per site and return the apps' settings.

    Everything a federated run does before an engine starts, shared by
    :func:`run_federated` (Simulation Engine) and :mod:`fedad.deployment`
    (Deployment Engine), so both start from the same files and settings.

    Parameters
    ----------
    cfg : DictConfig
        The composed config.
    data : PreparedData
        Unscaled train/test arrays.
    partitions : Sequence[np.ndarray]
        Row indices into ``data.X_train`` for each site.
    run_dir : Path
        The run folder; ``shards/`` is written there.
    resume : bool
        Keep the checkpoint in ``run_dir`` (it must match ``cfg`` and the data)
        instead of deleting it.

    Returns
    -------
    dict
        :func:`make_settings` plus ``resume`` and ``fingerprint`` (JSON, stored
        with each checkpoint).

    Raises
    ------
    FedadError
        As :func:`validate`; when resuming, if there is no checkpoint or it was
        written with other settings or data.
    """
    validate(cfg, partitions, data.class_names)
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    fingerprint: dict[str, Any] = {
        "content": content(cfg),
        "data": checkpoint.data_fingerprint(data, partitions),
    }
    if resume:
        # fedad.run.resume.decide compared the settings; the data is left to compare.
        meta = cast(Mapping, checkpoint.read_meta(run_dir))
        checkpoint.require_same_data(meta, fingerprint["data"], run_dir)
    else:
        checkpoint.clear(run_dir)
        site_state.clear(run_dir)
    shards.write_shards(data, partitions, run_dir)
    settings = make_settings(cfg, data, len(partitions), run_dir)
    settings["resume"] = resume
    settings["fingerprint"] = json.dumps(fingerprint)
    return settings


def validate(
    cfg: DictConfig, partitions: Sequence[np.ndarray], class_names: Sequence[str] = ()
) -> None:
    """Raise :class:`FedadError` for a partition the federated run cannot use.

    Every setting was checked before the data was read (:func:`fedad.run.validate.validate`);
    what depends on the partition is checked here: empty sites, and
    ``simulation.min_clients`` against the sites there really are (a natural
    partition makes one per group, whatever ``simulation.num_clients`` says);
    what depends on the data: a targeted attack's ``attack.target_class``.

    Parameters
    ----------
    cfg : DictConfig
        The composed config.
    partitions : Sequence[np.ndarray]
        Row indices per client.
    class_names : Sequence[str]
        The classes of the prepared data.
    """
    n = len(partitions)
    problems = []
    if n < 1:
        problems.append("there are no clients (the partition produced no client)")
    empty = [i for i, rows in enumerate(partitions) if len(rows) == 0]
    if empty:
        problems.append(f"clients {empty} have no training rows; lower simulation.num_clients")
    if not 1 <= int(cfg.simulation.min_clients) <= max(n, 1):
        problems.append(
            f"simulation.min_clients must be between 1 and the {n} clients, got "
            f"{cfg.simulation.min_clients}"
        )
    target = OmegaConf.select(cfg, "attack.target_class", default=None)
    if target is not None and class_names and str(target) not in list(class_names)[1:]:
        problems.append(
            f"attack.target_class={target!r} is not an attack class of this data (its classes: "
            f"{', '.join(map(str, list(class_names)[1:]))})"
        )
    if problems:
        raise FedadError("Cannot run the federated simulation: " + "; ".join(problems) + ".")
