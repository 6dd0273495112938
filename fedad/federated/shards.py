"""Per-site data shards on disk, so each simulated client reads only its own rows."""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np

from fedad.data.prepared import PreparedData
from fedad.rundir import SHARD_DIR

ACCESS_LOG = "access.log"
# The two arrays of a shard folder, each a .npy file that readers memory-map.
ARRAYS = ("X", "y")


class Access(NamedTuple):
    """One line of the access log: who read which shard, on which Ray node ("" outside Ray)."""

    reader: str
    shard: str
    node: str


def site_reader(partition_id: int) -> str:
    """How site ``partition_id`` names itself in the access log (``client_0003``)."""
    return f"client_{partition_id:04d}"


def shard_path(run_dir: str | Path, partition_id: int) -> Path:
    """Return the shard folder of client ``partition_id`` under ``run_dir``."""
    return Path(run_dir) / SHARD_DIR / site_reader(partition_id)


def test_path(run_dir: str | Path) -> Path:
    """Return the folder holding the global test set under ``run_dir``."""
    return Path(run_dir) / SHARD_DIR / "test"


def write_shards(data: PreparedData, partitions: Sequence[np.ndarray], run_dir: Path) -> Path:
    """Write one ``X``/``y`` shard per client and the global test set.

    Parameters
    ----------
    data : PreparedData
        Unscaled arrays; scaling happens at the sites.
    partitions : Sequence[np.ndarray]
        Row indices into ``data.X_train`` for each client.
    run_dir : Path
        Run folder; each shard is a folder under ``run_dir/shards`` holding
        ``X.npy`` and ``y.npy``.

    Returns
    -------
    Path
        The shard folder. Any access log from an earlier run there is removed.
    """
    folder = Path(run_dir) / SHARD_DIR
    folder.mkdir(parents=True, exist_ok=True)
    (folder / ACCESS_LOG).unlink(missing_ok=True)
    for pid, rows in enumerate(partitions):
        rows = np.asarray(rows, dtype=np.int64)
        _save(shard_path(run_dir, pid), data.X_train[rows], data.y_train[rows])
    _save(test_path(run_dir), data.X_test, data.y_test)
    return folder


def _save(folder: Path, X: np.ndarray, y: np.ndarray) -> None:
    folder.mkdir(exist_ok=True)
    for name, values in zip(ARRAYS, (X, y), strict=True):
        # Renamed into place, never rewritten: a reader still mapping an earlier run's file
        # keeps its own copy instead of a truncated one. Not fsynced: a run rewrites its shards.
        temporary = folder / f"{name}.npy.tmp"
        with open(temporary, "wb") as file:
            np.save(file, values)
        os.replace(temporary, folder / f"{name}.npy")


def read_shard(path: Path, reader: str) -> tuple[np.ndarray, np.ndarray]:
    """Map ``X`` and ``y`` of the shard at ``path`` and note who read it in the access log.

    Parameters
    ----------
    path : Path
        A folder from :func:`shard_path` or :func:`test_path`.
    reader : str
        Who reads it (``client_0003``, ``server``); the log line makes data
        locality auditable, and names the Ray node when read inside Ray.

    Returns
    -------
    X, y : np.ndarray
        Read-only views of the memory-mapped files: pages are read from disk
        when used, so a process holds only the rows it touches.
    """
    path = Path(path)
    X, y = (np.asarray(np.load(path / f"{name}.npy", mmap_mode="r")) for name in ARRAYS)
    # One short O_APPEND write per line, so concurrent actors do not interleave.
    with open(path.parent / ACCESS_LOG, "a") as log:
        log.write(f"{reader}\t{path.name}\t{_ray_node()}\n")
    return X, y


def _ray_node() -> str:
    """The id of the Ray node this process runs on, or "" outside Ray.

    Read only when the simulation has imported Ray: fedad needs Ray for nothing else.
    """
    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        return ""
    return ray.get_runtime_context().get_node_id()


def read_access_log(run_dir: str | Path) -> list[Access]:
    """Return every shard read in the run, in order."""
    path = Path(run_dir) / SHARD_DIR / ACCESS_LOG
    if not path.exists():
        return []
    return [Access(*line.split("\t")) for line in path.read_text().splitlines()]
