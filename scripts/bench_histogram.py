"""A histogram round's profile against a central boosting round, and its bytes: formula vs loopback.

Prints, for the sites of a fedad run's partition (``--dataset``, ``--task``,
``--sites``; fedad's ``model=xgboost`` settings), where one session of
``strategy=fedxgb_histogram`` spends its seconds, as a run starts its server and
its sites' worker processes:

- the server's start-up (a run starts it while the previous round is evaluated),
- the sites' worker start-up (once a run per site: a round's first session),
- a session's fixed cost (its sites join, sketch the quantiles, read the global
  booster and write theirs: a session of 0 boosting rounds),
- a boosting round (a session of ``--boost`` rounds less the fixed cost, per round),

against ``xgb.train`` on the pooled rows (with every core of this machine):
its sketch and a boosting round. Then the bytes the allreduces moved by fedad's
formula (:func:`fedad.federated.histogram.pinning.collective_bytes`) against the
loopback interface's counter (``/proc/net/dev``: every byte on ``lo`` is sent
once; the quantile sketch, gRPC's framing and other traffic on this machine's
loopback add to it). Sessions are timed ``--repeats`` times (the median).
"""

from __future__ import annotations

import argparse
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import xgboost as xgb
from benchlib import load, machine, prepare

from fedad.config import compose
from fedad.federated.histogram import pinning, session
from fedad.federated.histogram.server import AggregationServer
from fedad.models import booster


def loopback_bytes() -> int | None:
    """Bytes sent on the loopback interface so far, or None where it cannot be read."""
    try:
        for line in Path("/proc/net/dev").read_text().splitlines():
            name, _, counters = line.partition(":")
            if name.strip() == "lo":
                return int(counters.split()[8])
    except (OSError, IndexError, ValueError):
        return None
    return None


class Cohort:
    """The sites' rows and XGBoost's parameters; :meth:`session` runs one session of them all."""

    def __init__(self, X: np.ndarray, y: np.ndarray, parts: list, params: dict) -> None:
        self.X, self.y, self.parts, self.params = X, y, parts, params
        self.counts = np.bincount(y, minlength=int(params.get("num_class", 2)))
        self.start = b""

    def session(self, rounds: int) -> Session:
        """One session of ``rounds`` boosting rounds from the last one's booster, as a run's."""
        began = time.perf_counter()
        server = AggregationServer(len(self.parts), 0, timeout=600)
        ready = time.perf_counter()
        before = loopback_bytes()

        def site(rank: int) -> tuple[bytes, tuple[np.ndarray, np.ndarray] | None]:
            rows = self.parts[rank]
            extra, weight = booster.weighting(self.y[rows], self.counts, self.params["objective"])
            where = {"address": f"localhost:{server.port}", "world": len(self.parts), "rank": rank}
            params = {**self.params, **extra}
            return session.run(
                self.X[rows], self.y[rows], weight, self.start, params, rounds, where, 600
            )

        try:
            with ThreadPoolExecutor(len(self.parts)) as pool:
                results = list(pool.map(site, range(len(self.parts))))
            done = time.perf_counter()
        finally:
            server.stop()
        after = loopback_bytes()
        raw, cuts = results[0]
        depth = int(self.params["max_depth"])
        built = pinning.histograms_built(raw, depth)
        built -= pinning.histograms_built(self.start, depth) if self.start else 0
        self.start = raw
        moved = None if before is None or after is None else after - before
        assert cuts is not None  # rank 0's reply
        return Session(ready - began, done - ready, built, pinning.bins_of(cuts[0]), moved)


@dataclass
class Session:
    """One session's figures: its server's start-up and its sites' seconds, what it moved."""

    server: float
    sites: float
    histograms: int
    bins: int
    loopback: int | None


def main() -> None:
    """Print the figures (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dataset", default="nsl_kdd")
    parser.add_argument("--task", default="binary", choices=["binary", "multiclass"])
    parser.add_argument("--sites", type=int, default=10)
    parser.add_argument("--boost", type=int, default=10, help="boosting rounds of a session")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print(f"machine: {machine()}")
    cfg = compose(
        [
            f"dataset={args.dataset}",
            f"task={args.task}",
            "model=xgboost",
            f"simulation.num_clients={args.sites}",
        ]
    )
    prepared = prepare(cfg)
    data = prepared.data
    X, y = np.asarray(data.X_train, dtype=np.float32), np.asarray(data.y_train)
    classes = len(data.class_names)
    params = booster.params(cfg.model, classes, seed=int(cfg.seed))
    cohort = Cohort(X, y, list(prepared.parts), params)
    max_bin, depth = int(params["max_bin"]), int(params["max_depth"])

    # Central XGBoost on the pooled rows: its sketch, then its boosting rounds apart.
    extra, weight = booster.weighting(y, np.bincount(y, minlength=classes), params["objective"])
    central_params = {**params, **extra}
    sketches, central = [], []
    for _ in range(args.repeats):
        started = time.perf_counter()
        pooled = xgb.QuantileDMatrix(X, label=y, weight=weight, max_bin=max_bin)
        sketches.append(time.perf_counter() - started)
        started = time.perf_counter()
        xgb.train(central_params, pooled, num_boost_round=args.boost)
        central.append((time.perf_counter() - started) / args.boost)

    # The histogram session: cold (fresh workers: a run's first round), then warm rounds.
    session.stop_workers()
    cold = cohort.session(args.boost)
    fixed = [cohort.session(0) for _ in range(args.repeats)]
    whole = [cohort.session(args.boost) for _ in range(args.repeats)]
    session.stop_workers()

    median = statistics.median
    central_round = median(central)
    session_s = median(s.sites for s in whole)
    fixed_s = median(s.sites for s in fixed)
    per_round = (session_s - fixed_s) / args.boost
    print(
        f"{args.dataset}, {args.task}: {len(y)} training rows x {X.shape[1]} features, "
        f"{classes} classes, {args.sites} sites; max_depth {depth}, max_bin {max_bin}; "
        f"sessions of {args.boost} boosting rounds; medians of {args.repeats}"
    )
    print("seconds:")
    print(f"  central sketch             {median(sketches):7.3f}  (pooled rows; once a run)")
    print(f"  central boosting round     {central_round:7.3f}")
    servers = median(s.server for s in [*fixed, *whole])
    print(f"  server start-up            {servers:7.3f}  (a run's: during the evaluation before)")
    print(f"  site workers' start-up     {cold.sites - session_s:7.3f}  (a run's first round only)")
    print(f"  session's fixed cost       {fixed_s:7.3f}  (join, sketch, booster in and out)")
    print(f"  histogram boosting round   {per_round:7.3f}  (fixed cost apart)")
    print(
        f"a session of {args.boost} boosting rounds: {session_s:.3f} s, "
        f"{session_s / args.boost / central_round:.1f} x central per boosting round "
        f"({per_round / central_round:.1f} x, fixed cost apart)"
    )
    last = whole[-1]
    formula = pinning.collective_bytes(args.sites, last.histograms, last.bins)
    print(f"histograms summed: {last.histograms}; bins per histogram: {last.bins}")
    print(f"collective bytes, formula:  {formula / 1e6:.2f} MB")
    if last.loopback is None:
        print("collective bytes, loopback: unreadable (/proc/net/dev)")
    else:
        print(
            f"collective bytes, loopback: {last.loopback / 1e6:.2f} MB "
            f"({last.loopback / formula:.2f} x formula)"
        )
    print(load())


if __name__ == "__main__":
    main()
