"""What a run folder already holds of a run: nothing, the finished run, or a run to continue."""

from __future__ import annotations

from collections.abc import Mapping
from enum import Enum
from pathlib import Path
from typing import cast

from omegaconf import DictConfig, OmegaConf

from fedad import rundir
from fedad.config import ROUNDS_KEY, content, differences
from fedad.errors import FedadError
from fedad.federated import checkpoint


class Decision(Enum):
    """What to do with a run folder."""

    FRESH = "fresh"
    DONE = "done"
    RESUME = "resume"


def decide(cfg: DictConfig, run_dir: Path, required: bool = False) -> Decision:
    """Decide, once and before any data is read, what ``run_dir`` holds of the run ``cfg``.

    * Nothing finished and no checkpoint (a new folder, or an attempt that
      failed before its first round): :attr:`Decision.FRESH`.
    * A finished run with the same settings: :attr:`Decision.DONE` (skipped).
    * A checkpoint with the same settings, ``simulation.num_rounds`` equal or
      larger (a cut-off run, or a finished one trained longer):
      :attr:`Decision.RESUME`.

    Only :data:`RUNTIME_KEYS` may differ. Anything else raises
    :class:`FedadError` naming each differing key, and the folder is left
    byte-identical.

    Parameters
    ----------
    cfg : DictConfig
        The composed config of the run about to start.
    run_dir : Path
        Its folder.
    required : bool
        The user asked to resume (``resume=``): a folder with no checkpoint raises.

    Returns
    -------
    Decision
    """
    finished = rundir.status(run_dir) == rundir.DONE
    meta = checkpoint.read_meta(run_dir)
    if meta is None:
        if required:
            raise FedadError(
                f"Cannot resume {run_dir}: it holds no checkpoint "
                f"({rundir.CHECKPOINT_DIR}/{rundir.CHECKPOINT_META}). It stopped before its "
                "first round, or ran with simulation.checkpoint_every=0."
            )
        if not finished:
            return Decision.FRESH
    saved = _saved_content(run_dir, meta)
    problems = (
        differences(saved, content(cfg))
        if saved is not None
        else [f"its settings are unknown ({rundir.CONFIG_FILE} is missing)"]
    )
    rounds = int(OmegaConf.select(cfg, ROUNDS_KEY))
    done_rounds = _saved_rounds(run_dir, meta)
    if done_rounds is not None and rounds < done_rounds:
        problems.append(f"{ROUNDS_KEY} ({rounds} is below the {done_rounds} rounds it holds)")
    if not problems:
        # A run its stopping rule ended is done whatever round budget it is given again.
        stopped = meta is not None and checkpoint.stopped_early(meta)
        if finished and (rounds == done_rounds or stopped):
            return Decision.DONE
        if meta is not None:
            # A damaged state file fails here, before the data is prepared again.
            checkpoint.load(run_dir)
            return Decision.RESUME
        problems.append(f"{ROUNDS_KEY} (more rounds, but no checkpoint to continue from)")
    what = "a finished run" if finished else "a checkpointed run"
    raise FedadError(
        f"{run_dir} holds {what} of other settings, left as it is; differing: "
        f"{'; '.join(problems)}. Run with the same settings to continue it (only "
        f"{ROUNDS_KEY} may grow), or write to another folder (hydra.run.dir=..., or "
        "hydra.sweep.dir=... for a multirun), or delete this one to run it again."
    )


def _saved_content(run_dir: Path, meta: Mapping | None) -> dict | None:
    """The content settings of the run in ``run_dir``: its checkpoint's, else its config.yaml's."""
    if meta is not None and "content" in meta["fingerprint"]:
        return dict(meta["fingerprint"]["content"])
    path = run_dir / rundir.CONFIG_FILE
    return content(cast(DictConfig, OmegaConf.load(path))) if path.is_file() else None


def _saved_rounds(run_dir: Path, meta: Mapping | None) -> int | None:
    """Rounds the folder holds: the checkpoint's, else the finished run's setting."""
    if meta is not None:
        return int(meta["round"])
    path = run_dir / rundir.CONFIG_FILE
    return int(OmegaConf.select(OmegaConf.load(path), ROUNDS_KEY)) if path.is_file() else None
