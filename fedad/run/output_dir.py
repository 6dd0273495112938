"""Hydra callback: refuse an output folder that cannot be written, before Hydra creates it."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from fedad.errors import FedadError, exit_with


class CheckOutputDir(Callback):
    """Check ``hydra.run.dir`` / ``hydra.sweep.dir`` before Hydra makes it.

    Hydra creates the folder before any fedad code runs and would answer an
    unwritable one with a traceback; this turns it into one clear paragraph.
    """

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        """Check the single run's folder."""
        check_writable(Path(config.hydra.run.dir), "hydra.run.dir")

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        """Check the sweep's folder."""
        check_writable(Path(config.hydra.sweep.dir), "hydra.sweep.dir")


def check_writable(path: Path, key: str) -> None:
    """Exit with a clear message unless a folder can be made in ``path``'s deepest existing part.

    Permission bits are not enough: root passes every ``os.access`` check, and
    read-only or virtual file systems (``/proc``, ``/sys``, a read-only mount)
    refuse what the bits allow. So a probe folder is made there and removed.
    """
    existing = path.absolute()
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        reason = "is a file, not a folder"
    else:
        try:
            Path(tempfile.mkdtemp(prefix=".fedad-probe-", dir=existing)).rmdir()
            return
        except OSError as err:
            reason = f"does not accept new folders ({err.strerror})"
    exit_with(
        FedadError(
            f"Cannot write the run's outputs to {path} ({key}): {existing} {reason}. Point {key} "
            f"at a folder you can write, e.g. {key}=outputs/my_run."
        )
    )
