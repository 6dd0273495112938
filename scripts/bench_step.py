"""Seconds per local epoch of a site: Keras' fit against fedad's compiled step, per site size."""

from __future__ import annotations

import argparse
import time

import numpy as np
from benchlib import machine

from fedad.config import compose, make_settings
from fedad.data.prepared import PreparedData
from fedad.federated.families.classifier import init_runtime, local_model, start_local, train_local


def main(argv: list[str] | None = None) -> None:
    """Print fit's and the compiled step's seconds per epoch (the median of the repeats)."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, nargs="+", default=[2_000, 20_000])
    parser.add_argument("--features", type=int, default=40)
    parser.add_argument("--model", default="cnn", choices=("cnn", "logistic", "mlp"))
    parser.add_argument("--epochs", type=int, default=3, help="epochs per timed call")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    print(f"machine: {machine()}")
    print(f"model={args.model}, {args.features} features, batch 64, one TensorFlow thread")
    print(f"{'rows':>8} {'fit s/epoch':>12} {'compiled s/epoch':>17} {'speed-up':>9}")
    for rows in args.rows:
        fit, compiled = time_both(rows, args.features, args.model, args.epochs, args.repeats)
        print(f"{rows:>8} {fit:>12.4f} {compiled:>17.4f} {fit / compiled:>8.1f}x")


def time_both(
    rows: int, features: int, model: str, epochs: int, repeats: int
) -> tuple[float, float]:
    """Median seconds per epoch of Keras' fit and of :func:`train_local`, one warm-up call each."""
    rng = np.random.default_rng(0)
    X = rng.normal(size=(rows, features)).astype(np.float32)
    y = (X[:, 0] > 0.5).astype(np.int64)
    names = [f"f{i}" for i in range(features)]
    data = PreparedData(X, y, X[:10], y[:10], names, ["normal", "attack"], "binary")
    cfg = compose([f"model={model}", f"train.local_epochs={epochs}", "train.batch_size=64"])
    settings = {**make_settings(cfg, data, 1, "."), "client-threads": 1}
    init_runtime(settings)
    net = local_model(settings)
    start = net.get_weights()

    def by_fit() -> None:
        # What train_local ran before the compiled step: Keras' fit, shuffling each epoch.
        start_local(net, start, settings, 0.0, seed=1)
        net.fit(X, y, batch_size=64, epochs=epochs, shuffle=True, verbose=0)

    def by_step() -> None:
        train_local(net, start, X, y, settings, mu=0.0, seed=1)

    timings: dict[str, list[float]] = {"fit": [], "step": []}
    for i in range(repeats + 1):
        for name, run in (("fit", by_fit), ("step", by_step)):
            began = time.perf_counter()
            run()
            if i:  # the first call of each traces its functions
                timings[name].append((time.perf_counter() - began) / epochs)
    return float(np.median(timings["fit"])), float(np.median(timings["step"]))


if __name__ == "__main__":
    main()
