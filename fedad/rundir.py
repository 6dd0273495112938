"""A run folder: its file names, the one atomic writer, and the run's status."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import numpy as np

# What a run folder holds. ``fedad.report`` reads only these files, so old runs stay readable.
CONFIG_FILE = "config.yaml"
RESULTS_FILE = "results.json"
FAILED_FILE = "failed.json"
HISTORY_FILE = "history.csv"
CLIENTS_FILE = "clients.csv"
PARTITION_CSV = "partition.csv"
PARTITION_PNG = "partition.png"
COMPARISON_CSV = "comparison.csv"
COMPARISON_MD = "comparison.md"
ROC_PNG = "roc.png"
IMPORTANCE_PNG = "importance.png"
EDA_PNG = "eda.png"
MODEL_FILE = "global_model.keras"
SCALING_FILE = "scaling.npz"
# The federated autoencoder's threshold; the federated booster's model.
THRESHOLD_FILE = "threshold.json"
BOOSTER_FILE = "global_model.json"
CHECKPOINT_DIR = "checkpoint"
CHECKPOINT_META = "meta.json"
SHARD_DIR = "shards"
# One folder per saved detector (the federated model, the best centralized one), each with:
DETECTOR_DIR = "detector"
DETECTOR_MANIFEST = "detector.json"
DETECTOR_PREPROCESSING = "preprocessing.json"
DETECTOR_SCALING = "scaling.npz"
DETECTOR_KERAS = "model.keras"
DETECTOR_SKOPS = "model.skops"
DETECTOR_XGBOOST = "model.xgb.json"
DETECTOR_BOOSTER = "model.booster.json"
# Hydra's record of the command line of a job (in a multirun: what the sweep set).
OVERRIDES_FILE = Path(".hydra") / "overrides.yaml"

RUNNING, DONE, FAILED = "running", "done", "failed"
# A sweep's job whose settings the chosen method cannot serve (fedad.errors.JobSkipped).
SKIPPED = "skipped"


def confusion_png(model: str) -> str:
    """File name of a model's confusion-matrix figure."""
    return f"confusion_{model}.png"


def importance_csv(model: str) -> str:
    """File name of a model's permutation-importance table."""
    return f"importance_{model}.csv"


def shap_csv(model: str) -> str:
    """File name of a model's SHAP table (mean absolute SHAP value per feature)."""
    return f"shap_{model}.csv"


def shap_png(model: str) -> str:
    """File name of a model's SHAP beeswarm figure."""
    return f"shap_{model}.png"


@contextmanager
def atomic(path: str | Path, mode: str = "wb") -> Iterator[IO]:
    """Write ``path`` so that no reader or crash ever sees half of it.

    The content goes to ``<path>.tmp``, is flushed to disk and renamed over
    ``path``; on an error the temporary file is removed and ``path`` is left
    as it was.

    Parameters
    ----------
    path : str or Path
        The file to (re)write.
    mode : str
        ``"wb"`` or ``"w"``.

    Yields
    ------
    file object
    """
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextmanager
def atomic_folder(path: str | Path) -> Iterator[Path]:
    """Fill a folder that appears at ``path`` complete, or not at all.

    The caller writes into the yielded temporary folder beside ``path``; when
    the block ends without an error every file is flushed to disk and the
    folder is renamed to ``path``, replacing an earlier one. On an error the
    temporary folder is removed and ``path`` is left as it was.

    Parameters
    ----------
    path : str or Path
        The folder to (re)create.

    Yields
    ------
    Path
        The temporary folder to write into.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    old = path.with_name(f".{path.name}.old")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        for file in tmp.rglob("*"):
            if file.is_file():
                with open(file, "rb+") as f:
                    os.fsync(f.fileno())
        sync_folder(tmp)
        if path.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
        os.replace(tmp, path)
        sync_folder(path.parent)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_text(path: str | Path, text: str) -> Path:
    """Atomically write ``text`` to ``path``; return ``path``."""
    with atomic(path, "w") as f:
        f.write(text)
    return Path(path)


def write_json(path: str | Path, value: Any) -> Path:
    """Atomically write ``value`` as indented JSON (NumPy values become plain ones)."""
    return write_text(path, json.dumps(value, indent=2, default=_jsonable))


def sync_folder(folder: str | Path) -> None:
    """Flush a folder's entries (new names, renames) to disk."""
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def read_json(path: str | Path) -> Any:
    """The JSON value in ``path``; raises OSError or ValueError when unreadable."""
    return json.loads(Path(path).read_text())


def read_object(path: str | Path) -> dict:
    """The JSON object in ``path`` (UTF-8); OSError or ValueError when absent or not one."""
    value = json.loads(Path(path).read_bytes().decode("utf-8"))
    if not isinstance(value, dict):
        names: dict[type, str] = {list: "list", str: "text"}
        kind = names.get(type(value), type(value).__name__)
        raise ValueError(f"it holds a JSON {kind}, not an object")
    return value


def read_results(run_dir: str | Path) -> dict:
    """The run's ``results.json``: the one reader of it (OSError or ValueError as read_object)."""
    return read_object(Path(run_dir) / RESULTS_FILE)


def status(run_dir: str | Path) -> str | None:
    """The ``status`` in ``results.json``: running, done or failed; None if absent or unreadable."""
    try:
        return read_results(run_dir).get("status")
    except (OSError, ValueError):
        return None


def save_results(run_dir: str | Path, results: dict) -> Path:
    """Atomically write ``results.json``."""
    return write_json(Path(run_dir) / RESULTS_FILE, results)


def mark_failed(run_dir: str | Path, error: str) -> None:
    """Record that the run in ``run_dir`` failed with ``error``.

    ``failed.json`` gets the reason, and ``results.json`` (if the run started
    one) says ``failed`` with the same reason, keeping everything it already
    holds. A finished run that a new attempt refused to overwrite is left as
    it is.
    """
    run_dir = Path(run_dir)
    if status(run_dir) == DONE or not run_dir.is_dir():
        return
    write_json(run_dir / FAILED_FILE, {"status": FAILED, "error": error})
    try:
        results = read_results(run_dir)
    except (OSError, ValueError):
        return
    save_results(run_dir, {**results, "status": FAILED, "error": error})


def mark_skipped(run_dir: str | Path, reason: str, settings: dict | None = None) -> None:
    """Record that a sweep skipped the job in ``run_dir``: ``results.json`` says why.

    A job is skipped, not failed, when its settings are valid but outside what
    the chosen method serves (:class:`fedad.errors.JobSkipped`); ``settings``
    name the job for the report. A finished run is left as it is.
    """
    run_dir = Path(run_dir)
    if status(run_dir) == DONE:
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    save_results(run_dir, {"status": SKIPPED, "error": reason, "settings": settings or {}})


def _jsonable(value: object) -> object:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    return str(value)
