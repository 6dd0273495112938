"""A site's part of one histogram session: ``xgb.train`` in XGBoost's federated communicator.

It runs in a worker process of the site, for two reasons: a session whose peer died
blocks inside XGBoost with no error and no way out but ending the process (the
site's deadline does), and XGBoost's communicator is global to a process. A worker
that finished its session serves the site's next one: Python and XGBoost start once
per site, not once per round (seconds a round, ten sites sharing a few cores).
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping
from pathlib import Path

import numpy as np

# The worker needs neither: XGBoost imports them only if they are there (seconds of start-up).
LEAN = ("sklearn", "pandas")
JOB, BOOSTER, CUTS = "job.json", "booster.json", "cuts.npz"
# OpenMP's threads in a worker sleep while they wait, not spin: a session waits on its peers at
# every allreduce, and ten sites spinning on a few cores made XGBoost's sketch of a few thousand
# rows take seconds instead of a twentieth of one (measured in scripts/bench_histogram.py).
WORKER_ENV = {"OMP_WAIT_POLICY": "PASSIVE"}
# What a worker writes back once a session's booster is written.
DONE = b"done\n"
# A train config's entries for a site of a session: the server's host:port, the sites, this
# site's rank, the sampled sites' pooled class counts and the session's deadline (seconds).
ADDRESS, WORLD, RANK = "histogram-address", "histogram-world", "histogram-rank"
COUNTS, DEADLINE = "histogram-counts", "histogram-deadline"
# The query config entry asking a site for its training rows' class counts, and its reply's key.
COUNT_QUERY, CLASS_COUNTS = "histogram-class-counts", "class-counts"
# A site's train metric: the gradient histograms its session summed (pinning.histograms_built).
HISTOGRAMS = "histograms"


def joins(config: Mapping) -> bool:
    """Whether a train config asks the site to join a histogram session."""
    return ADDRESS in config


class SessionFailed(RuntimeError):
    """The session did not finish: past its deadline, or its worker process failed."""


def run(
    X: np.ndarray,
    y: np.ndarray,
    weight: np.ndarray | None,
    start: bytes,
    train_params: Mapping,
    rounds: int,
    session: Mapping,
    deadline: float,
) -> tuple[bytes, tuple[np.ndarray, np.ndarray] | None]:
    """Boost ``rounds`` iterations from ``start`` with the other sites of ``session``.

    Parameters
    ----------
    X, y, weight : np.ndarray
        The site's training rows, labels and row weights (None: none).
    start : bytes
        The global booster's JSON (empty: from scratch).
    train_params : Mapping
        XGBoost's parameters, ``max_bin`` included: the same at every site.
    rounds : int
        Boosting rounds of the session.
    session : Mapping
        ``address`` (host:port of the server), ``world`` (sites), ``rank``.
    deadline : float
        Seconds the session may take; past them its worker process is ended.

    Returns
    -------
    tuple
        The booster's JSON, and at rank 0 the bin edges (``indptr``, ``values``
        of ``QuantileDMatrix.get_quantile_cut``), else None.

    Raises
    ------
    SessionFailed
        Past the deadline (a site left the session), or when the worker process failed.
    """
    with tempfile.TemporaryDirectory(prefix="fedad-histogram-") as tmp:
        folder = Path(tmp)
        np.save(folder / "X.npy", np.ascontiguousarray(X, dtype=np.float32))
        np.save(folder / "y.npy", np.asarray(y))
        if weight is not None:
            np.save(folder / "weight.npy", np.asarray(weight, dtype=np.float32))
        (folder / "start.json").write_bytes(start)
        job = {"params": dict(train_params), "rounds": int(rounds), **session}
        (folder / JOB).write_text(json.dumps(job))
        worker = _Worker.take()
        try:
            worker.serve(folder, deadline)
        except TimeoutError:
            worker.stop()
            raise SessionFailed(
                f"the histogram session (rank {session['rank']} of {session['world']}) did "
                f"not finish within {deadline:g} s (strategy.session_timeout): a site left "
                "it or never joined, so every site was blocked; it was ended"
            ) from None
        except EOFError:
            code, tail = worker.stop()
            raise SessionFailed(
                f"the histogram session's process exited with status {code}: {' / '.join(tail)}"
            ) from None
        _Worker.give_back(worker)
        cuts = None
        if (folder / CUTS).is_file():
            with np.load(folder / CUTS) as edges:
                cuts = (edges["indptr"], edges["values"])
        return (folder / BOOSTER).read_bytes(), cuts


class _Worker:
    """A process that boosts the sessions it is handed, one at a time, until its input closes.

    Idle workers wait in a pool of this process (one per site thread that
    ran a session); a worker whose session failed or ran past its deadline
    is ended, never handed another.
    """

    _idle: list[_Worker] = []
    _lock = threading.Lock()

    def __init__(self) -> None:
        # Its output, emptied before each session: the tail says why a session failed.
        self.log = tempfile.TemporaryFile()  # noqa: SIM115
        self.process = subprocess.Popen(
            [sys.executable, "-m", __name__],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.log,
            env={**os.environ, **WORKER_ENV},
        )

    @classmethod
    def take(cls) -> _Worker:
        """An idle worker still running, or a new one."""
        with cls._lock:
            while cls._idle:
                worker = cls._idle.pop()
                if worker.process.poll() is None:
                    return worker
                worker.stop()
        return cls()

    @classmethod
    def give_back(cls, worker: _Worker) -> None:
        """Keep ``worker`` for a later session."""
        with cls._lock:
            cls._idle.append(worker)

    @classmethod
    def stop_idle(cls) -> None:
        """End every idle worker."""
        with cls._lock:
            idle, cls._idle[:] = list(cls._idle), []
        for worker in idle:
            worker.stop()

    def serve(self, folder: Path, deadline: float) -> None:
        """Boost the session of ``folder``; TimeoutError past ``deadline``, EOFError if it died."""
        self.log.seek(0)
        self.log.truncate()
        assert self.process.stdin is not None and self.process.stdout is not None
        try:
            self.process.stdin.write(f"{folder}\n".encode())
            self.process.stdin.flush()
        except BrokenPipeError:
            raise EOFError from None
        reply, ends = b"", time.monotonic() + deadline
        while not reply.endswith(b"\n"):
            left = ends - time.monotonic()
            if left <= 0 or not select.select([self.process.stdout], [], [], left)[0]:
                raise TimeoutError
            chunk = os.read(self.process.stdout.fileno(), 64)
            if not chunk:
                raise EOFError
            reply += chunk
        if reply != DONE:
            raise EOFError

    def stop(self) -> tuple[int | None, list[str]]:
        """End the worker; its exit status and the last lines it wrote."""
        if self.process.poll() is None:
            self.process.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=10)
        for pipe in (self.process.stdin, self.process.stdout):
            if pipe is not None:
                with contextlib.suppress(OSError):
                    pipe.close()
        self.log.seek(0)
        tail = self.log.read().decode(errors="replace").strip().splitlines()[-3:]
        self.log.close()
        return self.process.returncode, tail


def stop_workers() -> None:
    """End this process's idle workers (the next session starts a fresh one)."""
    _Worker.stop_idle()


def main() -> None:
    """The worker: for each folder read from its input, boost that session, then say so."""
    # Only "done" lines go to the site: whatever else is printed goes to the log.
    replies = os.fdopen(os.dup(sys.stdout.fileno()), "wb", buffering=0)
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    for name in LEAN:
        sys.modules.setdefault(name, None)  # type: ignore[arg-type]
    import xgboost  # noqa: F401  (imported once, before the first session)

    for line in sys.stdin:
        boost(Path(line.strip()))
        replies.write(DONE)


def boost(folder: Path) -> None:
    """One session: join the communicator, sketch, boost, write the booster (edges at rank 0)."""
    import xgboost as xgb
    from xgboost import collective

    job = json.loads((folder / JOB).read_text())
    params = job["params"]
    X, y = np.load(folder / "X.npy"), np.load(folder / "y.npy")
    weight = np.load(folder / "weight.npy") if (folder / "weight.npy").is_file() else None
    start = (folder / "start.json").read_bytes()
    with collective.CommunicatorContext(
        dmlc_communicator="federated",
        federated_server_address=job["address"],
        federated_world_size=int(job["world"]),
        federated_rank=int(job["rank"]),
    ):
        dtrain = xgb.QuantileDMatrix(X, label=y, weight=weight, max_bin=int(params["max_bin"]))
        model = xgb.Booster(model_file=bytearray(start)) if start else None
        booster = xgb.train(params, dtrain, num_boost_round=int(job["rounds"]), xgb_model=model)
        if int(job["rank"]) == 0:
            indptr, values = dtrain.get_quantile_cut()
            np.savez(folder / CUTS, indptr=indptr, values=values)
    (folder / BOOSTER).write_bytes(bytes(booster.save_raw("json")))


if __name__ == "__main__":
    main()
