"""The in-process limit: FedAvg over the workload's sites in one process, no engine."""

from __future__ import annotations

import time

# Taken before the imports: TensorFlow's import is part of the start-up the limit is charged.
STARTED = time.time()

import argparse  # noqa: E402

import common  # noqa: E402
import numpy as np  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    """Each round: train every site in turn, average by rows, score every site and the test set."""
    parser = argparse.ArgumentParser(description=__doc__)
    common.add_arguments(parser)
    args = parser.parse_args(argv)
    launched = args.launched or STARTED

    import tensorflow as tf

    common.set_threads(tf)
    import keras

    work = common.load_workload(args.data)
    meta = work.meta
    steps = common.CompiledSteps(tf, keras, common.build_cnn(keras, meta))
    seed = int(meta["seed"])
    weights = [w.copy() for w in work.initial]
    clock = common.RoundClock()
    clock.start()
    for rnd in range(1, work.rounds + 1):
        updates, counts = [], []
        for pid, site in enumerate(work.sites):
            # fedad's per-site, per-round seed (fedad/federated/client_app.py).
            updates.append(steps.fit(weights, site, meta, seed + 1000 * rnd + pid))
            counts.append(len(site.y_train))
        weights = common.weighted_mean(updates, counts)
        steps.model.set_weights(weights)
        for site in work.sites:
            common.loss_and_accuracy(
                site.y_test, steps.predict(None, site.X_test, common.SITE_EVAL_BATCH)
            )
        probabilities = steps.predict(None, work.X_test, common.SERVER_EVAL_BATCH)
        common.loss_and_accuracy(work.y_test, probabilities)
        clock.lap()
    probabilities = steps.predict(weights, work.X_test, common.SERVER_EVAL_BATCH)
    common.emit(
        common.result(
            "limit",
            clock,
            launched,
            np.asarray(probabilities),
            work.y_test,
            args.scores,
            processes=1,
        )
    )


if __name__ == "__main__":
    main()
