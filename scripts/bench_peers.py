"""Where fedad stands: one federated workload on fedad, plain Flower, pfl-research, no engine."""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

# Before anything imports TensorFlow: its start-up notices (oneDNN, CPU features), one set
# in this process and in every process of every system, would bury the table.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from benchlib import REPO, ProcessTree, load, machine, prepare, wait_for_exit  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

PEERS = REPO / "scripts" / "peers"
sys.path.insert(0, str(PEERS))

from common import RESULT_PREFIX  # noqa: E402

from fedad.config import compose  # noqa: E402

SYSTEMS = ("fedad", "flower", "pfl", "limit")
LABELS = {
    "fedad": "fedad",
    "flower": "Flower app",
    "pfl": "pfl-research",
    "limit": "limit",
}
PFL_PYTHON = "/tmp/pflvenv/bin/python"
PFL_INSTALL = "python -m venv /tmp/pflvenv && /tmp/pflvenv/bin/pip install 'pfl[tf]' tf_keras"
# The workload of issue 26: NSL-KDD's 20 % training file to KDDTest+, 10 sites with
# Dirichlet(0.5) label skew, the CNN, one local epoch of batch 64, every site every round.
# Fixed budgets and argmax decisions (no early stopping, no threshold calibration), and a
# fresh optimizer at each site each round, as the peers train (pfl resets its local optimizer
# for every site; fedad keeps each site's Adam moments unless told not to).
WORKLOAD = [
    "dataset=nsl_kdd",
    "task=binary",
    "seed=0",
    "model=cnn",
    "partition=dirichlet",
    "partition.alpha=0.5",
    "simulation.num_clients=10",
    "simulation.fraction_train=1.0",
    "simulation.fraction_evaluate=1.0",
    "simulation.stop.patience=0",
    "train.local_epochs=1",
    "train.batch_size=64",
    "train.early_stopping_patience=0",
    "train.keep_optimizer=false",
    "decision.rule=argmax",
]
# What fedad's run does besides the federation, off: only the federated part runs (its
# centralized twin still trains once the rounds are over, after everything measured here).
FEDAD_ONLY = [
    "baselines=none",
    "explain=false",
    "eda=false",
    "simulation.local_sites=0",
    "detector.write=false",
]
FIGURES = (
    ("steady_round_s", "steady round s", "{:.2f}"),
    ("steady_cpu_s", "steady round CPU s", "{:.2f}"),
    ("launch_to_round1_end_s", "launch to round 1 end s", "{:.1f}"),
    ("wall_s", "launch to exit s", "{:.1f}"),
    ("macro_f1", "test macro-F1", "{:.4f}"),
    ("roc_auc", "test ROC-AUC", "{:.4f}"),
)
# fedad's steady round against pfl-research's; its round CPU against the limit's.
TARGET_CPU = 1.05


def main(argv: list[str] | None = None) -> None:
    """Prepare the workload once, run the systems in turn ``--repeats`` times, print the table."""
    args = parse_args(argv)
    data_dir = Path(args.data_dir).resolve()
    overrides = [*WORKLOAD, f"simulation.num_rounds={args.rounds}", f"data_dir={data_dir}"]
    overrides += args.overrides
    print(f"machine: {machine()}")
    print(f"workload: {' '.join(overrides)}")
    systems = list(args.systems)
    if "pfl" in systems and not pfl_available(args.pfl_python):
        print(
            f"pfl-research: not importable by {args.pfl_python} (with tf_keras); skipped. "
            f"Install it with: {PFL_INSTALL}"
        )
        systems.remove("pfl")
    with tempfile.TemporaryDirectory(prefix="fedad-peers-") as tmp:
        workload = Path(tmp) / "workload.npz"
        started = time.time()
        meta = write_workload(compose(overrides), workload)
        print(
            f"workload file: {meta['sites']} sites, {sum(meta['train_rows'])} training rows "
            f"({min(meta['train_rows'])}..{max(meta['train_rows'])} a site), "
            f"{meta['test_rows']} test rows, {meta['n_features']} features; "
            f"written in {time.time() - started:.1f} s"
        )
        runs: dict[str, list[dict]] = {name: [] for name in systems}
        for repeat in range(1, args.repeats + 1):
            # Each repeat starts one system later, so no system always runs first (or last).
            shift = (repeat - 1) % len(systems)
            for name in systems[shift:] + systems[:shift]:
                run_dir = Path(tmp) / f"{name}-{repeat}"
                run_dir.mkdir()
                figures = run_system(name, args, workload, overrides, meta, run_dir)
                runs[name].append(figures)
                print(f"repeat {repeat} {LABELS[name]}: {describe(figures)}", flush=True)
    print_table(runs, args)
    if args.json:
        Path(args.json).write_text(json.dumps({"overrides": overrides, "runs": runs}, indent=1))
    print(load())


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=10, help="round 1 warms up; 2.. are steady")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each system, interleaved")
    parser.add_argument(
        "--quick", action="store_true", help="smoke-test size: 2 rounds, 1 repeat (nothing timed)"
    )
    parser.add_argument("--systems", nargs="+", choices=SYSTEMS, default=list(SYSTEMS))
    parser.add_argument(
        "--data-dir",
        default=os.environ.get("FEDAD_DATA_DIR", "data"),
        help="the folder holding nsl_kdd/ (default: FEDAD_DATA_DIR, else ./data)",
    )
    parser.add_argument("--pfl-python", default=PFL_PYTHON, help="a Python with pfl and tf_keras")
    parser.add_argument("--pfl-workers", type=int, default=2, help="pfl's worker processes")
    parser.add_argument(
        "--timeout", type=float, default=1800.0, help="seconds one run may take before it fails"
    )
    parser.add_argument("--json", metavar="PATH", help="also write every run's figures here")
    parser.add_argument(
        "overrides", nargs="*", help="extra Hydra overrides of the workload, e.g. seed=1"
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.repeats = 2, 1
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    if args.rounds < 2:
        parser.error("--rounds must be at least 2: round 1 warms up")
    return args


def pfl_available(python: str) -> bool:
    """Whether ``python`` imports pfl and tf_keras (pfl's own virtual environment)."""
    if not Path(python).exists():
        return False
    done = subprocess.run(
        [python, "-c", "import pfl, tf_keras"], capture_output=True, text=True, timeout=300
    )
    return done.returncode == 0


def write_workload(cfg: DictConfig, path: Path) -> dict[str, Any]:
    """Prepare the sites as fedad's run does and save what each peer trains and scores.

    fedad's own steps: the data preparation and Dirichlet partition
    (``prepare_run``), the shards (``prepare_sites``), the pooled scaling
    statistics of the sites' sums (the server's query), each site's
    standardized shard split into its training rows and local test slice
    (``load_site``), the standardized test set, and the initial weights of the
    server's model after seeding (``seed_initial``, ``initial_arrays``).
    """
    from fedad.data import scaling
    from fedad.federated import shards
    from fedad.federated.families.registry import family_for
    from fedad.federated.simulation import prepare_sites
    from fedad.federated.task import load_site

    prepared = prepare(cfg)
    data = prepared.data
    with tempfile.TemporaryDirectory(prefix="fedad-peers-shards-") as tmp:
        settings = prepare_sites(cfg, data, prepared.parts, Path(tmp))
        n = len(prepared.parts)
        sums = [
            scaling.site_sums(shards.read_shard(shards.shard_path(tmp, pid), "bench")[0])
            for pid in range(n)
        ]
        mean, std = scaling.pooled_moments(sums)
        config = {"scale-mean": mean.tolist(), "scale-std": std.tolist()}
        family = family_for(settings)
        arrays: dict[str, np.ndarray] = {}
        for pid in range(n):
            # load_site reads only the scaling entries of a round's config: a dict serves.
            site = load_site(settings, pid, config, family.val_fraction(), reader="bench")  # type: ignore[arg-type]
            arrays |= {
                f"site{pid}_X_train": site.X_train,
                f"site{pid}_y_train": site.y_train.astype(np.int64),
                f"site{pid}_X_test": site.X_test,
                f"site{pid}_y_test": site.y_test.astype(np.int64),
            }
        X_test, y_test = shards.read_shard(shards.test_path(tmp), "bench")
    family.seed_initial(int(cfg.seed))
    initial = family.initial_arrays()
    meta = {
        "sites": n,
        "arrays": len(initial),
        "rounds": int(cfg.simulation.num_rounds),
        "seed": int(cfg.seed),
        "model": {k: cfg.model[k] for k in ("filters", "kernel_size", "dense_units", "dropout")},
        "learning_rate": float(cfg.train.learning_rate),
        "optimizer": str(cfg.train.optimizer),
        "batch_size": int(cfg.train.batch_size),
        "local_epochs": int(cfg.train.local_epochs),
        "n_features": int(data.n_features),
        "class_names": list(data.class_names),
        "shard_rows": [len(p) for p in prepared.parts],
        "train_rows": [len(arrays[f"site{i}_y_train"]) for i in range(n)],
        "test_rows": len(y_test),
    }
    if meta["optimizer"] != "adam":
        raise SystemExit("the peers train with Adam, as fedad's default train.optimizer")
    arrays |= {
        "meta": np.asarray(json.dumps(meta)),
        "X_test": scaling.standardize(X_test, mean, std),
        "y_test": y_test.astype(np.int64),
        **{f"initial{j}": w for j, w in enumerate(initial)},
    }
    # NumPy's stub types **kwds as if one of them could be allow_pickle.
    np.savez(path, **arrays)  # type: ignore[arg-type]
    return meta


def run_system(
    name: str,
    args: argparse.Namespace,
    workload: Path,
    overrides: Sequence[str],
    meta: dict[str, Any],
    run_dir: Path,
) -> dict[str, Any]:
    """Launch one system in a fresh process tree; its figures, CPU read from ``/proc``.

    The steady round's CPU is every process the launch started (their
    children, Ray's daemons and workers, pfl's workers), not this one,
    from the start of round 2 to the end of the last round, per round.
    """
    scores = run_dir / "scores.npy"
    peer = ["--data", str(workload), "--scores", str(scores)]
    commands = {
        "fedad": [
            sys.executable,
            "-m",
            "fedad.simulate",
            *overrides,
            *FEDAD_ONLY,
            f"hydra.run.dir={run_dir / 'run'}",
        ],
        "flower": [sys.executable, str(PEERS / "flower_app.py"), *peer],
        "limit": [sys.executable, str(PEERS / "limit.py"), *peer],
        "pfl": [
            args.pfl_python,
            str(PEERS / "pfl_peer.py"),
            *peer,
            "--workers",
            str(args.pfl_workers),
        ],
    }
    log = run_dir / "output.log"
    with ProcessTree() as tree, log.open("w") as out:
        launched = time.time()
        command = commands[name]
        if name != "fedad":
            command = [*command, "--launched", repr(launched)]
        # A session of its own: on a timeout the whole tree it started goes, not only its root.
        process = subprocess.Popen(
            command, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            code = process.wait(timeout=args.timeout)
        except subprocess.TimeoutExpired:
            # SIGKILL: TensorFlow's multi-worker runtime catches SIGTERM and goes on.
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            raise SystemExit(f"{name} ran past {args.timeout:g} s; its output: {log}") from None
        exited = time.time()
    wait_for_exit(tree)
    if code:
        tail = "\n".join(log.read_text().splitlines()[-40:])
        raise SystemExit(f"{name} failed (exit {code}); its output ends:\n{tail}")
    if name == "fedad":
        figures = fedad_figures(run_dir / "run", launched, meta)
    else:
        figures = peer_figures(log, scores, workload, meta)
    rounds = figures["rounds"]
    steady_start = rounds[1]["started_at"]
    end = rounds[-1]["started_at"] + rounds[-1]["seconds"]
    cpu = tree.cpu_between(steady_start, end)
    figures["steady_cpu_s"] = (cpu["ray workers"] + cpu["other"]) / (len(rounds) - 1)
    total = tree.cpu_between(launched, exited)
    figures["total_cpu_s"] = total["ray workers"] + total["other"]
    figures["wall_s"] = exited - launched
    return figures


def fedad_figures(run_dir: Path, launched: float, meta: dict[str, Any]) -> dict[str, Any]:
    """Rounds from ``history.csv`` (``started_at``, ``seconds``), metrics from ``results.json``."""
    partition = pd.read_csv(run_dir / "partition.csv")
    if partition["n"].tolist() != meta["shard_rows"]:
        raise SystemExit(
            "fedad's sites differ from the workload file's: "
            f"{partition['n'].tolist()} rows against {meta['shard_rows']}"
        )
    history = pd.read_csv(run_dir / "history.csv")
    history = history[history["round"] >= 1].sort_values("round")
    rounds = [
        {
            "round": int(r["round"]),
            "started_at": float(r["started_at"]),
            "seconds": float(r["seconds"]),
        }
        for _, r in history.iterrows()
    ]
    results = json.loads((run_dir / "results.json").read_text())
    federated = next(m for m in results["models"].values() if m["kind"] == "federated")
    first = rounds[0]
    return {
        "rounds": rounds,
        "steady_round_s": float(np.mean([r["seconds"] for r in rounds[1:]])),
        "launch_to_round1_end_s": first["started_at"] + first["seconds"] - launched,
        "macro_f1": federated["macro_f1"],
        "roc_auc": federated["roc_auc"],
    }


def peer_figures(log: Path, scores: Path, workload: Path, meta: dict[str, Any]) -> dict[str, Any]:
    """The peer's JSON line; its macro-F1 and ROC-AUC rescored with fedad's own metrics."""
    from fedad.evaluation.metrics import compute_metrics

    lines = [line for line in log.read_text().splitlines() if line.startswith(RESULT_PREFIX)]
    if not lines:
        raise SystemExit(f"the peer printed no result line; its output: {log}")
    figures = json.loads(lines[-1][len(RESULT_PREFIX) :])
    with np.load(workload) as f:
        y_test = f["y_test"]
    full = compute_metrics(y_test, np.load(scores), meta["class_names"])
    # The peer's own NumPy figures must agree with fedad's: the same definitions.
    for key in ("macro_f1", "roc_auc"):
        if abs(figures[key] - full[key]) > 1e-6:
            raise SystemExit(f"{key}: the peer says {figures[key]}, fedad's metrics {full[key]}")
        figures[key] = full[key]
    return figures


def describe(figures: dict[str, Any]) -> str:
    """One run's figures on one line."""
    return ", ".join(f"{label} {fmt.format(figures[key])}" for key, label, fmt in FIGURES)


def print_table(runs: dict[str, list[dict]], args: argparse.Namespace) -> None:
    """Medians (and the range over the repeats) of each figure, one column a system."""
    names = [n for n in runs if runs[n]]
    print(
        f"\n10 sites, {args.rounds} rounds, every site every round; medians over "
        f"{args.repeats} repeat(s), [min-max] when repeated; steady = rounds 2-{args.rounds}; "
        "CPU counts every process a launch started"
    )
    width = 26
    print(f"{'':26}" + "".join(f"{LABELS[n]:>{width}}" for n in names))
    medians: dict[str, dict[str, float]] = {n: {} for n in names}
    for key, label, fmt in FIGURES:
        cells = []
        for n in names:
            values = [float(r[key]) for r in runs[n]]
            medians[n][key] = float(np.median(values))
            cell = fmt.format(medians[n][key])
            if len(values) > 1:
                cell += f" [{fmt.format(min(values))}-{fmt.format(max(values))}]"
            cells.append(f"{cell:>{width}}")
        print(f"{label:26}" + "".join(cells))
    if "fedad" not in medians:
        return
    fedad = medians["fedad"]
    if "pfl" in medians:
        ratio = fedad["steady_round_s"] / medians["pfl"]["steady_round_s"]
        print(
            f"steady round fedad / pfl-research: {ratio:.2f} "
            f"(target <= 1: {'met' if ratio <= 1 else 'missed'})"
        )
    else:
        print("steady round fedad / pfl-research: pfl-research did not run")
    if "limit" in medians:
        ratio = fedad["steady_cpu_s"] / medians["limit"]["steady_cpu_s"]
        print(
            f"steady round CPU fedad / limit: {ratio:.2f} "
            f"(target <= {TARGET_CPU}: {'met' if ratio <= TARGET_CPU else 'missed'})"
        )


if __name__ == "__main__":
    main()
