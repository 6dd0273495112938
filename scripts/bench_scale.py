"""Cost of fedad's simulation as the number of sites grows while the sampled number stays fixed."""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from benchlib import (
    add_run_arguments,
    check_run_arguments,
    load,
    machine,
    measure_simulation,
    median_figures,
    prepare,
)

from fedad.config import compose
from fedad.data.prepared import PreparedData
from fedad.federated import shards

TARGET = 1.2
FIGURES = (
    ("shards_s", "write shards s"),
    ("startup_s", "start-up s (to round 1)"),
    ("first_round_s", "round 1 s"),
    ("steady_round_s", "steady-state round s"),
    ("steady_cpu_s", "steady-state round CPU s"),
    ("cpu_driver", "  of which driver"),
    ("cpu_ray workers", "  of which Ray workers"),
    ("cpu_other", "  of which Ray daemons"),
    ("after_rounds_s", "all-site evaluation + stop s"),
    ("total_s", "total wall s"),
    ("rounds_peak_mb", "peak memory in rounds MB"),
    ("peak_mb", "peak memory MB"),
)


def main(argv: list[str] | None = None) -> None:
    """Run the same rounds with more and more sites in existence; print the figures per size."""
    args = parse_args(argv)
    biggest = max(args.sites)
    overrides = [
        f"dataset.n_rows={args.rows}",
        f"model={args.model}",
        f"simulation.num_rounds={args.rounds}",
        f"simulation.min_clients={args.sampled}",
        "partition=iid",
        "partition.min_size=1",
        *args.overrides,
    ]
    print(f"machine: {machine()}")
    print(f"config: {' '.join(overrides)}")
    # One partition into the most sites; a smaller run keeps its first sites, so every run
    # samples from sites with the same shards and only the number in existence changes.
    prepared = prepare(compose([*overrides, f"simulation.num_clients={biggest}"]))
    data, parts = prepared.data, prepared.parts
    sizes = [len(p) for p in parts]
    print(f"{len(data.y_train)} training rows over {biggest} sites: {min(sizes)}-{max(sizes)} each")

    runs: dict[int, list[dict]] = {n: [] for n in args.sites}
    # Sizes take turns, so a machine that slows down for a while slows them all alike.
    for repeat in range(1, args.repeats + 1):
        for n in args.sites:
            runs[n].append(measure(overrides, data, parts[:n], args.sampled))
            print(
                f"repeat {repeat}, {n} sites: steady-state round "
                f"{runs[n][-1]['steady_round_s']:.2f} s, peak {runs[n][-1]['memory']}",
                flush=True,
            )
    results = {n: median_figures(runs[n]) for n in args.sites}

    print(
        f"\n{args.sampled} sites sampled per round (train and evaluate), {args.rounds} rounds, "
        f"model {args.model}; medians over {args.repeats} repeat(s)"
    )
    print(f"{'sites':30}" + "".join(f"{n:>10}" for n in args.sites))
    for key, label in FIGURES:
        print(f"{label:30}" + "".join(f"{results[n][key]:>10.2f}" for n in args.sites))
    smallest = min(args.sites)
    for key, label in (("steady_round_s", "per-round time"), ("peak_mb", "peak memory")):
        ratio = results[biggest][key] / results[smallest][key]
        verdict = "met" if ratio <= TARGET else "missed"
        print(
            f"{label}: {biggest} sites / {smallest} sites = {ratio:.2f} "
            f"(target <= {TARGET}: {verdict})"
        )
    print(load())


def measure(overrides: list[str], data: PreparedData, parts: list, sampled: int) -> dict:
    """Write the shards, then run the simulation over ``parts``; its figures."""
    n = len(parts)
    cfg = compose(
        [
            *overrides,
            f"simulation.num_clients={n}",
            f"simulation.fraction_train={sampled / n}",
            f"simulation.fraction_evaluate={sampled / n}",
        ]
    )
    with tempfile.TemporaryDirectory(prefix="fedad-scale-") as tmp:
        started = time.time()
        shards.write_shards(data, parts, Path(tmp) / "timing")
        shards_s = time.time() - started
        figures = measure_simulation(cfg, data, parts, Path(tmp) / "run")
    cpu = {f"cpu_{part}": v for part, v in figures["steady_cpu_parts_s"].items()}
    return {"shards_s": shards_s, **figures, **cpu}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sites", type=int, nargs="+", default=[10, 100, 1000])
    parser.add_argument("--sampled", type=int, default=10, help="sites per round")
    add_run_arguments(
        parser,
        rounds=5,
        rows=60000,
        repeats_help="runs of each size; the figures are their medians",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="test-suite size: 3 and 6 sites, 2 sampled, 2 rounds, 3000 rows, 1 repeat",
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.sites, args.sampled, args.rounds, args.rows, args.repeats = [3, 6], 2, 2, 3000, 1
    check_run_arguments(parser, args)
    if args.sampled > min(args.sites):
        parser.error("--sampled must not exceed the smallest --sites")
    return args


if __name__ == "__main__":
    main()
