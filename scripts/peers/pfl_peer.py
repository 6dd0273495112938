"""pfl-research's simulation (FedAvg, TFModel, N worker processes) of the workload; no fedad."""

from __future__ import annotations

import time

# Taken before the imports: TensorFlow's and pfl's imports are part of the start-up.
STARTED = time.time()

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import common  # noqa: E402
import numpy as np  # noqa: E402

# pfl's own variables for a multi-worker simulation (pfl/internal/platform/generic_platform.py).
RANK, ADDRESSES = "PFL_WORKER_RANK", "PFL_WORKER_ADDRESSES"
# Where rank 0 leaves its result for the launcher, which adds every worker's CPU time.
RESULT_FILE = "PFL_PEER_RESULT_FILE"


def main(argv: list[str] | None = None) -> None:
    """Launch ``--workers`` processes of this script (pfl's multi-worker mode), or be one."""
    parser = argparse.ArgumentParser(description=__doc__)
    common.add_arguments(parser)
    parser.add_argument("--workers", type=int, default=2, help="pfl worker processes")
    args = parser.parse_args(argv)
    launched = args.launched or STARTED
    if args.workers > 1 and RANK not in os.environ:
        launch(args, launched)
    else:
        worker(args, launched)


def launch(args: argparse.Namespace, launched: float) -> None:
    """Start the workers as pfl's docs do (one rank each, the same addresses); print the result.

    The workers are this process's children, so its ``os.times()`` after
    waiting for them holds their CPU time (and that of their own children).
    """
    ports = []
    for _ in range(args.workers):
        with socket.socket() as s:
            s.bind(("localhost", 0))
            ports.append(s.getsockname()[1])
    addresses = ",".join(f"localhost:{p}" for p in ports)
    with tempfile.TemporaryDirectory(prefix="pfl-peer-") as tmp:
        result_file = Path(tmp) / "result.json"
        command = [sys.executable, __file__, *sys.argv[1:]]
        if args.launched is None:
            command += ["--launched", repr(launched)]
        workers = []
        for rank in range(args.workers):
            env = {**os.environ, RANK: str(rank), ADDRESSES: addresses}
            if rank == 0:
                env[RESULT_FILE] = str(result_file)
            workers.append(subprocess.Popen(command, env=env))
        codes = [w.wait() for w in workers]
        if any(codes):
            raise SystemExit(f"a pfl worker failed (exit codes {codes}; its error is above)")
        result = json.loads(result_file.read_text())
    times = os.times()
    result["cpu_s"] = times.user + times.system + times.children_user + times.children_system
    result["wall_s"] = time.time() - launched
    sys.stdout.write(common.RESULT_PREFIX + json.dumps(result) + "\n")


def worker(args: argparse.Namespace, launched: float) -> None:
    """One pfl worker: its share of each cohort, all-reduced with the others' every round."""
    # pfl 0.6 keys a TFModel's variables by name; Keras 3 names them ambiguously ("kernel"),
    # tf_keras (Keras 2) by layer ("conv/kernel:0"): TensorFlow must load it as tf.keras.
    os.environ["TF_USE_LEGACY_KERAS"] = "1"
    import tensorflow as tf

    # Before pfl's import, which starts its distribution strategy (and TensorFlow's runtime).
    common.set_threads(tf)
    from pfl.aggregate.simulate import SimulatedBackend
    from pfl.aggregate.weighting import WeightByDatapoints
    from pfl.algorithm import FederatedAveraging, NNAlgorithmParams
    from pfl.callback.base import TrainingProcessCallback
    from pfl.callback.central_evaluation import CentralEvaluationCallback
    from pfl.common_types import Population
    from pfl.data.dataset import Dataset
    from pfl.data.federated_dataset import FederatedDataset
    from pfl.data.sampling import MinimizeReuseUserSampler
    from pfl.hyperparam import NNEvalHyperParams, NNTrainHyperParams
    from pfl.metrics import Metrics
    from pfl.model.tensorflow import TFModel

    work = common.load_workload(args.data)
    meta = work.meta
    seed = int(meta["seed"])
    tf.random.set_seed(seed)
    np.random.seed(seed)
    keras_model = common.build_cnn(tf.keras, meta)
    keras_model.set_weights(work.initial)
    metrics = {
        "loss": tf.keras.metrics.SparseCategoricalCrossentropy(),
        "accuracy": tf.keras.metrics.SparseCategoricalAccuracy(),
    }
    # FedAvg: the server adds the weighted mean of the sites' changes (SGD at rate 1).
    model = TFModel(keras_model, metrics, central_optimizer=tf.keras.optimizers.SGD(1.0))
    n = len(work.sites)

    def federated(part: str) -> Any:
        arrays = [
            (getattr(s, f"X_{part}"), getattr(s, f"y_{part}").astype(np.int64)) for s in work.sites
        ]
        # Rows per site: pfl balances each cohort's sites over the workers by them.
        return FederatedDataset(
            lambda uid: Dataset(arrays[uid], user_id=str(uid)),
            MinimizeReuseUserSampler(list(range(n))),
            user_id_to_weight={i: len(a[1]) for i, a in enumerate(arrays)},
        )

    class FedAvgOnce(FederatedAveraging):
        """FedAvg whose training sites do not also score their training rows each round.

        pfl scores a training site's rows before and after it trains when a
        round evaluates; fedad and the other peers score the sites' local
        test slices only (pfl's validation population below), so that work
        is left out here to keep the workloads equal.
        """

        def simulate_one_user(  # noqa: D102
            self, model: Any, user_dataset: Any, central_context: Any
        ) -> Any:
            if central_context.population == Population.TRAIN:
                central_context = dataclasses.replace(central_context, do_evaluation=False)
            return super().simulate_one_user(model, user_dataset, central_context)

    clock = common.RoundClock()

    class RoundTimer(TrainingProcessCallback):
        """Times each central iteration, after the callbacks before it (the central evaluation)."""

        def on_train_begin(self, *, model: Any) -> Any:  # noqa: D102
            clock.start()
            return Metrics()

        def after_central_iteration(  # noqa: D102
            self, aggregate_metrics: Any, model: Any, *, central_iteration: int
        ) -> tuple[bool, Any]:
            clock.lap()
            return False, Metrics()

    backend = SimulatedBackend(
        training_data=federated("train"),
        val_data=federated("test"),
        postprocessors=[WeightByDatapoints()],
    )
    central = Dataset((work.X_test, work.y_test.astype(np.int64)))
    params = NNAlgorithmParams(
        central_num_iterations=work.rounds,
        evaluation_frequency=1,
        train_cohort_size=n,
        val_cohort_size=n,
    )
    model = FedAvgOnce().run(
        algorithm_params=params,
        backend=backend,
        model=model,
        model_train_params=NNTrainHyperParams(
            local_learning_rate=float(meta["learning_rate"]),
            local_num_epochs=int(meta["local_epochs"]),
            local_batch_size=int(meta["batch_size"]),
        ),
        model_eval_params=NNEvalHyperParams(local_batch_size=common.SITE_EVAL_BATCH),
        callbacks=[
            CentralEvaluationCallback(
                central,
                model_eval_params=NNEvalHyperParams(local_batch_size=common.SERVER_EVAL_BATCH),
                frequency=1,
            ),
            RoundTimer(),
        ],
    )
    if int(os.environ.get(RANK, "0")) == 0:
        probabilities = keras_model.predict(
            work.X_test, batch_size=common.SERVER_EVAL_BATCH, verbose=0
        )
        workers = len(os.environ[ADDRESSES].split(",")) if ADDRESSES in os.environ else 1
        result = common.result(
            "pfl",
            clock,
            launched,
            np.asarray(probabilities),
            work.y_test,
            args.scores,
            workers=workers,
        )
        if RESULT_FILE in os.environ:
            Path(os.environ[RESULT_FILE]).write_text(json.dumps(result))
        else:
            common.emit(result)
    # A finished worker never exits by itself (pfl 0.6, TensorFlow 2.21, 2 workers): pfl's
    # cohort samplers (processes forked from this one) ignore the SIGTERM of their atexit
    # hook, TensorFlow's preemption notifier having taken it, and the exit waits on them and
    # on the multi-worker runtime. Everything is written: end the samplers, then this process.
    import multiprocess  # pfl's samplers run under it (dill's fork of multiprocessing)

    for child in multiprocess.active_children():
        child.kill()
        child.join(5)  # reaped: its CPU time counts among this worker's children's
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
