"""Checkpoints of a federated run: global model, strategy state and history, written atomically."""

from __future__ import annotations

import hashlib
import json
import shutil
import time
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fedad import __version__, rundir
from fedad.data.prepared import PreparedData
from fedad.errors import FedadError

if TYPE_CHECKING:
    from flwr.serverapp.strategy import Strategy

    from fedad.federated.stopping import EarlyStopping

META_KEYS = ("round", "state_file", "num_arrays", "strategy_state", "fingerprint", "history")

# Strategy attributes that carry over from round to round, by strategy class name: the
# server optimizer's moments, FedAvgM's momentum and SCAFFOLD's control variate. Everything
# else a strategy keeps is configuration, or rebuilt from the global model each round. Read
# by name (tests/test_flower_contracts.py checks Flower still has them; fedad's own Scaffold,
# tests/test_scaffold.py), so a rename fails loudly.
STATE_ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "FedAdam": ("m_t", "v_t"),
    "FedYogi": ("m_t", "v_t"),
    "FedAdagrad": ("m_t", "v_t"),
    "FedAvgM": ("momentum_vector",),
    "Scaffold": ("control",),
}


@dataclass
class Checkpoint:
    """The state of a federated run after its round ``round``.

    Attributes
    ----------
    round : int
        Rounds completed (0: the initial model, evaluated).
    arrays : list[np.ndarray]
        The global model's weights.
    strategy_state : dict
        :data:`STATE_ATTRIBUTES` the strategy has set, as ``{name: dict or list of arrays}``.
    history : list[dict]
        One row per round ``0 .. round``, as ``history.csv`` has them.
    fingerprint : dict
        ``content`` (the settings that decide what the run computes, see
        :func:`fedad.run.resume.content`) and ``data`` (see :func:`data_fingerprint`)
        of the run that wrote it.
    stopping : dict or None
        Federated early stopping's state after ``round``
        (:meth:`~fedad.federated.stopping.EarlyStopping.state`); None when it is off.
    best_arrays : list[np.ndarray] or None
        The global model of its best round (stored apart only when that is
        not ``round``); None when it is off or no round was measured yet.
    """

    round: int
    arrays: list[np.ndarray]
    strategy_state: dict
    history: list[dict]
    fingerprint: dict
    stopping: dict | None = None
    best_arrays: list[np.ndarray] | None = None


def save(run_dir: str | Path, checkpoint: Checkpoint) -> Path:
    """Write ``checkpoint`` under ``run_dir/checkpoint`` so that no crash leaves half of it.

    The arrays go to a new ``state-<round>.npz``, then ``meta.json`` is replaced
    to point to it; each file is written to a temporary name, flushed to disk and
    renamed. A crash at any moment leaves ``meta.json`` naming a complete state
    file, of this round or of the previous checkpoint.

    Parameters
    ----------
    run_dir : str or Path
        The run's output folder.
    checkpoint : Checkpoint
        What to save.

    Returns
    -------
    Path
        The ``meta.json`` written.
    """
    folder = Path(run_dir) / rundir.CHECKPOINT_DIR
    folder.mkdir(parents=True, exist_ok=True)
    state_name = f"state-{checkpoint.round:05d}.npz"
    arrays: dict[str, Any] = {f"model.{i}": a for i, a in enumerate(checkpoint.arrays)}
    kinds = {}
    for name, value in checkpoint.strategy_state.items():
        kinds[name] = "dict" if isinstance(value, Mapping) else "list"
        items = value.items() if isinstance(value, Mapping) else enumerate(value)
        arrays.update({f"strategy.{name}.{key}": np.asarray(a) for key, a in items})
    stopping = None
    if checkpoint.stopping is not None:
        # The best round's model, unless it is this round's (then it is stored once).
        best = checkpoint.best_arrays
        apart = best is not None and checkpoint.stopping.get("best_round") != checkpoint.round
        stopping = {**checkpoint.stopping, "num_best": len(best) if apart and best else 0}
        arrays.update({f"best.{i}": a for i, a in enumerate(best or []) if apart})
    with rundir.atomic(folder / state_name) as f:
        np.savez(f, **arrays)
    meta = {
        "round": checkpoint.round,
        "state_file": state_name,
        "num_arrays": len(checkpoint.arrays),
        "strategy_state": kinds,
        "fingerprint": checkpoint.fingerprint,
        "history": checkpoint.history,
        **({"stopping": stopping} if stopping is not None else {}),
        "saved": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "fedad": __version__,
    }
    rundir.write_text(folder / rundir.CHECKPOINT_META, json.dumps(meta, indent=1))
    # The renames reach the disk before the old state file is deleted.
    rundir.sync_folder(folder)
    for old in folder.iterdir():
        if old.name not in (rundir.CHECKPOINT_META, state_name):
            old.unlink()
    return folder / rundir.CHECKPOINT_META


def read_meta(run_dir: str | Path) -> dict | None:
    """Return the checkpoint's ``meta.json`` content, or None if ``run_dir`` has no checkpoint.

    Raises
    ------
    FedadError
        If the file is not a checkpoint's ``meta.json`` (changed by hand, or
        written by something else); the checkpoint is left as it is.
    """
    path = Path(run_dir) / rundir.CHECKPOINT_DIR / rundir.CHECKPOINT_META
    if not path.exists():
        return None
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise _damaged(path, error) from None
    missing = [k for k in META_KEYS if k not in meta] if isinstance(meta, dict) else META_KEYS
    if missing:
        raise _damaged(path, f"it lacks {', '.join(missing)}")
    return meta


def load(run_dir: str | Path) -> Checkpoint | None:
    """Read the checkpoint under ``run_dir``; None if there is none.

    Parameters
    ----------
    run_dir : str or Path
        The run's output folder.

    Returns
    -------
    Checkpoint or None

    Raises
    ------
    FedadError
        If a checkpoint file is damaged.
    """
    meta = read_meta(run_dir)
    if meta is None:
        return None
    path = Path(run_dir) / rundir.CHECKPOINT_DIR / meta["state_file"]
    try:
        with np.load(path) as npz:
            stored = {key: npz[key] for key in npz.files}
        arrays = [stored[f"model.{i}"] for i in range(meta["num_arrays"])]
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as error:
        raise _damaged(path, error) from None
    state: dict = {}
    for name, kind in meta["strategy_state"].items():
        prefix = f"strategy.{name}."
        items = {k.removeprefix(prefix): v for k, v in stored.items() if k.startswith(prefix)}
        state[name] = items if kind == "dict" else [items[str(i)] for i in range(len(items))]
    stopping = meta.get("stopping")
    best = None
    if stopping is not None and stopping.get("best_round") is not None:
        count = int(stopping.get("num_best", 0))
        best = [stored[f"best.{i}"] for i in range(count)] if count else arrays
    return Checkpoint(
        meta["round"], arrays, state, meta["history"], meta["fingerprint"], stopping, best
    )


def stopped_early(meta: Mapping) -> bool:
    """Whether the checkpoint's run was ended by federated early stopping.

    Such a run trains no further whatever ``simulation.num_rounds`` says:
    resumed, it only finishes again with its best round's model.

    Parameters
    ----------
    meta : Mapping
        A checkpoint's :func:`read_meta`.
    """
    return bool((meta.get("stopping") or {}).get("stopped", False))


def clear(run_dir: str | Path) -> None:
    """Remove the checkpoint under ``run_dir``: a fresh run must not look resumable."""
    shutil.rmtree(Path(run_dir) / rundir.CHECKPOINT_DIR, ignore_errors=True)


def strategy_state(strategy: Strategy) -> dict:
    """Return copies of the :data:`STATE_ATTRIBUTES` of ``strategy`` that are set.

    Parameters
    ----------
    strategy : Strategy
        A Flower strategy after some rounds.

    Returns
    -------
    dict
        ``{name: {key: array}}`` for dicts (FedOpt's ``m_t``, ``v_t``) and
        ``{name: [array, ...]}`` for lists (FedAvgM's ``momentum_vector``);
        empty for a strategy that keeps nothing between rounds.
    """
    state: dict = {}
    for name in STATE_ATTRIBUTES.get(type(strategy).__name__, ()):
        value = getattr(strategy, name)
        if isinstance(value, Mapping):
            state[name] = {k: np.array(v, copy=True) for k, v in value.items()}
        elif value is not None:
            state[name] = [np.array(v, copy=True) for v in value]
    return state


def restore_strategy_state(strategy: Strategy, state: Mapping) -> None:
    """Set the attributes :func:`strategy_state` returned on a freshly built ``strategy``.

    Raises
    ------
    FedadError
        If ``strategy`` has no such attribute (the checkpoint is of another strategy).
    """
    for name, value in state.items():
        if not hasattr(strategy, name):
            raise FedadError(
                f"The checkpoint holds '{name}', which strategy {type(strategy).__name__} "
                "does not have: it was written by another strategy."
            )
        setattr(strategy, name, dict(value) if isinstance(value, Mapping) else list(value))


def data_fingerprint(data: PreparedData, partitions: Sequence[np.ndarray]) -> str:
    """Hash the train and test arrays and each client's row indices.

    Data preparation and partitioning are deterministic, so a resumed run
    recomputes them; this hash shows they came out the same (and that no data
    file changed on disk in between).
    """
    digest = hashlib.blake2b(digest_size=16)
    arrays = [data.X_train, data.y_train, data.X_test, data.y_test]
    arrays += [np.asarray(p, dtype=np.int64) for p in partitions]
    for a in arrays:
        a = np.ascontiguousarray(a)
        digest.update(f"{a.dtype.str}{a.shape}".encode())
        # numpy's stubs declare ndarray.__buffer__ for Python >= 3.12 only.
        digest.update(memoryview(a).cast("B"))  # type: ignore[arg-type]
    return digest.hexdigest()


def require_same_data(meta: Mapping, data: str, where: str | Path) -> None:
    """Raise :class:`FedadError` unless ``data`` is the checkpoint's :func:`data_fingerprint`.

    Parameters
    ----------
    meta : Mapping
        The checkpoint's :func:`read_meta`.
    data : str
        :func:`data_fingerprint` of the data prepared for the continued run.
    where : str or Path
        The run folder, for the message.
    """
    if data != meta["fingerprint"].get("data"):
        raise FedadError(
            f"Cannot resume the run in {where}: the prepared data or the partition differ from "
            "the checkpoint's although the settings are the same; did the data files change "
            "on disk? Start a new run instead."
        )


class Checkpointer:
    """Take the run's state after each round; save it every ``every`` rounds and after the last.

    The state of the latest complete round stays in memory, so that a run
    stopping early (too few replies, Ctrl-C, an error) can still save it with
    :meth:`flush`, whatever ``every`` is.

    Parameters
    ----------
    run_dir : str or Path
        The run's output folder.
    every : int
        Save after rounds that are multiples of it (round 0 included); 0 never saves.
    last_round : int
        The run's final round, always saved.
    fingerprint : dict
        Stored with each checkpoint (see :attr:`Checkpoint.fingerprint`).
    strategy : Strategy
        Whose :func:`strategy_state` is taken.
    saved_round : int, optional
        The round already on disk (a resumed run's checkpoint).
    """

    def __init__(
        self,
        run_dir: str | Path,
        every: int,
        last_round: int,
        fingerprint: dict,
        strategy: Strategy,
        saved_round: int | None = None,
    ) -> None:
        self.run_dir = Path(run_dir)
        self.every = every
        self.last_round = last_round
        self.fingerprint = fingerprint
        self.strategy = strategy
        self.saved_round = saved_round
        self.latest: Checkpoint | None = None

    def round_done(
        self,
        server_round: int,
        arrays: list[np.ndarray],
        history: list[dict],
        stopping: EarlyStopping | None = None,
        state: dict | None = None,
    ) -> None:
        """Take the state after ``server_round``; save it if it is due.

        ``stopping`` is federated early stopping as that round left it (its
        state and best arrays go into the checkpoint), None when it is off.
        ``state`` is :func:`strategy_state` as that round left it, taken now
        when None: a caller that checkpoints a round while the next one runs
        must take it before the next aggregation changes it.
        """
        self.latest = Checkpoint(
            server_round,
            arrays,
            strategy_state(self.strategy) if state is None else state,
            [dict(row) for row in history],
            self.fingerprint,
            stopping.state() if stopping is not None else None,
            stopping.best_arrays if stopping is not None else None,
        )
        if self.every and (server_round % self.every == 0 or server_round == self.last_round):
            self.flush()

    def flush(self) -> int | None:
        """Save the latest complete round unless it is on disk; return the round on disk."""
        if self.every and self.latest is not None and self.latest.round != self.saved_round:
            save(self.run_dir, self.latest)
            self.saved_round = self.latest.round
        return self.saved_round


def _damaged(path: Path, why: object) -> FedadError:
    return FedadError(
        f"The checkpoint file {path} is damaged ({why}), so the run in {path.parent.parent} "
        "cannot be resumed; the folder is left as it is. Start the run again in another folder."
    )
