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
# The fairness audit of the sites (fedad/evaluation/fairness.py), from clients.csv.
SITES_FILE = "sites.md"
PARTITION_CSV = "partition.csv"
PARTITION_PNG = "partition.png"
COMPARISON_CSV = "comparison.csv"
COMPARISON_MD = "comparison.md"
# A federation of sources (dataset.federate): every detector on each source's test rows, and the
# per-row predictions it is computed from (fedad/evaluation/cross_source.py).
CROSS_SOURCE_CSV = "cross_source.csv"
CROSS_SOURCE_PREDICTIONS = "cross_source_predictions.csv"
ROC_PNG = "roc.png"
IMPORTANCE_PNG = "importance.png"
EDA_PNG = "eda.png"
MODEL_FILE = "global_model.keras"
SCALING_FILE = "scaling.npz"
# The federated autoencoder's threshold; the federated booster's model.
THRESHOLD_FILE = "threshold.json"
BOOSTER_FILE = "global_model.json"
# A histogram run's bin edges and pooled class counts (strategy=fedxgb_histogram).
PINNING_FILE = "histogram_pins.npz"
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
def atomic(path: str | Path, mode: str = "wb", overwrite: bool = True) -> Iterator[IO]:
    """Write ``path`` so that no reader or crash ever sees half of it.

    The content goes to a temporary file of its own name beside ``path`` (a
    file named like it is never touched), is flushed to disk and put in place
    in one step; on an error the temporary file is removed and ``path`` is
    left as it was. Without ``overwrite`` the finished file is linked into
    place, so a ``path`` that exists, or appeared meanwhile, is kept
    (FileExistsError).

    Parameters
    ----------
    path : str or Path
        The file to write.
    mode : str
        ``"wb"`` or ``"w"``.
    overwrite : bool
        Whether an existing ``path`` may be replaced.

    Yields
    ------
    file object
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{os.urandom(4).hex()}.tmp")
    try:
        with open(tmp, mode.replace("w", "x")) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        place(tmp, path, overwrite)
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


def write_text(path: str | Path, text: str, overwrite: bool = True) -> Path:
    """Atomically write ``text`` to ``path`` (an existing one replaced only if ``overwrite``)."""
    with atomic(path, "w", overwrite) as f:
        f.write(text)
    return Path(path)


def write_json(path: str | Path, value: Any, overwrite: bool = True) -> Path:
    """Atomically write ``value`` as indented JSON (NumPy values become plain ones)."""
    return write_text(path, json.dumps(value, indent=2, default=_jsonable), overwrite)


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


def same_file(a: str | Path, b: str | Path) -> bool:
    """Whether ``a`` and ``b`` name one file: one path once resolved, or one inode (hard link)."""
    a, b = Path(a), Path(b)
    if a.resolve() == b.resolve():
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist (yet): two names, two files
        return False


def output_problem(out: str | Path, inputs: list[Path], overwrite: bool) -> str | None:
    """Why ``out`` may not be written, as a clause naming the fix; None when it may.

    Checked before any work starts: ``out`` must not be one of ``inputs`` (by
    path, resolved path or hard link), must not be a folder or a device, must
    lie in an existing folder this process can write, and must not exist
    unless ``overwrite``.

    Parameters
    ----------
    out : str or Path
        The file a command is about to write.
    inputs : list[Path]
        The files the command reads.
    overwrite : bool
        Whether an existing ``out`` may be replaced.

    Returns
    -------
    str or None
    """
    out = Path(out)
    for given in inputs:
        if same_file(out, given):
            return (
                f"it is the input {given}, which would be destroyed; give an output path of its "
                "own (the input was left as it is)"
            )
    if out.is_dir():
        return "it is a folder; give a file path"
    folder = out.parent
    if not folder.is_dir():
        return f"there is no folder {folder}; create it first, or give a path in an existing folder"
    if not os.access(folder, os.W_OK | os.X_OK):
        return f"the folder {folder} is not writable; give a path in a folder you can write"
    if out.exists() and not out.is_file():
        return "it is not a regular file (a device, pipe or socket); give a file path"
    if not overwrite and (out.exists() or out.is_symlink()):
        return (
            "it already exists and was left as it is; give --overwrite to replace it, or "
            "another path"
        )
    return None


def write_failure(out: str | Path, err: OSError) -> str:
    """One paragraph for a write to ``out`` that failed (a full disk, a lost folder...)."""
    import errno

    out = Path(out)
    code = errno.errorcode.get(err.errno or 0, "")
    left = "kept its earlier content" if out.exists() else "was not created"
    return (
        f"Writing {out} failed: {err.strerror or err}{f' ({code})' if code else ''}. Nothing was "
        f"replaced: {out} {left}, and no partial file was left. Free space (or fix the folder) "
        "and run the command again."
    )


def place(tmp: str | Path, path: str | Path, overwrite: bool) -> None:
    """Give the finished file ``tmp`` the name ``path`` in one step; replace only if ``overwrite``.

    Raises FileExistsError when ``path`` exists and ``overwrite`` is false;
    ``tmp`` is left for the caller to remove.
    """
    import errno

    tmp, path = Path(tmp), Path(path)
    if overwrite:
        os.replace(tmp, path)
    else:
        try:
            os.link(tmp, path)  # fails on an existing path, where a rename would replace it
        except FileExistsError:
            raise
        except OSError:  # no hard links on this file system: checked, then renamed
            if path.exists():
                raise FileExistsError(errno.EEXIST, "File exists", str(path)) from None
            os.replace(tmp, path)
    sync_folder(path.parent)


def publish(staged: str | Path, folder: str | Path, overwrite: bool) -> list[Path]:
    """Move every file under ``staged`` to the same place under ``folder``, each in one step.

    Each file is flushed to disk before it is renamed into place, so a crash
    leaves every output whole: the earlier one or the new one. Without
    ``overwrite`` an existing file is never replaced (FileExistsError); the
    caller checks for clashes first to refuse before any file moves.

    Parameters
    ----------
    staged : str or Path
        A folder filled with finished files, on the file system of ``folder``.
    folder : str or Path
        Where the files go; subfolders are created as needed.
    overwrite : bool
        Whether existing files may be replaced.

    Returns
    -------
    list[Path]
        The files written, under ``folder``.
    """
    staged, folder = Path(staged), Path(folder)
    written = []
    for file in sorted(p for p in staged.rglob("*") if p.is_file()):
        with open(file, "rb+") as f:
            os.fsync(f.fileno())
        target = folder / file.relative_to(staged)
        target.parent.mkdir(parents=True, exist_ok=True)
        place(file, target, overwrite)
        written.append(target)
    return written
