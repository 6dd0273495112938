"""Time and peak memory of each centralized baseline on synthetic data of growing size."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

from benchlib import FEWER_TREES, ProcessTree, load, machine, prepare
from omegaconf import OmegaConf

from fedad.baselines.runner import run_baselines
from fedad.baselines.supervised import SUPERVISED_DEFAULTS
from fedad.config import available_options, compose, load_option

# (figure, column label, decimals): a one-class SVM on a few thousand rows fits in 0.05 s.
COLUMNS = (
    ("prepare_s", "prepare s", 2),
    ("fit_s", "fit s", 2),
    ("score_s", "score s", 2),
    ("data_mb", "MB before fit", 0),
    ("peak_mb", "peak MB", 0),
)


def main(argv: list[str] | None = None) -> None:
    """Fit each baseline of ``conf/baselines/all.yaml`` per size, each in a fresh process."""
    args = parse_args(argv)
    overrides = ["baselines=all", "federated=false", *args.overrides]
    if args.one:
        print(json.dumps(fit_one(args.one, args.rows[0], args.epochs, overrides)))
        return
    print(f"machine: {machine()}")
    print(f"config: {' '.join(overrides)}; central Keras models: {args.epochs} epochs")
    models = args.models or list(compose(overrides).baselines.models)
    print(f"{'rows':>8} {'model':22}" + "".join(f"{label:>15}" for _, label, _ in COLUMNS))
    for rows in args.rows:
        for name in models:
            command = [
                sys.executable,
                __file__,
                "--one",
                name,
                "--rows",
                str(rows),
                "--epochs",
                str(args.epochs),
                *args.overrides,
            ]
            done = subprocess.run(command, check=True, capture_output=True, text=True)
            figures = json.loads(done.stdout.strip().splitlines()[-1])
            cells = "".join(f"{figures[key]:>15.{digits}f}" for key, _, digits in COLUMNS)
            print(f"{rows:>8} {name:22}{cells}", flush=True)
    print(load())


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--rows",
        type=int,
        nargs="+",
        default=[25000, 100000, 150000],
        help="synthetic rows before the 80/20 train/test split",
    )
    parser.add_argument("--models", nargs="+", help="baselines to run (default: all of them)")
    parser.add_argument("--epochs", type=int, default=5, help="epochs of the central Keras models")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="test-suite size: 2000 rows, 1 epoch, 20 trees per ensemble",
    )
    parser.add_argument("--one", metavar="MODEL", help=argparse.SUPPRESS)
    parser.add_argument(
        "overrides", nargs="*", help="extra Hydra overrides, e.g. train.batch_size=128"
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.rows, args.epochs = [2000], 1
        args.overrides = [*FEWER_TREES, *args.overrides]
    return args


def fit_one(name: str, rows: int, epochs: int, overrides: list[str]) -> dict[str, float]:
    """Prepare the data, then fit and score one baseline as ``python -m fedad.simulate`` does.

    Returns the seconds to prepare, fit and score, this process's RSS before
    the fit (interpreter, libraries, data) and its peak RSS over the fit and
    scoring, in MB; child processes (joblib workers) count too. For the
    central Keras models TensorFlow is imported before the fit, as it is in
    a run that also trains the federated model, so its import is not fit time.
    """
    if "model" in SUPERVISED_DEFAULTS.get(name, {}):
        import keras  # noqa: F401

    cfg = compose([*overrides, f"dataset.n_rows={rows}"])
    selected = OmegaConf.masked_copy(cfg.baselines.models, [name])
    cfg.baselines.models = selected
    model_cfgs = {name: load_option("model", name) for name in available_options("model")}
    with ProcessTree(interval=0.05) as tree:
        started = time.time()
        data = prepare(cfg).data
        fitting = time.time()
        (result,) = run_baselines(
            cfg.baselines,
            data,
            cfg.train,
            keras_epochs=epochs,
            seed=int(cfg.seed),
            model_cfgs=model_cfgs,
        )
        finished = time.time()
    return {
        "prepare_s": fitting - started,
        "fit_s": result.train_seconds,
        "score_s": finished - fitting - result.train_seconds,
        "data_mb": tree.rss_at(fitting),
        "peak_mb": max(tree.rss_at(fitting), tree.peak_between(fitting, finished)),
    }


if __name__ == "__main__":
    main()
