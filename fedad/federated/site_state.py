"""A site's memory between rounds, also on its own disk so that a resumed run goes on."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, RecordDict

from fedad import rundir
from fedad.federated import shards

# One file per round the site trained in, in its shard folder: the site's own disk.
STATE_FILE = "state-round{:04d}.npz"
_STATE_PATTERN = re.compile(r"state-round(\d{4,})\.npz")


def save(
    run_dir: str | Path,
    partition_id: int,
    server_round: int,
    state: RecordDict,
    checkpoint_every: int,
) -> None:
    """Write the ArrayRecords of ``state`` as this site's state after ``server_round``.

    Keeps the files a resume may need: the rounds a checkpoint may still be
    behind (``checkpoint_every`` of them, the one in progress included) and
    the newest before those. Nothing is written for a state without arrays.

    Parameters
    ----------
    run_dir : str or Path
        The run folder.
    partition_id : int
        The site.
    server_round : int
        The round the site has just trained in.
    state : RecordDict
        Flower's ``context.state`` of the site.
    checkpoint_every : int
        ``simulation.checkpoint_every`` (0: no checkpoint, nothing to resume).
    """
    arrays: dict[str, Any] = {
        f"{name}/{i}": value
        for name, record in state.array_records.items()
        for i, value in enumerate(record.to_numpy_ndarrays())
    }
    if not arrays or checkpoint_every <= 0:
        return
    folder = shards.shard_path(run_dir, partition_id)
    with rundir.atomic(folder / STATE_FILE.format(server_round)) as file:
        np.savez(file, **arrays)
    older = [r for r in _rounds(folder) if r <= server_round - checkpoint_every]
    for old in older[:-1]:
        (folder / STATE_FILE.format(old)).unlink(missing_ok=True)


def restore(run_dir: str | Path, partition_id: int, server_round: int, state: RecordDict) -> None:
    """Fill an empty ``state`` with the site's newest state from before ``server_round``.

    A resumed run continues after its last checkpointed round; a state saved
    in a round after that (the one cut off) is not used.
    """
    folder = shards.shard_path(run_dir, partition_id)
    earlier = [r for r in _rounds(folder) if r < server_round]
    if state.array_records or not earlier:
        return
    with np.load(folder / STATE_FILE.format(earlier[-1])) as saved:
        records: dict[str, list[tuple[int, np.ndarray]]] = {}
        for key in saved.files:
            name, index = key.rsplit("/", 1)
            records.setdefault(name, []).append((int(index), saved[key]))
    for name, values in records.items():
        state[name] = ArrayRecord([value for _, value in sorted(values, key=lambda v: v[0])])


def clear(run_dir: str | Path) -> None:
    """Remove every site's saved state under ``run_dir`` (a fresh run starts from none)."""
    for path in (Path(run_dir) / rundir.SHARD_DIR).glob("*/state-round*.npz"):
        path.unlink()


def _rounds(folder: Path) -> list[int]:
    found = (_STATE_PATTERN.fullmatch(p.name) for p in folder.glob("state-round*.npz"))
    return sorted(int(m.group(1)) for m in found if m)
