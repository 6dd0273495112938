"""Overhead of fedad's Flower simulation against the limit: the same training in one process."""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
from benchlib import (
    ProcessTree,
    add_run_arguments,
    check_run_arguments,
    load,
    machine,
    measure_engine_start,
    measure_launch,
    median_figures,
    prepare,
    summarize,
)
from omegaconf import DictConfig

from fedad.config import compose, make_settings
from fedad.rundir import SCALING_FILE

SETTINGS_FILE = "limit_settings.json"
LIMIT_FILE = "limit-{}.json"
# Steady round against what `parallel` limits at once deliver; CPU per steady round against
# the limit's; launch to round 1 against the longer of its two parts, plus this much.
TARGET_ROUND = 1.1
TARGET_CPU = 1.05
STARTUP_SLACK_S = 2.0
FIGURES = (
    ("startup_s", "start-up s (to round 1)"),
    ("first_round_s", "round 1 s"),
    ("steady_round_s", "steady-state round s"),
    ("steady_cpu_s", "steady-state round CPU s"),
    ("total_s", "total wall s"),
    ("peak_mb", "peak memory MB"),
)


def main(argv: list[str] | None = None) -> None:
    """Run fedad's simulation, then the limit in a fresh process; print both and their ratio."""
    args = parse_args(argv)
    if args.limit:
        run_limit(Path(args.limit), args.copy)
        return
    overrides = [
        f"simulation.num_clients={args.clients}",
        f"simulation.num_rounds={args.rounds}",
        f"dataset.n_rows={args.rows}",
        f"model={args.model}",
        "partition=iid",
        "simulation.fraction_train=1.0",
        "simulation.fraction_evaluate=1.0",
        *args.overrides,
    ]
    cfg = compose(overrides)
    print(f"machine: {machine()}")
    print(f"config: {' '.join(overrides)}")
    per_client = max(1, int(cfg.simulation.client_resources.num_cpus))
    parallel = min(args.clients, (os.cpu_count() or 1) // per_client)

    runs = []
    for repeat in range(1, args.repeats + 1):
        # The profile, when asked for, is of the first repeat's limit.
        runs.append(measure(cfg, parallel, args.profile if repeat == 1 else None))
        fedad_run, limit_run, crowded_run = runs[-1]
        print(
            f"repeat {repeat}: steady-state round s: fedad {fedad_run['steady_round_s']:.2f}, "
            f"limit {limit_run['steady_round_s']:.2f}, "
            f"{parallel} limits at once {crowded_run:.2f}; launch to round 1 "
            f"{fedad_run['startup_s']:.2f} s",
            flush=True,
        )
    fedad = median_figures([f for f, _, _ in runs])
    limit = median_figures([lim for _, lim, _ in runs])
    crowded = float(np.median([c for _, _, c in runs]))

    print(
        f"\nclients {args.clients}, rounds {args.rounds}, model {args.model}, "
        f"parallel {parallel}; medians over {args.repeats} repeat(s); fedad's start-up counts "
        "from the launch (Ray and the actors start while the data is prepared), the limit's "
        "from its process's start"
    )
    print(f"{'':28}{'fedad':>10}{'limit':>10}")
    for key, label in FIGURES:
        print(f"{label:28}{fedad[key]:>10.2f}{limit[key]:>10.2f}")
    cpu = ", ".join(f"{k} {v:.2f}" for k, v in fedad["steady_cpu_parts_s"].items())
    print(f"fedad steady round CPU s by process: {cpu}")
    print(f"fedad peak memory: {fedad['memory']}")
    print(f"limit peak memory: {limit['memory']}")
    parts_s = ", ".join(f"{k} {v:.2f}" for k, v in limit["steady_parts_s"].items())
    print(f"limit steady round parts s: {parts_s}")
    print(f"limit, {parallel} copies at once: steady-state round s: {crowded:.2f}")
    # Averaging and the server's evaluation run in one place in both; only the clients' work
    # can spread over the parallel clients.
    serial = limit["steady_parts_s"]["average"] + limit["steady_parts_s"]["server evaluate"]
    ideals = (
        (f"limit / {parallel}", limit["steady_round_s"] / parallel),
        (
            f"limit / {parallel}, server's part undivided",
            (limit["steady_round_s"] - serial) / parallel + serial,
        ),
        (f"{parallel} limits at once / {parallel}", crowded / parallel),
    )
    for i, (name, ideal) in enumerate(ideals):
        ratio = fedad["steady_round_s"] / ideal
        last = i == len(ideals) - 1
        target = f" (target <= {TARGET_ROUND}: {verdict(ratio / TARGET_ROUND)})" if last else ""
        print(f"ideal round s, {name}: {ideal:.2f}; fedad / it: {ratio:.2f}{target}")
    cpu_ratio = fedad["steady_cpu_s"] / limit["steady_cpu_s"]
    print(
        f"round CPU ratio fedad / limit: {cpu_ratio:.2f} "
        f"(target <= {TARGET_CPU}: {verdict(cpu_ratio / TARGET_CPU)})"
    )
    startup, prep, engine = fedad["startup_s"], fedad["prepare_alone_s"], fedad["engine_alone_s"]
    allowed = max(prep, engine) + STARTUP_SLACK_S
    print(
        f"start-up: launch to round 1 {startup:.2f} s; data preparation alone {prep:.2f} s "
        f"({fedad['prepare_s']:.2f} s beside the engine's start); Ray and actor start-up "
        f"alone {engine:.2f} s (target <= max of the two + {STARTUP_SLACK_S:g} s = "
        f"{allowed:.2f} s: {verdict(startup / allowed)})"
    )
    print(load())


def measure(cfg: DictConfig, parallel: int, profile: str | None) -> tuple[dict, dict, float]:
    """Preparation alone, engine start alone, fedad from its launch, the limit, ``parallel`` limits.

    Returns fedad's figures (``prepare_alone_s`` and ``engine_alone_s``
    added), the limit's, and the mean steady-state round of the limits run at
    once: each trains every client, so that round is what the clients' work
    costs while ``parallel`` processes share the machine (its memory and
    caches as well as its cores), as fedad's actors do.
    """
    started = time.time()
    prepare(cfg)
    prepare_alone = time.time() - started
    engine_alone = measure_engine_start(cfg)
    with tempfile.TemporaryDirectory(prefix="fedad-bench-") as tmp:
        run_dir = Path(tmp)
        fedad, prepared = measure_launch(cfg, run_dir)
        fedad.update(prepare_alone_s=prepare_alone, engine_alone_s=engine_alone)
        settings = make_settings(cfg, prepared.data, len(prepared.parts), run_dir)
        profile = str(Path(profile).resolve()) if profile else None
        launch = {"settings": settings, "profile": profile, "called": time.time()}
        (run_dir / SETTINGS_FILE).write_text(json.dumps(launch))
        limit = run_limits(run_dir, 1)[0]
        launch["profile"] = None
        (run_dir / SETTINGS_FILE).write_text(json.dumps(launch))
        crowded = run_limits(run_dir, parallel)
    return fedad, limit, float(np.mean([c["steady_round_s"] for c in crowded]))


def run_limits(run_dir: Path, copies: int) -> list[dict]:
    """Run ``copies`` limits at once, each in a fresh process; return their figures."""
    command = [sys.executable, __file__, "--limit", str(run_dir), "--copy"]
    running = [subprocess.Popen([*command, str(i)]) for i in range(copies)]
    if any(process.wait() for process in running):
        raise SystemExit("a limit process failed (its error is above)")
    return [json.loads((run_dir / LIMIT_FILE.format(i)).read_text()) for i in range(copies)]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--clients", type=int, default=10)
    add_run_arguments(
        parser, rounds=11, rows=30000, repeats_help="runs of each; the figures are their medians"
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="test-suite size: 3 clients, 2 rounds, 3000 rows, 1 repeat",
    )
    parser.add_argument(
        "--profile",
        metavar="PATH",
        help="write a cProfile of the limit's rounds (the clients' work) to PATH; "
        "the limit's figures then include the profiler's cost",
    )
    parser.add_argument("--limit", metavar="RUN_DIR", help=argparse.SUPPRESS)
    parser.add_argument("--copy", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.clients, args.rounds, args.rows, args.repeats = 3, 2, 3000, 1
    check_run_arguments(parser, args)
    return args


def verdict(ratio: float) -> str:
    """``met`` for a ratio to the target of at most 1, else ``missed``."""
    return "met" if ratio <= 1.0 else "missed"


def run_limit(run_dir: Path, copy: int) -> None:
    """The limit: each client's work done in a loop in this process, then a weighted mean.

    It calls what fedad's ClientApp handlers call (``load_site``, the model
    family's ``fit`` and ``site_metrics``) on the same shards, with the
    same federated scaling statistics, model, epochs, batch size, seeds and
    TensorFlow threads per client as the simulation in ``run_dir``; no
    Flower, no Ray. Each round trains every client, averages the weights by
    example count, then evaluates the average at every client and on the
    global test set, as a FedAvg round with both fractions at 1 does.
    Writes ``limit-<copy>.json``.
    """
    from fedad.data import scaling
    from fedad.federated import shards
    from fedad.federated.families.registry import family_for
    from fedad.federated.task import load_site

    launch = json.loads((run_dir / SETTINGS_FILE).read_text())
    settings, called = launch["settings"], launch["called"]
    # The sites' family (the cached site model) and the server's (its own plain model).
    site_family, server_family = family_for(settings), family_for(settings)
    # Threads per client and TensorFlow's seed, as an actor sets them before its first op.
    site_family.init_runtime()
    n = int(settings["num-clients"])
    with ProcessTree() as tree, np.load(run_dir / SCALING_FILE) as stats:
        mean, std = stats["mean"], stats["std"]
        X_test, y_test = shards.read_shard(shards.test_path(run_dir), "limit")
        X_test = scaling.standardize(X_test, mean, std)

        def server_evaluate(weights: list[np.ndarray]) -> None:
            server_family.metrics(weights, X_test, y_test, {})

        weights = server_family.initial_arrays()
        server_evaluate(weights)
        profiler = cProfile.Profile()
        if launch["profile"]:
            profiler.enable()
        rounds = []
        for rnd in range(1, int(settings["simulation.num_rounds"]) + 1):
            config = {"scale-mean": mean.tolist(), "scale-std": std.tolist(), "server-round": rnd}
            started = time.time()
            updates, counts = [], []
            for pid in range(n):
                site = load_site(settings, pid, config)
                seed = int(settings["seed"]) + 1000 * rnd + pid
                update, _ = site_family.fit(weights, site, config, seed=seed)
                updates.append(update)
                counts.append(len(site.y_train))
            trained = time.time()
            shares = np.asarray(counts, dtype=np.float64) / sum(counts)
            weights = [
                np.tensordot(shares, np.stack(w), axes=1).astype(w[0].dtype)
                for w in zip(*updates, strict=True)
            ]
            averaged = time.time()
            for pid in range(n):
                site = load_site(settings, pid, config)
                site_family.site_metrics(weights, site, config)
            evaluated = time.time()
            server_evaluate(weights)
            done = time.time()
            rounds.append(
                {
                    "round": rnd,
                    "started_at": started,
                    "seconds": done - started,
                    "train": trained - started,
                    "average": averaged - trained,
                    "client evaluate": evaluated - averaged,
                    "server evaluate": done - evaluated,
                }
            )
        profiler.disable()
    if launch["profile"]:
        profiler.dump_stats(launch["profile"])
    table = pd.DataFrame(rounds).set_index("round")
    result = summarize(table, called, time.time(), tree)
    parts = table.loc[2:].drop(columns=["started_at", "seconds"]).mean()
    result["steady_parts_s"] = {k: float(v) for k, v in parts.items()}
    (run_dir / LIMIT_FILE.format(copy)).write_text(json.dumps(result))


if __name__ == "__main__":
    main()
