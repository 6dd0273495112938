"""A plain Flower app (the quickstart pattern) on the Simulation Engine: FedAvg, an actor a core."""

from __future__ import annotations

import time

# Taken before the imports: Flower's, Ray's and TensorFlow's imports are part of the start-up.
STARTED = time.time()

import argparse  # noqa: E402
import os  # noqa: E402
from typing import Any, cast  # noqa: E402

import common  # noqa: E402
import numpy as np  # noqa: E402
from flwr.app import (  # noqa: E402
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MetricRecord,
    RecordDict,
)
from flwr.clientapp import ClientApp  # noqa: E402
from flwr.serverapp import Grid, ServerApp  # noqa: E402
from flwr.serverapp.strategy import FedAvg  # noqa: E402
from flwr.simulation import run_simulation  # noqa: E402


def client_app(data: str) -> ClientApp:
    """The sites: train on the shard of the node's partition, or score its local test slice.

    Each actor loads the workload and builds the model once (``runtime``,
    kept in the ``common`` module, which Ray imports by name in the actor):
    the quickstart's per-process model cache.
    """
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        work, steps = runtime(data)
        pid = int(context.node_config["partition-id"])
        rnd = int(cast(int, cast(ConfigRecord, msg.content["config"])["server-round"]))
        site = work.sites[pid]
        received = cast(ArrayRecord, msg.content["arrays"]).to_numpy_ndarrays()
        # fedad's per-site, per-round seed (fedad/federated/client_app.py).
        weights = steps.fit(received, site, work.meta, int(work.meta["seed"]) + 1000 * rnd + pid)
        metrics = MetricRecord({"num-examples": len(site.y_train)})
        content = RecordDict({"arrays": ArrayRecord(weights), "metrics": metrics})
        return Message(content=content, reply_to=msg)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        work, steps = runtime(data)
        site = work.sites[int(context.node_config["partition-id"])]
        weights = cast(ArrayRecord, msg.content["arrays"]).to_numpy_ndarrays()
        probabilities = steps.predict(weights, site.X_test, common.SITE_EVAL_BATCH)
        loss, accuracy = common.loss_and_accuracy(site.y_test, probabilities)
        metrics: dict[str, Any] = {
            "num-examples": len(site.y_test),
            "loss": loss,
            "accuracy": accuracy,
        }
        return Message(content=RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)

    return app


def runtime(data: str) -> tuple[common.Workload, common.CompiledSteps]:
    """The workload and compiled model of this process, made on first use."""
    cache: dict[str, Any] = common.PROCESS_CACHE
    if data not in cache:
        import tensorflow as tf

        common.set_threads(tf)
        import keras

        work = common.load_workload(data)
        cache[data] = (work, common.CompiledSteps(tf, keras, common.build_cnn(keras, work.meta)))
    return cache[data]


def server_app(data: str, clock: common.RoundClock, final: dict[str, np.ndarray]) -> ServerApp:
    """FedAvg over every site every round; the global model scored on the test set each round."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        work, steps = runtime(data)

        def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
            probabilities = steps.predict(
                arrays.to_numpy_ndarrays(), work.X_test, common.SERVER_EVAL_BATCH
            )
            loss, accuracy = common.loss_and_accuracy(work.y_test, probabilities)
            # Round 0 scores the initial model: the rounds are timed from its end.
            if server_round == 0:
                clock.start()
            else:
                clock.lap()
                final["probabilities"] = probabilities
            return MetricRecord({"loss": loss, "accuracy": accuracy})

        n = len(work.sites)
        strategy = FedAvg(
            fraction_train=1.0,
            fraction_evaluate=1.0,
            min_train_nodes=n,
            min_evaluate_nodes=n,
            min_available_nodes=n,
        )
        strategy.start(
            grid=grid,
            initial_arrays=ArrayRecord([w.copy() for w in work.initial]),
            num_rounds=work.rounds,
            evaluate_fn=evaluate,
        )

    return app


def main(argv: list[str] | None = None) -> None:
    """Run the simulation in this process (Ray and its actors start under it); print the result."""
    parser = argparse.ArgumentParser(description=__doc__)
    common.add_arguments(parser)
    parser.add_argument(
        "--cpus", type=int, default=os.cpu_count() or 1, help="Ray's CPUs: one actor each"
    )
    args = parser.parse_args(argv)
    launched = args.launched or STARTED
    data = os.path.abspath(args.data)
    sites = len(common.load_workload(data).sites)
    clock = common.RoundClock()
    final: dict[str, np.ndarray] = {}
    run_simulation(
        server_app=server_app(data, clock, final),
        client_app=client_app(data),
        num_supernodes=sites,
        backend_config={
            "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
            "init_args": {"num_cpus": args.cpus, "log_to_driver": False},
        },
    )
    work = common.load_workload(data)
    common.emit(
        common.result(
            "flower",
            clock,
            launched,
            final["probabilities"],
            work.y_test,
            args.scores,
            actors=min(args.cpus, sites),
        )
    )


if __name__ == "__main__":
    main()
