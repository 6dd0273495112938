"""A run folder: its file names, the one atomic writer, and the run's status."""

from __future__ import annotations

import json
import os
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
CHECKPOINT_DIR = "checkpoint"
CHECKPOINT_META = "meta.json"
SHARD_DIR = "shards"
# The deployable detector (the artifact issue); tracking logs it where a run has one.
DETECTOR_DIR = "detector"
# Hydra's record of the command line of a job (in a multirun: what the sweep set).
OVERRIDES_FILE = Path(".hydra") / "overrides.yaml"

RUNNING, DONE, FAILED = "running", "done", "failed"


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


def status(run_dir: str | Path) -> str | None:
    """The ``status`` in ``results.json``: running, done or failed; None if absent or unreadable."""
    try:
        results = read_json(Path(run_dir) / RESULTS_FILE)
    except (OSError, ValueError):
        return None
    return results.get("status") if isinstance(results, dict) else None


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
        results = read_json(run_dir / RESULTS_FILE)
    except (OSError, ValueError):
        return
    if isinstance(results, dict):
        save_results(run_dir, {**results, "status": FAILED, "error": error})


def _jsonable(value: object) -> object:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    return str(value)
