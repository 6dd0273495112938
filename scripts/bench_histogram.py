"""A histogram session's boosting round against a central one, and its bytes: formula vs loopback.

Prints, for ``--sites`` sites on synthetic rows, the seconds per boosting round of
one session of ``strategy=fedxgb_histogram`` (server and site processes as a run
starts them, their start-up counted apart) against ``xgb.train`` on the pooled
rows, and the bytes the allreduces moved by fedad's formula
(:func:`fedad.federated.histogram.pinning.collective_bytes`) against the loopback
interface's counter (``/proc/net/dev``: every byte on ``lo`` is sent once; other
traffic on this machine's loopback adds to it).
"""

from __future__ import annotations

import argparse
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import xgboost as xgb
from benchlib import machine

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


def rows(n: int, features: int, classes: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Synthetic continuous rows whose class depends on a few features."""
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, features)).astype(np.float32)
    score = X[:, 0] + 0.5 * X[:, 1] - 0.3 * X[:, 2] + 0.5 * rng.normal(size=n)
    edges = np.quantile(score, np.linspace(0, 1, classes + 1)[1:-1])
    return X, np.digitize(score, edges).astype(np.int64)


def session_round(X, y, sites, params, rounds):
    """One session of ``sites``: (seconds, start-up seconds, booster, edges, loopback bytes)."""
    parts = np.array_split(np.random.default_rng(0).permutation(len(y)), sites)
    counts = np.bincount(y)
    started = time.perf_counter()
    server = AggregationServer(sites, 0, timeout=600)
    ready = time.perf_counter() - started
    before = loopback_bytes()

    def site(rank):
        extra, weight = booster.weighting(y[parts[rank]], counts, params["objective"])
        where = {"address": f"localhost:{server.port}", "world": sites, "rank": rank}
        return session.run(
            X[parts[rank]], y[parts[rank]], weight, b"", {**params, **extra}, rounds, where, 600
        )

    began = time.perf_counter()
    try:
        with ThreadPoolExecutor(sites) as pool:
            results = list(pool.map(site, range(sites)))
    finally:
        server.stop()
    seconds = time.perf_counter() - began
    after = loopback_bytes()
    moved = None if before is None or after is None else after - before
    return seconds, ready, results[0][0], results[0][1], moved


def main() -> None:
    """Print the figures (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=50_000)
    parser.add_argument("--features", type=int, default=40)
    parser.add_argument("--sites", type=int, default=3)
    parser.add_argument("--classes", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--max-depth", type=int, default=6)
    parser.add_argument("--max-bin", type=int, default=256)
    args = parser.parse_args()
    print(f"machine: {machine()}")
    X, y = rows(args.rows, args.features, args.classes, seed=0)
    model = {"max_depth": args.max_depth, "learning_rate": 0.1, "max_bin": args.max_bin}
    params = booster.params(model, args.classes, seed=0)
    extra, weight = booster.weighting(y, np.bincount(y), params["objective"])
    # A process per site boosts; the central twin gets as many threads as there are sites.
    started = time.perf_counter()
    pooled = xgb.QuantileDMatrix(X, label=y, weight=weight, max_bin=args.max_bin)
    xgb.train({**params, **extra, "nthread": args.sites}, pooled, num_boost_round=args.rounds)
    central = (time.perf_counter() - started) / args.rounds
    seconds, ready, raw, cuts, moved = session_round(X, y, args.sites, params, args.rounds)
    built = pinning.histograms_built(raw, args.max_depth)
    formula = pinning.collective_bytes(args.sites, built, pinning.bins_of(cuts[0]))
    per_round = seconds / args.rounds
    print(
        f"{args.rows} rows x {args.features} features, {args.classes} classes, {args.sites} "
        f"sites, {args.rounds} boosting rounds, max_depth {args.max_depth}, max_bin {args.max_bin}"
    )
    print(f"central boosting round:   {central:.3f} s (pooled rows, sketch included)")
    print(
        f"histogram boosting round: {per_round:.3f} s = {per_round / central:.1f} x central "
        f"(site processes' start-up and sketch included; server start {ready:.2f} s apart)"
    )
    print(f"histograms summed: {built}; bins per histogram: {pinning.bins_of(cuts[0])}")
    print(f"collective bytes, formula:  {formula / 1e6:.2f} MB")
    if moved is None:
        print("collective bytes, loopback: unreadable (/proc/net/dev)")
    else:
        print(f"collective bytes, loopback: {moved / 1e6:.2f} MB ({moved / formula:.2f} x formula)")


if __name__ == "__main__":
    main()
