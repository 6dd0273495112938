"""Helpers shared by the benchmark scripts: fedad's config, the data, the machine, peak memory."""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd
from omegaconf import DictConfig

REPO = Path(__file__).resolve().parents[1]
MB = 2**20
# --quick runs of the scripts that fit the baselines: 20 trees per ensemble, not hundreds.
FEWER_TREES = [
    f"baselines.models.{name}.n_estimators=20"
    for name in ("random_forest", "xgboost", "isolation_forest")
]
# The scripts measure the fedad of the checkout they are in, whichever one is installed;
# Ray's workers get this path too (see fedad.federated.engine).
sys.path.insert(0, str(REPO))

from fedad.run.pipeline import RunData, prepare_run  # noqa: E402

if TYPE_CHECKING:
    from fedad.data.prepared import PreparedData


def add_run_arguments(
    parser: argparse.ArgumentParser, rounds: int, rows: int | None, repeats_help: str
) -> None:
    """Add the arguments both simulation benchmarks take (defaults differ per script).

    ``rows`` None leaves the default to the script, once it knows the sizes it runs.
    """
    parser.add_argument(
        "--rounds", type=int, default=rounds, help="round 1 warms up; 2.. are steady"
    )
    parser.add_argument("--rows", type=int, default=rows, help="synthetic rows before the split")
    parser.add_argument("--model", default="cnn", choices=("cnn", "logistic"))
    parser.add_argument("--repeats", type=int, default=3, help=repeats_help)
    parser.add_argument(
        "overrides", nargs="*", help="extra Hydra overrides, e.g. train.batch_size=32"
    )


def check_run_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse (exit 2) the values of :func:`add_run_arguments` a measurement cannot use."""
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    if args.rounds < 2:
        parser.error("--rounds must be at least 2: round 1 warms up")


def prepare(cfg: DictConfig) -> RunData:
    """The data preparation and partition of fedad for ``cfg``, as a run does them."""
    with tempfile.TemporaryDirectory(prefix="fedad-bench-data-") as tmp:
        return prepare_run(cfg, Path(tmp))


def machine() -> str:
    """One line naming the cores, memory, CPU model, versions and the current load."""
    model = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    versions = ", ".join(
        f"{name} {_version(name)}"
        for name in ("flwr", "ray", "tensorflow", "keras", "scikit-learn", "xgboost")
    )
    return (
        f"{os.cpu_count()} cores ({model}), {memory:.1f} GiB RAM; Python "
        f"{platform.python_version()}, {versions}; {_code()}; "
        f"load average {os.getloadavg()[0]:.2f}"
    )


def _code() -> str:
    """Which fedad runs: its folder and git commit, ``+changes`` if the work tree differs."""
    import fedad

    folder = Path(fedad.__file__).resolve().parents[1]

    def git(*args: str) -> str:
        done = subprocess.run(["git", "-C", str(folder), *args], capture_output=True, text=True)
        return done.stdout.strip()

    commit = git("rev-parse", "--short", "HEAD") or "no git"
    changed = "+changes" if git("status", "--porcelain", "--untracked-files=no") else ""
    return f"fedad from {folder} at {commit}{changed}"


def load() -> str:
    """The 1, 5 and 15-minute load averages, for a line printed when a benchmark ends."""
    return "load average at the end: " + " ".join(f"{x:.2f}" for x in os.getloadavg())


def _version(name: str) -> str:
    # TensorFlow installs as tensorflow-cpu on x86-64 (see pyproject.toml).
    for dist in (name, f"{name}-cpu"):
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return "absent"


class ProcessTree:
    """Sample the memory and CPU time of this process and all its descendants.

    A background thread reads ``/proc`` every ``interval`` seconds and sums
    the resident set size (RSS) over the process tree; the largest sum is
    the peak. Ray's daemons (``gcs_server``, ``raylet``, its agents and
    helpers) and its worker processes descend from the process that started
    Ray, so they count. Pages shared between processes (the TensorFlow
    library in every worker) count once per process, as ``ps`` and ``top``
    show them. The thread also accumulates the CPU seconds the tree used.

    Use as a context manager; :attr:`peak_mb` and :attr:`parts_mb` (this
    process, Ray workers, other descendants at the peak) are set on exit,
    and :meth:`cpu_between` and :meth:`peak_between` look at a stretch of it.
    """

    PARTS = ("driver", "ray workers", "other")

    def __init__(self, interval: float = 0.2) -> None:
        self.interval = interval
        self.peak_mb = 0.0
        self.parts_mb: dict[str, float] = {}
        # (time.time(), CPU seconds so far per part, RSS MB) per sample.
        self.samples: list[tuple[float, dict[str, float], float]] = []
        self._cpu_seen: dict[int, float] = {}
        self._cpu = dict.fromkeys(self.PARTS, 0.0)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> ProcessTree:
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()

    @property
    def seen(self) -> set[int]:
        """Every process id sampled in the tree."""
        return set(self._cpu_seen)

    def cpu_between(self, start: float, end: float) -> dict[str, float]:
        """CPU seconds each part of the tree used between two ``time.time()`` instants.

        Parts: this process (``driver``), ``ray workers`` and ``other``
        descendants (Ray's daemons); read at the samples nearest the instants.
        """
        first, last = self._nearest(start)[1], self._nearest(end)[1]
        return {part: last[part] - first[part] for part in self.PARTS}

    def peak_between(self, start: float, end: float) -> float:
        """Largest RSS sum (MB) sampled between two ``time.time()`` instants."""
        inside = [mb for t, _, mb in self.samples if start <= t <= end]
        return max(inside, default=self.rss_at(start))

    def rss_at(self, instant: float) -> float:
        """RSS sum (MB) of the sample nearest to a ``time.time()`` instant."""
        return self._nearest(instant)[2]

    def describe(self) -> str:
        """``1234 MB (driver 600, ray workers 500, other 134)``."""
        parts = ", ".join(f"{k} {v:.0f}" for k, v in self.parts_mb.items())
        return f"{self.peak_mb:.0f} MB ({parts})"

    def _nearest(self, instant: float) -> tuple[float, dict[str, float], float]:
        return min(self.samples, key=lambda sample: abs(sample[0] - instant))

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def _sample(self) -> None:
        now = time.time()
        processes = _processes()
        children: dict[int, list[int]] = {}
        for pid, (_, ppid, _, _) in processes.items():
            children.setdefault(ppid, []).append(pid)
        root = os.getpid()
        parts = dict.fromkeys(self.PARTS, 0.0)
        stack = [root]
        while stack:
            pid = stack.pop()
            name, _, rss, cpu = processes[pid]
            worker = name.startswith("ray::") and not name.endswith("Agent")
            part = "driver" if pid == root else "ray workers" if worker else "other"
            parts[part] += rss
            self._cpu[part] += cpu - self._cpu_seen.get(pid, 0.0)
            self._cpu_seen[pid] = cpu
            stack += children.get(pid, [])
        total = sum(parts.values())
        self.samples.append((now, dict(self._cpu), total))
        if total > self.peak_mb:
            self.peak_mb, self.parts_mb = total, parts


def wait_for_exit(tree: ProcessTree, timeout: float = 60.0) -> float:
    """Wait until every process ``tree`` saw, but this one, has ended; return the seconds waited.

    Ray's daemons and workers take a while to exit after ``ray.shutdown()``
    (and may have been re-parented by then); a measurement started meanwhile
    shares the cores with them.
    """
    started = time.time()
    others = set(tree.seen) - {os.getpid()}
    while others & _processes().keys() and time.time() - started < timeout:
        time.sleep(0.1)
    return time.time() - started


def median_figures(runs: Sequence[dict]) -> dict:
    """The median of each numeric figure over repeated runs (nested dicts too).

    Other entries (text) come from the first run.
    """
    first = runs[0]
    out = {}
    for key, value in first.items():
        if isinstance(value, dict):
            out[key] = median_figures([run[key] for run in runs])
        elif isinstance(value, int | float):
            out[key] = float(pd.Series([run[key] for run in runs]).median())
        else:
            out[key] = value
    return out


def measure_simulation(cfg: DictConfig, data: PreparedData, parts: Sequence, run_dir: Path) -> dict:
    """Run fedad's simulation in this process; :func:`summarize` its figures.

    Waits for Ray's processes to exit before returning, so what is measured
    next does not share the cores with them.
    """
    from fedad.federated.simulation import run_federated

    with ProcessTree() as tree:
        called = time.time()
        result = run_federated(cfg, data, parts, run_dir)[0]
        finished = time.time()
    wait_for_exit(tree)
    rounds = result.history.set_index("round").loc[1:, ["started_at", "seconds"]]
    return summarize(rounds, called, finished, tree)


def measure_launch(cfg: DictConfig, run_dir: Path) -> tuple[dict, RunData]:
    """A run started as ``python -m fedad.simulate`` starts it; its figures and its data.

    Ray and the actors start (:func:`fedad.federated.simulation.start_engine`)
    while the data is prepared and partitioned, then the simulation runs:
    start-up counts from the launch. ``prepare_s`` is the preparation's time
    in this run (sharing the cores with the start).
    """
    from fedad.federated.simulation import run_federated, start_engine

    with ProcessTree() as tree:
        called = time.time()
        started = start_engine(cfg)
        try:
            prepared = prepare(cfg)
            prepared_at = time.time()
            result = run_federated(cfg, prepared.data, prepared.parts, run_dir, started=started)[0]
        finally:
            started.close()
        finished = time.time()
    wait_for_exit(tree)
    rounds = result.history.set_index("round").loc[1:, ["started_at", "seconds"]]
    return {
        **summarize(rounds, called, finished, tree),
        "prepare_s": prepared_at - called,
    }, prepared


def measure_engine_start(cfg: DictConfig) -> float:
    """Seconds from starting Ray and ``cfg``'s actors to every actor ready, nothing else running."""
    from fedad.federated.simulation import start_engine

    with ProcessTree(interval=1.0) as tree:
        started = start_engine(cfg)
        try:
            seconds = started.wait_ready()
        finally:
            started.close()
    wait_for_exit(tree)
    return seconds


def summarize(rounds: pd.DataFrame, called: float, finished: float, tree: ProcessTree) -> dict:
    """Figures of one run from its rounds (index 1..R with ``started_at`` and ``seconds``).

    Start-up runs from ``called`` to the start of round 1; steady state is
    the mean over rounds 2..R (round 1 traces the model's functions in every
    process); ``after_rounds_s`` runs from the end of the last round to
    ``finished``. CPU and memory count every process of the tree.
    """
    steady = rounds.loc[2:]
    first_start = float(rounds.loc[1, "started_at"])
    end = float(rounds["started_at"].iloc[-1] + rounds["seconds"].iloc[-1])
    cpu = tree.cpu_between(float(steady["started_at"].iloc[0]), end)
    return {
        "startup_s": first_start - called,
        "first_round_s": float(rounds.loc[1, "seconds"]),
        "steady_round_s": float(steady["seconds"].mean()),
        "steady_cpu_s": sum(cpu.values()) / len(steady),
        "steady_cpu_parts_s": {part: v / len(steady) for part, v in cpu.items()},
        "after_rounds_s": finished - end,
        "total_s": finished - called,
        "rounds_peak_mb": tree.peak_between(first_start, end),
        "peak_mb": tree.peak_mb,
        "memory": tree.describe(),
    }


def _processes() -> dict[int, tuple[str, int, float, float]]:
    """``pid -> (name, parent pid, RSS MB, CPU s)`` for every process in ``/proc``."""
    page_mb = os.sysconf("SC_PAGE_SIZE") / MB
    tick = os.sysconf("SC_CLK_TCK")
    out = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
        except OSError:  # ended while listing
            continue
        # The name sits in parentheses and may hold spaces; the fields after it are plain.
        name = stat[stat.index("(") + 1 : stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2 :].split()
        cpu = (int(fields[11]) + int(fields[12])) / tick
        out[int(entry.name)] = (name, int(fields[1]), int(fields[21]) * page_mb, cpu)
    return out
