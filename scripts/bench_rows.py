"""Cost of one whole run as the rows grow: each step's time and peak memory, per size."""

from __future__ import annotations

import argparse
import functools
import importlib
import json
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

from benchlib import FEWER_TREES, ProcessTree, load, machine

from fedad.config import available_options, compose

FULL_ROWS = 1_048_575
# A step may cost at most 11 x at 1,048,575 rows what it costs at 100,000: 1.05 x the rows.
GROWTH = 11 / (FULL_ROWS / 100_000)
TARGET_S, TARGET_MB = 15 * 60, 6 * 1024
# The baselines' own time outside each baseline: scaling the data, the detectors' splits.
BASELINES = "baselines: scaling, splits"
# (module, function, step): the functions a run calls, wrapped in the module that looks them up,
# so they are timed from outside fedad's code. A step's time excludes the steps nested in it
# (reading inside preparing); its peak memory includes them.
STEPS = (
    ("fedad.data.sources", "load", "read/generate"),
    ("fedad.run.pipeline", "prepare", "prepare"),
    ("fedad.data.audit", "single_feature_auc", "audit"),
    ("fedad.simulate", "prepare_run", "partition and shards"),
    ("fedad.federated.shards", "write_shards", "partition and shards"),
    ("fedad.federated.simulation", "run_federated", "federated training"),
    ("fedad.simulate", "run_baselines", BASELINES),
    ("fedad.simulate", "explain", "explanations"),
    ("fedad.simulate", "explain_shap", "explanations"),
    ("fedad.simulate", "plot_roc", "figures and outputs"),
    ("fedad.simulate", "plot_confusion", "figures and outputs"),
)
# The run's own time outside every step above: validation, results.json, comparison tables.
REST = "figures and outputs"
WHOLE = "whole run"


def main(argv: list[str] | None = None) -> None:
    """Run the whole pipeline at each size, each in a fresh process; print steps and ratios."""
    args = parse_args(argv)
    overrides = [
        "dataset=synthetic_ciciot",
        "task=multiclass",
        "simulation.num_clients=10",
        "partition=dirichlet",
        "partition.alpha=0.5",
        f"model={args.model}",
        f"simulation.num_rounds={args.rounds}",
        "baselines=all",
        "explain=true",
        *args.overrides,
    ]
    if args.one:
        print(json.dumps(run_one(args.one, overrides)))
        return
    print(f"machine: {machine()}")
    print(f"config: {' '.join(overrides)}")
    sizes: dict[int, dict] = {}
    for rows in args.rows:
        command = [sys.executable, __file__, "--one", str(rows), *argv_of(args)]
        done = subprocess.run(command, check=True, stdout=subprocess.PIPE, text=True)
        sizes[rows] = json.loads(done.stdout.strip().splitlines()[-1])
        whole = sizes[rows][WHOLE]
        print(
            f"{rows} rows: whole run {whole['seconds']:.1f} s, peak {sizes[rows]['memory']}",
            flush=True,
        )
        if len(args.rows) > 1:
            # Each size's steps as soon as it is done: a run cut short keeps what it measured.
            report({rows: sizes[rows]})
            sys.stdout.flush()
    report(sizes)
    print(load())


def argv_of(args: argparse.Namespace) -> list[str]:
    """The arguments a child process needs to run one size as this one would."""
    return ["--rounds", str(args.rounds), "--model", args.model, *args.overrides]


def run_one(rows: int, overrides: list[str]) -> dict:
    """One whole run of ``fedad.simulate`` at ``rows`` rows in this process; its step figures."""
    from fedad.simulate import run

    cfg = compose([*overrides, f"dataset.n_rows={rows}"])
    steps = Steps()
    with tempfile.TemporaryDirectory(prefix="fedad-rows-") as tmp, ProcessTree() as tree, steps:
        started = time.time()
        run(cfg, Path(tmp) / "run")
        ended = time.time()
        steps.record(REST, started, ended)
    figures = {
        label: {"seconds": seconds, "peak_mb": steps.peak(label, tree)}
        for label, seconds in steps.self_seconds().items()
    }
    figures[WHOLE] = {"seconds": ended - started, "peak_mb": tree.peak_mb}
    return {"steps": list(figures), "memory": tree.describe(), **figures}


class Steps:
    """Intervals of the functions a run calls, recorded by wrapping them where they are looked up.

    Each baseline runs from its first fit call to the creation of its result, so
    its prediction on the test set and any cross-validation count with it; so
    does its validation refit, which follows its result.
    """

    def __init__(self) -> None:
        self.intervals: list[tuple[str, float, float]] = []
        self._undo: list[tuple[object, str, object]] = []
        self._baseline: tuple[str, float] | None = None

    def __enter__(self) -> Steps:
        for module, name, label in STEPS:
            self._wrap(module, name, functools.partial(self._timed, label))
        for name in ("fit_supervised", "fit_detector"):
            self._wrap("fedad.baselines.runner", name, self._baseline_started)
        self._wrap("fedad.baselines.runner", "ModelResult", self._baseline_ended)
        return self

    def __exit__(self, *exc: object) -> None:
        for module, name, original in reversed(self._undo):
            setattr(module, name, original)

    def record(self, label: str, start: float, end: float) -> None:
        """Add one interval of step ``label``."""
        self.intervals.append((label, start, end))

    def self_seconds(self) -> dict[str, float]:
        """Seconds of each step, less the steps nested in it, in the order the steps began."""
        out: dict[str, float] = defaultdict(float)
        for label, start, end in sorted(self.intervals, key=lambda i: i[1]):
            inner = [(s, e) for _, s, e in self.intervals if start <= s and e <= end]
            inner.remove((start, end))
            direct = [
                (s, e)
                for s, e in inner
                if not any((s2, e2) != (s, e) and s2 <= s and e <= e2 for s2, e2 in inner)
            ]
            out[label] += (end - start) - sum(e - s for s, e in direct)
        return dict(out)

    def peak(self, label: str, tree: ProcessTree) -> float:
        """Largest memory (MB) of the process tree sampled while step ``label`` ran."""
        return max(tree.peak_between(s, e) for name, s, e in self.intervals if name == label)

    def _wrap(self, module_name: str, name: str, wrapper: Callable) -> None:
        module = importlib.import_module(module_name)
        original = getattr(module, name)
        self._undo.append((module, name, original))
        setattr(module, name, functools.partial(wrapper, original))

    def _timed(self, label: str, original: Callable, *args: object, **kwargs: object) -> object:
        start = time.time()
        try:
            return original(*args, **kwargs)
        finally:
            if label == BASELINES:
                self._close_baseline()
            self.record(label, start, time.time())

    def _baseline_started(self, original: Callable, *args: object, **kwargs: object) -> object:
        label = f"baseline {args[0]}"
        # A baseline's validation refit (detector selection) comes after its result and
        # counts with it, up to the next baseline's first fit.
        if self._baseline is not None and self._baseline[0] != label:
            self._close_baseline()
        if self._baseline is None:
            self._baseline = (label, time.time())
        return original(*args, **kwargs)

    def _baseline_ended(self, original: Callable, *args: object, **kwargs: object) -> object:
        self._close_baseline()
        return original(*args, **kwargs)

    def _close_baseline(self) -> None:
        if self._baseline is not None:
            self.record(*self._baseline, time.time())
            self._baseline = None


def report(sizes: dict[int, dict]) -> None:
    """Print each step's seconds and peak memory per size, and its growth, smallest to largest."""
    rows = sorted(sizes)
    small, big = rows[0], rows[-1]
    limit = GROWTH * big / small
    labels = sorted(dict.fromkeys(label for n in rows for label in sizes[n]["steps"]), key=place)
    head = "".join(f"{n:>10}" for n in rows)
    print("\nseconds, then peak memory MB (the whole process tree, Ray included), per rows")
    growth = f"  | time {big}/{small}" if big > small else ""
    print(f"{'step':32}{head}  |{head}{growth}")
    over = []
    for label in labels:
        cells = [sizes[n].get(label, {"seconds": 0.0, "peak_mb": 0.0}) for n in rows]
        seconds = "".join(f"{c['seconds']:>10.1f}" for c in cells)
        peaks = "".join(f"{c['peak_mb']:>10.0f}" for c in cells)
        ratio = cells[-1]["seconds"] / cells[0]["seconds"] if cells[0]["seconds"] else float("nan")
        if ratio > limit:
            over.append(label)
        print(f"{label:32}{seconds}  |{peaks}" + (f"  | {ratio:8.2f}" if growth else ""))
    if big > small:
        print(
            f"steps growing more than {limit:.2f} x from {small} to {big} rows (11 x from "
            f"100,000 to 1,048,575): {', '.join(over) or 'none'}"
        )
    whole = sizes[big][WHOLE]
    for figure, value, target, unit in (
        ("whole run", whole["seconds"], TARGET_S, "s"),
        ("peak memory", whole["peak_mb"], TARGET_MB, "MB"),
    ):
        verdict = "met" if value <= target else "missed"
        print(
            f"{figure} at {big} rows: {value:.0f} {unit} "
            f"(target at 1,048,575 rows <= {target} {unit}: {verdict})"
        )


def place(label: str) -> float:
    """Where a step comes in a run: each baseline with the baselines, the whole run last."""
    order = [step for _, _, step in STEPS]
    if label == WHOLE:
        return len(order)
    if label.startswith("baseline "):
        return order.index(BASELINES) + 0.5
    return order.index(label)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, nargs="+", default=[100_000, 300_000, FULL_ROWS])
    parser.add_argument("--rounds", type=int, default=10)
    # The MLP: the CNN's training at a million rows is the costlier of the two the issue names.
    parser.add_argument("--model", default="mlp", choices=available_options("model"))
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)
    parser.add_argument(
        "--quick",
        action="store_true",
        help="test-suite size: 3,000 and 6,000 rows, 2 rounds, 20 trees per ensemble",
    )
    parser.add_argument(
        "overrides", nargs="*", help="extra Hydra overrides, e.g. baselines=supervised"
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.rows, args.rounds = [3_000, 6_000], 2
        args.overrides = [*FEWER_TREES, *args.overrides]
    return args


if __name__ == "__main__":
    main()
