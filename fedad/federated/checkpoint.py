"""Checkpoints of a federated run: global model, strategy state and history, written atomically."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import zipfile
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
from flwr.serverapp.strategy import Strategy
from omegaconf import DictConfig, OmegaConf

from fedad import __version__
from fedad.data.prepared import PreparedData
from fedad.errors import FedadError

CHECKPOINT_DIR = "checkpoint"
META_FILE = "meta.json"
META_KEYS = ("round", "state_file", "num_arrays", "strategy_state", "fingerprint", "history")

# Strategy attributes that carry over from round to round: the server optimizer's
# moments (FedAdam, FedYogi, FedAdagrad) and FedAvgM's momentum. Everything else a
# strategy keeps is either configuration or rebuilt from the global model each round.
STATE_ATTRIBUTES = ("m_t", "v_t", "momentum_vector")

# Settings that change how a run executes, not what it computes: a resumed run may
# change them. min_clients also sets the least sample size, which matters only when
# fraction_train * num_clients is below it.
RUNTIME_KEYS = (
    "resume",
    "data_dir",
    "baselines_cache",
    "simulation.client_resources",
    "simulation.ray_init_args",
    "simulation.address",
    "simulation.checkpoint_every",
    "simulation.round_timeout",
    "simulation.failure_mode",
    "simulation.min_clients",
)
# Settings of the rest of the job: the federated training does not depend on them.
OUTSIDE_FEDERATED_KEYS = ("federated", "baselines", "explain")
# May grow on resume (train longer); checked against the rounds already done.
ROUNDS_KEY = "simulation.num_rounds"


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
        ``config`` (the settings that matter, see :func:`config_fingerprint`) and
        ``data`` (see :func:`data_fingerprint`) of the run that wrote it.
    """

    round: int
    arrays: list[np.ndarray]
    strategy_state: dict
    history: list[dict]
    fingerprint: dict


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
    folder = Path(run_dir) / CHECKPOINT_DIR
    folder.mkdir(parents=True, exist_ok=True)
    state_name = f"state-{checkpoint.round:05d}.npz"
    arrays = {f"model.{i}": a for i, a in enumerate(checkpoint.arrays)}
    kinds = {}
    for name, value in checkpoint.strategy_state.items():
        kinds[name] = "dict" if isinstance(value, Mapping) else "list"
        items = value.items() if isinstance(value, Mapping) else enumerate(value)
        arrays.update({f"strategy.{name}.{key}": np.asarray(a) for key, a in items})
    with _atomic(folder / state_name) as f:
        np.savez(f, **arrays)
    meta = {
        "round": checkpoint.round,
        "state_file": state_name,
        "num_arrays": len(checkpoint.arrays),
        "strategy_state": kinds,
        "fingerprint": checkpoint.fingerprint,
        "history": checkpoint.history,
        "saved": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "fedad": __version__,
    }
    with _atomic(folder / META_FILE) as f:
        f.write(json.dumps(meta, indent=1).encode())
    # The renames reach the disk before the old state file is deleted.
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
    for old in folder.iterdir():
        if old.name not in (META_FILE, state_name):
            old.unlink()
    return folder / META_FILE


def read_meta(run_dir: str | Path) -> dict | None:
    """Return the checkpoint's ``meta.json`` content, or None if ``run_dir`` has no checkpoint.

    Raises
    ------
    FedadError
        If the file is not a checkpoint's ``meta.json`` (changed by hand, or
        written by something else); the checkpoint is left as it is.
    """
    path = Path(run_dir) / CHECKPOINT_DIR / META_FILE
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
    path = Path(run_dir) / CHECKPOINT_DIR / meta["state_file"]
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
    return Checkpoint(meta["round"], arrays, state, meta["history"], meta["fingerprint"])


def clear(run_dir: str | Path) -> None:
    """Remove the checkpoint under ``run_dir``: a fresh run must not look resumable."""
    shutil.rmtree(Path(run_dir) / CHECKPOINT_DIR, ignore_errors=True)


def strategy_state(strategy: Strategy) -> dict:
    """Return copies of the :data:`STATE_ATTRIBUTES` that ``strategy`` has set.

    Parameters
    ----------
    strategy : Strategy
        A Flower strategy after some rounds.

    Returns
    -------
    dict
        ``{name: {key: array}}`` for dicts (FedOpt's ``m_t``, ``v_t``) and
        ``{name: [array, ...]}`` for lists (FedAvgM's ``momentum_vector``).
    """
    state: dict = {}
    for name in STATE_ATTRIBUTES:
        value = getattr(strategy, name, None)
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


def config_fingerprint(cfg: DictConfig | Mapping, ignore: Sequence[str] | None = None) -> dict:
    """Return the settings that decide what a run computes, flattened to dotted keys.

    Parameters
    ----------
    cfg : DictConfig or Mapping
        The composed config (or a plain dict of it).
    ignore : Sequence[str], optional
        Keys (and everything under them) left out; by default :data:`RUNTIME_KEYS`,
        :data:`OUTSIDE_FEDERATED_KEYS` and :data:`ROUNDS_KEY`: what a checkpoint
        must agree on.

    Returns
    -------
    dict
        ``{"model.name": "cnn", "train.batch_size": 64, ...}``.
    """
    if ignore is None:
        ignore = (*RUNTIME_KEYS, *OUTSIDE_FEDERATED_KEYS, ROUNDS_KEY)
    values = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else cfg
    flat = _flatten(values)
    return {
        k: v for k, v in flat.items() if not any(k == i or k.startswith(i + ".") for i in ignore)
    }


def differences(old: Mapping, new: Mapping) -> list[str]:
    """Describe each key whose value differs between two :func:`config_fingerprint` dicts."""

    def show(values: Mapping, key: str) -> str:
        return repr(values[key]) if key in values else "not set"

    return [
        f"{key} (was {show(old, key)}, now {show(new, key)})"
        for key in sorted(set(old) | set(new))
        if show(old, key) != show(new, key)
    ]


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
        digest.update(memoryview(a).cast("B"))
    return digest.hexdigest()


def require_compatible(
    meta: Mapping, cfg: DictConfig | Mapping, data: str | None = None, where: str | Path = ""
) -> None:
    """Raise :class:`FedadError` unless ``cfg`` (and ``data``) may continue the checkpoint.

    Parameters
    ----------
    meta : Mapping
        The checkpoint's :func:`read_meta`.
    cfg : DictConfig or Mapping
        The config of the run that would continue it.
    data : str, optional
        :func:`data_fingerprint` of the prepared data, when it is known.
    where : str or Path
        The run folder, for the message.
    """
    problems = differences(meta["fingerprint"].get("config", {}), config_fingerprint(cfg))
    rounds = int(config_fingerprint(cfg, ignore=())[ROUNDS_KEY])
    if rounds < int(meta["round"]):
        problems.append(
            f"{ROUNDS_KEY} ({rounds} is below the {meta['round']} rounds the checkpoint holds)"
        )
    if problems:
        raise FedadError(
            f"Cannot resume the run in {where}: its checkpoint was written with other settings. "
            f"Differing: {'; '.join(problems)}. Resume with the settings of the original run "
            f"(only {ROUNDS_KEY} may grow), or start a new run in another folder."
        )
    if data is not None and data != meta["fingerprint"].get("data"):
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

    def round_done(self, server_round: int, arrays: list[np.ndarray], history: list[dict]) -> None:
        """Take the state after ``server_round``; save it if it is due."""
        self.latest = Checkpoint(
            server_round,
            arrays,
            strategy_state(self.strategy),
            [dict(row) for row in history],
            self.fingerprint,
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


def _flatten(values: Mapping, prefix: str = "") -> dict:
    flat = {}
    for key, value in values.items():
        if isinstance(value, Mapping) and value:
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


@contextmanager
def _atomic(path: Path) -> Iterator[BinaryIO]:
    """Write ``path.tmp``; once complete, flush it to disk and rename it to ``path``."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
