"""Per-site data shards on disk, so each simulated client reads only its own rows."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from fedad.data.prepared import PreparedData
from fedad.rundir import SHARD_DIR

ACCESS_LOG = "access.log"


def site_reader(partition_id: int) -> str:
    """How site ``partition_id`` names itself in the access log (``client_0003``)."""
    return f"client_{partition_id:04d}"


def shard_path(run_dir: str | Path, partition_id: int) -> Path:
    """Return the shard file of client ``partition_id`` under ``run_dir``."""
    return Path(run_dir) / SHARD_DIR / f"{site_reader(partition_id)}.npz"


def test_path(run_dir: str | Path) -> Path:
    """Return the file holding the global test set under ``run_dir``."""
    return Path(run_dir) / SHARD_DIR / "test.npz"


def write_shards(data: PreparedData, partitions: Sequence[np.ndarray], run_dir: Path) -> Path:
    """Write one ``X``/``y`` shard per client and the global test set.

    Parameters
    ----------
    data : PreparedData
        Unscaled arrays; scaling happens at the sites.
    partitions : Sequence[np.ndarray]
        Row indices into ``data.X_train`` for each client.
    run_dir : Path
        Run folder; files go to ``run_dir/shards``.

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
        np.savez(shard_path(run_dir, pid), X=data.X_train[rows], y=data.y_train[rows])
    np.savez(test_path(run_dir), X=data.X_test, y=data.y_test)
    return folder


def read_shard(path: Path, reader: str) -> tuple[np.ndarray, np.ndarray]:
    """Load ``X`` and ``y`` from ``path`` and note who read it in the access log.

    Parameters
    ----------
    path : Path
        A file from :func:`shard_path` or :func:`test_path`.
    reader : str
        Who reads it (``client_0003``, ``server``); the log line makes data
        locality auditable.

    Returns
    -------
    X, y : np.ndarray
    """
    path = Path(path)
    with np.load(path) as npz:
        X, y = npz["X"], npz["y"]
    # One short O_APPEND write per line, so concurrent actors do not interleave.
    with open(path.parent / ACCESS_LOG, "a") as log:
        log.write(f"{reader}\t{path.name}\n")
    return X, y


def read_access_log(run_dir: str | Path) -> list[tuple[str, str]]:
    """Return ``(reader, file name)`` for every shard read in the run, in order."""
    path = Path(run_dir) / SHARD_DIR / ACCESS_LOG
    if not path.exists():
        return []
    return [tuple(line.split("\t")) for line in path.read_text().splitlines()]
