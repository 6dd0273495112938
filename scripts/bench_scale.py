"""Cost of fedad's simulation as the sites in existence grow, and as more of them are sampled."""

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

# Targets of the most sites against the fewest, both sampling the default number per round.
TARGETS = (
    ("steady_round_s", "per-round time", 1.2),
    ("peak_mb", "peak memory", 1.2),
    ("startup_s", "start-up", 2.0),
)
# Synthetic rows per site in existence: 48 training rows once 20 % are held out for testing.
ROWS_PER_SITE = 60
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
    biggest = max(n for n, _ in args.sizes)
    overrides = [
        f"dataset.n_rows={args.rows}",
        f"model={args.model}",
        f"simulation.num_rounds={args.rounds}",
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

    runs: dict[tuple[int, int], list[dict]] = {size: [] for size in args.sizes}
    # Sizes take turns, so a machine that slows down for a while slows them all alike.
    for repeat in range(1, args.repeats + 1):
        for n, sampled in args.sizes:
            runs[n, sampled].append(measure(overrides, data, parts[:n], sampled))
            print(
                f"repeat {repeat}, {n} sites, {sampled} sampled: steady-state round "
                f"{runs[n, sampled][-1]['steady_round_s']:.2f} s, "
                f"peak {runs[n, sampled][-1]['memory']}",
                flush=True,
            )
    results = {size: median_figures(runs[size]) for size in args.sizes}

    print(
        f"\n{args.rounds} rounds, model {args.model}, the sampled sites train and evaluate each "
        f"round; medians over {args.repeats} repeat(s)"
    )
    print(f"{'sites':30}" + "".join(f"{n:>10}" for n, _ in args.sizes))
    print(f"{'sampled per round':30}" + "".join(f"{k:>10}" for _, k in args.sizes))
    for key, label in FIGURES:
        print(f"{label:30}" + "".join(f"{results[size][key]:>10.2f}" for size in args.sizes))
    same = sorted(size for size in args.sizes if size[1] == args.sampled)
    small, big = same[0], same[-1]
    for key, label, target in TARGETS:
        ratio = results[big][key] / results[small][key]
        verdict = "met" if ratio <= target else "missed"
        print(
            f"{label}: {big[0]} sites / {small[0]} sites, {args.sampled} sampled = {ratio:.2f} "
            f"(target <= {target}: {verdict})"
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
            f"simulation.min_clients={sampled}",
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
    parser.add_argument(
        "--sites",
        type=site_count,
        nargs="+",
        default=[(10, None), (100, None), (1000, None), (10000, None), (1000, 100)],
        help="sites in existence per run: N, or N:K for K of them sampled per round "
        "(default: 10 100 1000 10000 1000:100)",
    )
    parser.add_argument("--sampled", type=int, default=10, help="sites per round of a bare N")
    add_run_arguments(
        parser,
        rounds=5,
        rows=None,
        repeats_help="runs of each size; the figures are their medians",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="test-suite size: 3 and 6 sites with 2 sampled, 6 with 3, 2 rounds, 3000 rows, "
        "1 repeat",
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.sites, args.sampled = [(3, None), (6, None), (6, 3)], 2
        args.rounds, args.rows, args.repeats = 2, 3000, 1
    check_run_arguments(parser, args)
    args.sizes = list(dict.fromkeys((n, k or args.sampled) for n, k in args.sites))
    if any(k > n for n, k in args.sizes):
        parser.error("a size cannot sample more sites than exist (N:K needs K <= N)")
    if not any(k == args.sampled for _, k in args.sizes):
        parser.error("--sites needs at least one N sampling --sampled sites")
    if args.rows is None:
        args.rows = ROWS_PER_SITE * max(n for n, _ in args.sizes)
    return args


def site_count(text: str) -> tuple[int, int | None]:
    """``N`` or ``N:K`` from the command line: N sites, K sampled (None: ``--sampled``)."""
    try:
        n, _, k = text.partition(":")
        size = (int(n), int(k) if k else None)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected N or N:K (whole numbers), got {text!r}"
        ) from None
    if size[0] < 1 or (size[1] is not None and size[1] < 1):
        raise argparse.ArgumentTypeError(f"sites and sampled sites must be at least 1: {text!r}")
    return size


if __name__ == "__main__":
    main()
