"""Experiment tracking: a Hydra callback that logs each finished job as an MLflow run."""

from __future__ import annotations

import atexit
import logging
import math
import os
import time
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd
from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from fedad import rundir
from fedad.config import flatten
from fedad.errors import FedadError

log = logging.getLogger("fedad")

TRACKERS = ("none", "mlflow")
# The experiment of a single run when tracking.experiment is not set (a multirun's is its folder).
DEFAULT_EXPERIMENT = "fedad"
# Under the launch folder when no tracking URI is given: SQLite, so nothing has to be started.
STORE_DIR = "mlruns"
SQLITE = "sqlite:///"
# The run folder's files logged as artifacts: its tables, figures, results and settings.
ARTIFACT_SUFFIXES = (".csv", ".md", ".png", ".json", ".yaml")
# History columns that are not metrics of a round.
NOT_METRICS = ("round", "started_at")
# The tag that ties an MLflow run to its run folder (a relaunched sweep logs a job once).
RUN_DIR_TAG = "fedad.run_dir"
# MLflow's limits: values of a param, and entries of one logging request.
PARAM_CHARS = 6000
BATCH = 100


def check_config(tracking: Mapping) -> list[str]:
    """What is wrong with the ``tracking`` settings; raise when MLflow is asked for but missing.

    Parameters
    ----------
    tracking : Mapping
        A ``conf/tracking/*.yaml`` config.

    Returns
    -------
    list[str]
        One phrase per problem, naming the key.

    Raises
    ------
    FedadError
        ``tracking=mlflow`` without MLflow installed: one paragraph naming the extra.
    """
    name = (tracking or {}).get("name")
    if name not in TRACKERS:
        return [f"tracking.name must be one of {', '.join(TRACKERS)}, got {name!r}"]
    if name == "mlflow":
        try:
            import mlflow  # noqa: F401
        except ImportError:
            raise FedadError(
                "tracking=mlflow needs MLflow, which is not installed here. Install fedad's "
                'mlflow extra (pip install -e ".[mlflow]" in a checkout, or pip install '
                '"fedad[mlflow]"), or run without tracking=mlflow; nothing was read or written.'
            ) from None
    return []


class MlflowTracking(Callback):
    """Log every Hydra job, when it ends, as one run of an MLflow experiment.

    The run gets the flattened config as params, each round of
    ``history.csv`` as metrics with the round as the step, every model's final
    metrics from ``results.json`` (``<model>.<metric>``), and the run folder's
    tables, figures and ``detector/`` as artifacts; its status is FINISHED,
    FAILED or KILLED as ``results.json`` says. A multirun is one experiment.
    A job that exits early (a single run's error) is logged when the process
    ends. An MLflow error is logged as a warning: it never fails a run.
    """

    def __init__(self) -> None:
        self.pending: dict[Path, tuple[DictConfig, float]] = {}
        atexit.register(self._log_pending)

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        """Note the job and its start time, in case it ends without :meth:`on_job_end`."""
        self.pending[run_dir_of(config)] = (config, time.time())

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        """Log the job that just ended."""
        folder = run_dir_of(config)
        _, started = self.pending.pop(folder, (config, time.time()))
        self._log(config, folder, started, job_return.status == JobStatus.FAILED)

    def _log_pending(self) -> None:
        """Log the jobs that ended by leaving the process (a single run's exit with an error)."""
        while self.pending:
            folder, (config, started) = self.pending.popitem()
            self._log(config, folder, started, failed=True)

    def _log(self, config: DictConfig, folder: Path, started: float, failed: bool) -> None:
        try:
            with warnings.catch_warnings():
                # MLflow's SQL store uses SQLAlchemy features that SQLAlchemy 2 deprecates.
                warnings.simplefilter("ignore", DeprecationWarning)
                run_id = log_run(config, folder, started, failed)
        except Exception as error:  # MLflow or its store broke: the run itself is fine
            log.warning(
                "MLflow tracking failed (%s: %s); the run's outputs in %s are complete",
                type(error).__name__,
                error,
                folder,
            )
            return
        if run_id:
            log.info("MLflow run %s logged (%s)", run_id, tracking_uri(config))


def run_dir_of(config: DictConfig) -> Path:
    """The folder a job writes: ``resume=`` when it continues a run, else Hydra's output folder."""
    cwd = Path(config.hydra.runtime.cwd)
    if config.get("resume"):
        return (cwd / str(config.resume)).resolve()
    return Path(config.hydra.runtime.output_dir).resolve()


def tracking_uri(config: DictConfig) -> str:
    """The configured tracking URI, else ``$MLFLOW_TRACKING_URI``, else SQLite under ``mlruns/``."""
    if config.tracking.get("uri"):
        return str(config.tracking.uri)
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return f"{SQLITE}{Path(config.hydra.runtime.cwd) / STORE_DIR / 'mlflow.db'}"


def log_run(config: DictConfig, folder: Path, started: float, failed: bool = False) -> str | None:
    """Log one job's run folder as an MLflow run; return its id (None: logged before).

    Parameters
    ----------
    config : DictConfig
        The job's config, ``hydra`` node included.
    folder : Path
        The job's run folder.
    started : float
        When the job started (seconds since the epoch).
    failed : bool
        The job ended with an exception, whatever ``results.json`` says.

    Returns
    -------
    str or None
    """
    from mlflow import MlflowClient
    from mlflow.entities import Metric, Param

    uri = tracking_uri(config)
    client = MlflowClient(uri)
    experiment = _experiment(client, config, uri)
    if _logged_before(client, experiment, folder):
        return None  # a finished job that a relaunched sweep skipped
    status, error = _status(folder, failed)
    run = client.create_run(
        experiment,
        start_time=int(started * 1000),
        tags={RUN_DIR_TAG: str(folder), **({"fedad.error": error[:5000]} if error else {})},
        run_name=config.hydra.job.get("override_dirname") or folder.name,
    )
    run_id = run.info.run_id
    job = OmegaConf.create({k: config[k] for k in config if k != "hydra"})
    params = [Param(k, str(v)[:PARAM_CHARS]) for k, v in flatten(job).items()]
    metrics = [Metric(k, v, stamp, step) for k, v, stamp, step in _metrics(folder, started)]
    for i in range(0, max(len(params), len(metrics)), BATCH):
        client.log_batch(run_id, metrics=metrics[i : i + BATCH], params=params[i : i + BATCH])
    for path in sorted(folder.iterdir()) if folder.is_dir() else []:
        if path.is_file() and path.suffix in ARTIFACT_SUFFIXES:
            client.log_artifact(run_id, str(path))
    if (folder / rundir.DETECTOR_DIR).is_dir():
        client.log_artifacts(run_id, str(folder / rundir.DETECTOR_DIR), rundir.DETECTOR_DIR)
    client.set_terminated(run_id, status)
    return run_id


def _experiment(client, config: DictConfig, uri: str) -> str:
    """The id of the job's experiment, created if new (a SQLite store's artifacts beside it)."""
    name = config.tracking.get("experiment")
    if not name:
        sweeping = config.hydra.mode == RunMode.MULTIRUN
        name = str(config.hydra.sweep.dir) if sweeping else DEFAULT_EXPERIMENT
    found = client.get_experiment_by_name(str(name))
    if found is not None:
        return found.experiment_id
    location = None
    if uri.startswith(SQLITE):  # a file store: its artifacts beside the database file
        database = Path(config.hydra.runtime.cwd) / uri.removeprefix(SQLITE)
        location = str(database.parent / "artifacts")
    try:
        return client.create_experiment(str(name), artifact_location=location)
    except Exception:  # another process created it in between
        found = client.get_experiment_by_name(str(name))
        if found is None:
            raise
        return found.experiment_id


def _logged_before(client, experiment: str, folder: Path) -> bool:
    if "'" in str(folder):  # cannot be quoted in a search filter; log it again
        return False
    return bool(
        client.search_runs(
            [experiment],
            filter_string=f"tags.`{RUN_DIR_TAG}` = '{folder}' and attributes.status = 'FINISHED'",
            max_results=1,
        )
    )


def _status(folder: Path, failed: bool) -> tuple[str, str | None]:
    """MLflow's status of the job in ``folder`` and the reason it did not finish."""
    results = _read(folder / rundir.RESULTS_FILE) or _read(folder / rundir.FAILED_FILE) or {}
    error = results.get("error")
    if results.get("status") == rundir.DONE and not failed:
        return "FINISHED", None
    if str(error or "").startswith("interrupted"):
        return "KILLED", error
    return "FAILED", error or "the job stopped with an error; its log says why"


def _metrics(folder: Path, started: float) -> list[tuple[str, float, int, int]]:
    """``(key, value, timestamp ms, step)``: each round's history, then every final metric."""
    found = []
    history = folder / rundir.HISTORY_FILE
    if history.is_file():
        for row in pd.read_csv(history).to_dict(orient="records"):
            stamp = int(1000 * (row["started_at"] if _number(row.get("started_at")) else started))
            for key, value in row.items():
                if key not in NOT_METRICS and _number(value):
                    found.append((f"round.{key}", float(value), stamp, int(row["round"])))
    results = _read(folder / rundir.RESULTS_FILE) or {}
    now = int(1000 * time.time())
    for model, values in (results.get("models") or {}).items():
        found += [(f"{model}.{k}", float(v), now, 0) for k, v in values.items() if _number(v)]
    found += [(k, float(v), now, 0) for k, v in results.items() if _number(v)]
    return found


def _number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _read(path: Path) -> dict | None:
    try:
        return rundir.read_object(path)
    except (OSError, ValueError):
        return None
