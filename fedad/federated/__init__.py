"""Federated training of one detector across simulated IoT sites with Flower."""

from __future__ import annotations

import os

# Read by Flower and TensorFlow at import time, and inherited by the Ray actors
# started from this process, so they are set before anything imports them.
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
os.environ.setdefault("TF_FORCE_GPU_ALLOW_GROWTH", "true")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import json  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from collections.abc import Mapping, Sequence  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402

from fedad.data.prepared import PreparedData  # noqa: E402
from fedad.errors import FedadError  # noqa: E402
from fedad.federated import checkpoint, scaling, shards  # noqa: E402
from fedad.federated.client_app import FAILURE_MODES, client_app  # noqa: E402
from fedad.federated.server_app import (  # noqa: E402
    CLIENTS_FILE,
    HISTORY_FILE,
    MODEL_FILE,
    SCALING_FILE,
    server_app,
)
from fedad.federated.strategies import build_strategy  # noqa: E402
from fedad.metrics import compute_metrics  # noqa: E402
from fedad.models import MODEL_NAMES, OPTIMIZERS  # noqa: E402

__all__ = ["FederatedResult", "make_settings", "prepare_sites", "run_federated", "validate"]

SCALINGS = ("federated", "local")


@dataclass
class FederatedResult:
    """What a federated run produced.

    Attributes
    ----------
    metrics : dict
        :func:`fedad.metrics.compute_metrics` of the final global model on the
        global test set.
    scores : np.ndarray
        The final global model's test probabilities ``(n_test, n_classes)``.
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
    model_path : Path
        The saved global model (``.keras``); its inputs are standardized with
        ``mean``/``std`` from ``scaling.npz`` in the same folder.
    train_seconds : float
        Wall time of the whole simulation, Ray and actor start-up included.
    """

    metrics: dict
    scores: np.ndarray
    history: pd.DataFrame
    clients: pd.DataFrame
    model_path: Path
    train_seconds: float


def run_federated(
    cfg: DictConfig,
    data: PreparedData,
    partitions: Sequence[np.ndarray],
    run_dir: Path,
    resume: bool = False,
) -> FederatedResult:
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
        Output folder: ``shards/`` (one file per site, read only by that
        site, plus ``access.log``), ``history.csv``, ``clients.csv``,
        ``global_model.keras``, ``scaling.npz`` and ``checkpoint/`` (see
        :mod:`fedad.federated.checkpoint`).
    resume : bool
        Continue from the checkpoint in ``run_dir`` (after its last complete
        round, up to ``simulation.num_rounds``) instead of starting over; a
        fresh run deletes any checkpoint there.

    Returns
    -------
    FederatedResult

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
    sim = cfg.simulation
    resources = OmegaConf.to_container(sim.client_resources, resolve=True) or {}
    stop = threading.Event()
    start = time.perf_counter()
    engine.simulate(
        server_app(settings, stop),
        client_app(settings),
        len(partitions),
        client_resources=resources,
        ray_init_args=OmegaConf.to_container(sim.ray_init_args, resolve=True) or {},
        address=sim.get("address"),
        stop=stop,
    )
    train_seconds = time.perf_counter() - start

    model = keras.models.load_model(run_dir / MODEL_FILE, compile=False)
    with np.load(run_dir / SCALING_FILE) as stats:
        X_test = scaling.standardize(data.X_test, stats["mean"], stats["std"])
    scores = model.predict(X_test, batch_size=4096, verbose=0)
    return FederatedResult(
        metrics=compute_metrics(data.y_test, scores, data.class_names),
        scores=scores,
        history=pd.read_csv(run_dir / HISTORY_FILE),
        clients=pd.read_csv(run_dir / CLIENTS_FILE),
        model_path=run_dir / MODEL_FILE,
        train_seconds=train_seconds,
    )


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
    validate(cfg, partitions)
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    fingerprint = {
        "config": checkpoint.config_fingerprint(cfg),
        "data": checkpoint.data_fingerprint(data, partitions),
    }
    if resume:
        meta = checkpoint.read_meta(run_dir)
        if meta is None:
            raise FedadError(f"Cannot resume: {run_dir} holds no checkpoint.")
        checkpoint.require_compatible(meta, cfg, fingerprint["data"], run_dir)
    else:
        checkpoint.clear(run_dir)
    shards.write_shards(data, partitions, run_dir)
    settings = make_settings(cfg, data, len(partitions), run_dir)
    settings["resume"] = resume
    settings["fingerprint"] = json.dumps(fingerprint)
    return settings


def validate(cfg: DictConfig, partitions: Sequence[np.ndarray]) -> None:
    """Raise :class:`FedadError` for settings a federated run cannot use.

    Parameters
    ----------
    cfg : DictConfig
        The composed config.
    partitions : Sequence[np.ndarray]
        Row indices per client.
    """
    sim = cfg.simulation
    n = len(partitions)
    problems = []
    if n < 1:
        problems.append("there are no clients (the partition produced no client)")
    empty = [i for i, rows in enumerate(partitions) if len(rows) == 0]
    if empty:
        problems.append(f"clients {empty} have no training rows; lower simulation.num_clients")
    if int(sim.num_rounds) < 1:
        problems.append(f"simulation.num_rounds must be at least 1, got {sim.num_rounds}")
    for key in ("fraction_train", "fraction_evaluate"):
        if not 0.0 < float(sim[key]) <= 1.0:
            problems.append(f"simulation.{key} must be in (0, 1], got {sim[key]}")
    if not 1 <= int(sim.min_clients) <= max(n, 1):
        problems.append(
            f"simulation.min_clients must be between 1 and the {n} clients, got {sim.min_clients}"
        )
    if not 0.0 <= float(sim.client_failure_rate) < 1.0:
        problems.append(
            f"simulation.client_failure_rate must be in [0, 1), got {sim.client_failure_rate}"
        )
    if sim.scaling not in SCALINGS:
        problems.append(f"simulation.scaling must be one of {', '.join(SCALINGS)}")
    if sim.failure_mode not in FAILURE_MODES:
        problems.append(f"simulation.failure_mode must be one of {', '.join(FAILURE_MODES)}")
    if not float(sim.round_timeout) > 0:
        problems.append(f"simulation.round_timeout must be positive, got {sim.round_timeout}")
    if int(sim.checkpoint_every) < 0:
        problems.append(
            f"simulation.checkpoint_every must be 0 (never) or more, got {sim.checkpoint_every}"
        )
    if cfg.model.name not in MODEL_NAMES:
        problems.append(f"model must be one of {', '.join(MODEL_NAMES)}, got '{cfg.model.name}'")
    if cfg.train.optimizer not in OPTIMIZERS:
        problems.append(f"train.optimizer must be one of {', '.join(OPTIMIZERS)}")
    if problems:
        raise FedadError("Cannot run the federated simulation: " + "; ".join(problems) + ".")
    # Builds (and throws away) the strategy so a bad name or parameter fails before Ray starts.
    build_strategy(
        OmegaConf.to_container(cfg.strategy, resolve=True),
        float(sim.fraction_train),
        float(sim.fraction_evaluate),
        int(sim.min_clients),
    )


def make_settings(
    cfg: DictConfig, data: PreparedData, num_clients: int, run_dir: Path
) -> dict[str, bool | int | float | str]:
    """Flatten what the apps need into a Flower-style run config.

    Parameters
    ----------
    cfg : DictConfig
        The composed config.
    data : PreparedData
        For the feature count and class names.
    num_clients : int
        Number of sites.
    run_dir : Path
        Where the shards are and the outputs go.

    Returns
    -------
    dict
        Scalar values only, with dotted keys (``model.filters``,
        ``train.batch_size``, ``strategy.proximal_mu``,
        ``simulation.num_rounds``), as ``flwr run`` flattens a
        ``[tool.flwr.app.config]`` table, so the same apps can be deployed.
    """
    settings: dict[str, bool | int | float | str] = {
        "run-dir": str(Path(run_dir).resolve()),
        "seed": int(cfg.seed),
        "num-clients": num_clients,
        "num-features": int(data.n_features),
        "class-names": json.dumps([str(c) for c in data.class_names]),
        "client-threads": max(1, int(cfg.simulation.client_resources.get("num_cpus", 1))),
    }
    for group in ("model", "train", "strategy", "simulation"):
        settings.update(_scalars(group, OmegaConf.to_container(cfg[group], resolve=True)))
    return settings


def _scalars(prefix: str, values: Mapping) -> dict[str, bool | int | float | str]:
    return {
        f"{prefix}.{k}": v for k, v in values.items() if isinstance(v, bool | int | float | str)
    }
