"""A finished run trained longer: its complete result stays the folder's until the new one is."""

from __future__ import annotations

import shutil
from pathlib import Path

from fedad import rundir

# Where a finished run's result waits while a continuation (more rounds) runs.
KEPT_DIR = "last_complete"
# What a continuation rewrites of what the finished run found: its results, its comparison, its
# trained models and detectors. Plots are left to be redrawn.
OUTPUTS = (
    rundir.RESULTS_FILE,
    rundir.COMPARISON_CSV,
    rundir.COMPARISON_MD,
    rundir.HISTORY_FILE,
    rundir.CLIENTS_FILE,
    rundir.MODEL_FILE,
    rundir.BOOSTER_FILE,
    rundir.THRESHOLD_FILE,
    rundir.SCALING_FILE,
    rundir.DETECTOR_DIR,
)


def keep(run_dir: Path) -> bool:
    """Before a finished run continues, copy its complete result to :data:`KEPT_DIR`.

    Returns
    -------
    bool
        Whether ``run_dir`` held a finished run (and its result was kept).
    """
    if rundir.status(run_dir) != rundir.DONE:
        return False
    with rundir.atomic_folder(run_dir / KEPT_DIR) as kept:
        for name in OUTPUTS:
            _copy(run_dir / name, kept / name)
    return True


def finish(run_dir: Path) -> None:
    """The continuation completed: its result is the folder's; the kept one goes."""
    shutil.rmtree(run_dir / KEPT_DIR, ignore_errors=True)


def fail(run_dir: Path, error: str) -> bool:
    """Record a failed or interrupted run, giving a continuation's folder back its result.

    A continuation that ends before it completes puts the finished run's
    result back in place (each file atomically), notes the failed
    continuation in ``results.json`` under ``continuation`` and writes no
    ``failed.json``: the folder still holds a complete run. Any other run is
    marked failed (:func:`fedad.rundir.mark_failed`).

    Returns
    -------
    bool
        Whether an earlier complete result was restored.
    """
    kept = run_dir / KEPT_DIR
    if not (kept / rundir.RESULTS_FILE).is_file():
        rundir.mark_failed(run_dir, error)
        return False
    for name in OUTPUTS:
        target = run_dir / name
        if (kept / name).exists():
            _copy(kept / name, target)
        elif target.is_dir():
            shutil.rmtree(target)
        else:
            target.unlink(missing_ok=True)
    results = rundir.read_results(run_dir)
    rundir.save_results(
        run_dir, {**results, "continuation": {"status": rundir.FAILED, "error": error}}
    )
    finish(run_dir)
    return True


def _copy(source: Path, target: Path) -> None:
    """Copy a file or folder atomically: ``target`` is the old one or the whole new one."""
    if source.is_dir():
        with rundir.atomic_folder(target) as folder:
            shutil.copytree(source, folder, dirs_exist_ok=True)
    elif source.is_file():
        with rundir.atomic(target) as f:
            f.write(source.read_bytes())
