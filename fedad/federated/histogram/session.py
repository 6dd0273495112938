"""A site's part of one histogram session: ``xgb.train`` in XGBoost's federated communicator.

It runs in a child process of the site, for two reasons: a session whose peer died
blocks inside XGBoost with no error and no way out but ending the process (the
site's deadline does), and XGBoost's communicator is global to a process.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from fedad.errors import FedadError

# The child needs neither: XGBoost imports them only if they are there (seconds of start-up).
LEAN = ("sklearn", "pandas")
JOB, BOOSTER, CUTS, LOG = "job.json", "booster.json", "cuts.npz", "session.log"
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
    """The session did not finish: past its deadline, or the child process failed."""


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
        Seconds the session may take; past them the child is ended.

    Returns
    -------
    tuple
        The booster's JSON, and at rank 0 the bin edges (``indptr``, ``values``
        of ``QuantileDMatrix.get_quantile_cut``), else None.

    Raises
    ------
    SessionFailed
        Past the deadline (a site left the session), or when the child failed.
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
        with open(folder / LOG, "wb") as log:
            child = subprocess.Popen(
                [sys.executable, "-m", __name__, str(folder)], stdout=log, stderr=log
            )
            try:
                code = child.wait(timeout=deadline)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
                raise SessionFailed(
                    f"the histogram session (rank {session['rank']} of {session['world']}) did "
                    f"not finish within {deadline:g} s (strategy.session_timeout): a site left "
                    "it or never joined, so every site was blocked; it was ended"
                ) from None
        if code != 0:
            tail = (folder / LOG).read_text(errors="replace").strip().splitlines()[-3:]
            raise SessionFailed(
                f"the histogram session's process exited with status {code}: {' / '.join(tail)}"
            )
        cuts = None
        if (folder / CUTS).is_file():
            with np.load(folder / CUTS) as edges:
                cuts = (edges["indptr"], edges["values"])
        return (folder / BOOSTER).read_bytes(), cuts


def main(folder: Path) -> None:
    """The child: join the communicator, sketch, boost, write the booster (and edges at rank 0)."""
    for name in LEAN:
        sys.modules.setdefault(name, None)  # type: ignore[arg-type]
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
    if len(sys.argv) != 2:
        raise FedadError("usage: python -m fedad.federated.histogram.session FOLDER")
    main(Path(sys.argv[1]))
