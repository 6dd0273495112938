"""What every peer of bench_peers.py shares: the workload file, the CNN, the step, the clock."""

from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

# The line a peer prints its figures on; bench_peers.py reads the last one of its output.
RESULT_PREFIX = "PEER_RESULT "
# Rows a forward pass scores at a time: fedad's sites score 1,024 rows a call, its server 4,096.
SITE_EVAL_BATCH = 1024
SERVER_EVAL_BATCH = 4096
# What a process builds once and reuses for every message (the Flower peer's actors): Ray
# imports this module by name in each actor, so the cache lives as long as the actor.
PROCESS_CACHE: dict[str, Any] = {}


@dataclass
class Site:
    """One site's rows, already standardized: what it trains on and its local test slice."""

    X_train: np.ndarray
    y_train: np.ndarray
    X_test: np.ndarray
    y_test: np.ndarray


@dataclass
class Workload:
    """The workload file bench_peers.py writes with fedad's pipeline, read back."""

    sites: list[Site]
    X_test: np.ndarray
    y_test: np.ndarray
    initial: list[np.ndarray]
    meta: dict[str, Any]

    @property
    def rounds(self) -> int:
        """Federated rounds to run."""
        return int(self.meta["rounds"])

    @property
    def n_classes(self) -> int:
        """Classes of the task (2: normal and attack)."""
        return len(self.meta["class_names"])


def load_workload(path: str | Path) -> Workload:
    """Read the ``.npz`` written by ``bench_peers.write_workload``."""
    with np.load(path) as f:
        meta = json.loads(str(f["meta"]))
        sites = [
            Site(
                f[f"site{i}_X_train"],
                f[f"site{i}_y_train"],
                f[f"site{i}_X_test"],
                f[f"site{i}_y_test"],
            )
            for i in range(int(meta["sites"]))
        ]
        initial = [f[f"initial{j}"] for j in range(int(meta["arrays"]))]
        return Workload(sites, f["X_test"], f["y_test"], initial, meta)


def set_threads(tf: Any, threads: int = 1) -> None:
    """Size TensorFlow's pools before its first op: one thread per process, as fedad's actors."""
    tf.config.threading.set_intra_op_parallelism_threads(threads)
    tf.config.threading.set_inter_op_parallelism_threads(threads)


def build_cnn(keras: Any, meta: dict[str, Any]) -> Any:
    """The CNN of fedad's ``model=cnn`` (fedad/models/keras_models.py) in Keras 3 or tf_keras.

    The same layers, names and order, so the initial weights of the workload
    file fit; compiled with Adam and the sparse cross-entropy, as fedad compiles it.
    """
    n_features, n_classes = int(meta["n_features"]), len(meta["class_names"])
    cfg = meta["model"]
    side = math.isqrt(n_features - 1) + 1
    layers = keras.layers
    inputs = keras.Input(shape=(n_features,), name="features")
    x = layers.Reshape((n_features, 1), name="as_sequence")(inputs)
    x = layers.ZeroPadding1D((0, side * side - n_features), name="pad_square")(x)
    x = layers.Reshape((side, side, 1), name="as_image")(x)
    x = layers.Conv2D(
        int(cfg["filters"]),
        int(cfg["kernel_size"]),
        padding="same",
        activation="relu",
        name="conv",
    )(x)
    x = layers.MaxPooling2D(2, padding="same", name="pool")(x)
    x = layers.Flatten(name="flatten")(x)
    x = layers.Dense(int(cfg["dense_units"]), activation="relu", name="dense")(x)
    x = layers.Dropout(float(cfg["dropout"]), name="dropout")(x)
    outputs = layers.Dense(n_classes, activation="softmax", name="softmax")(x)
    model = keras.Model(inputs, outputs, name="cnn")
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate=float(meta["learning_rate"])),
        loss="sparse_categorical_crossentropy",
    )
    return model


class CompiledSteps:
    """A Keras 3 model's training and scoring steps, one compiled call per batch.

    What fedad's ``TrainingSteps`` does for a site (Keras' own loss and
    optimizer inside one ``tf.function`` with a fixed signature), without
    fedad: the limit and the Flower peer train through it.
    """

    def __init__(self, tf: Any, keras: Any, model: Any) -> None:
        self.tf, self.keras, self.model = tf, keras, model
        model.optimizer.build(model.trainable_variables)
        features = tf.TensorSpec(model.inputs[0].shape, tf.float32)
        self._train = tf.function(
            self._train_step, input_signature=[features, tf.TensorSpec([None], tf.int64)]
        )
        self._score = tf.function(self._score_step, input_signature=[features])

    def _train_step(self, x: Any, y: Any) -> Any:
        model = self.model
        with self.tf.GradientTape() as tape:
            predicted = model(x, training=True)
            loss = model.compute_loss(x=x, y=y, y_pred=predicted, training=True)
        variables = model.trainable_variables
        model.optimizer.apply_gradients(zip(tape.gradient(loss, variables), variables, strict=True))
        return loss

    def _score_step(self, x: Any) -> Any:
        return self.model(x, training=False)

    def fit(self, weights: list[np.ndarray], site: Site, meta: dict, seed: int) -> list[np.ndarray]:
        """Train from ``weights`` on the site's rows, a fresh optimizer; return the new weights.

        Each epoch orders the rows by a permutation drawn from ``seed``, as
        fedad's ``row_orders`` does; dropout is reseeded from ``seed`` too.
        """
        model = self.model
        model.set_weights(weights)
        for variable in model.optimizer.variables:
            variable.assign(np.zeros(variable.shape, dtype=variable.dtype))
        # Keras 3 keeps the learning rate among those variables: zeroed with the moments.
        model.optimizer.learning_rate = float(meta["learning_rate"])
        reseed_dropout(self.keras, model, seed)
        rng = np.random.default_rng(seed)
        batch = int(meta["batch_size"])
        X, y = site.X_train, site.y_train.astype(np.int64)
        for _ in range(int(meta["local_epochs"])):
            order = rng.permutation(len(y))
            Xo, yo = X[order], y[order]
            for start in range(0, len(y), batch):
                self._train(Xo[start : start + batch], yo[start : start + batch])
        return model.get_weights()

    def predict(self, weights: list[np.ndarray] | None, X: np.ndarray, batch: int) -> np.ndarray:
        """Class probabilities of ``X`` under ``weights`` (the model's own when None)."""
        if weights is not None:
            self.model.set_weights(weights)
        if not len(X):
            return np.empty((0, int(self.model.outputs[0].shape[-1])), np.float32)
        parts = [self._score(X[i : i + batch]).numpy() for i in range(0, len(X), batch)]
        return np.concatenate(parts)


def reseed_dropout(keras: Any, model: Any, seed: int) -> None:
    """Reset each Keras 3 layer's seed state from ``seed``: an update depends on its seed only."""
    for i, layer in enumerate(model.layers):
        generator = getattr(layer, "seed_generator", None)
        if isinstance(generator, keras.random.SeedGenerator):
            state = np.array([(seed + i) % 2**32, 0])
            generator.state.assign(state.astype(generator.state.dtype))


def weighted_mean(updates: list[list[np.ndarray]], counts: list[int]) -> list[np.ndarray]:
    """FedAvg's aggregate: the mean of the updates weighted by their training rows."""
    shares = np.asarray(counts, dtype=np.float64) / sum(counts)
    return [
        np.tensordot(shares, np.stack(arrays), axes=1).astype(arrays[0].dtype)
        for arrays in zip(*updates, strict=True)
    ]


def loss_and_accuracy(y: np.ndarray, probabilities: np.ndarray) -> tuple[float, float]:
    """Mean cross-entropy (probabilities clipped at 1e-7) and accuracy; NaN for no rows."""
    if not len(y):
        return math.nan, math.nan
    p = probabilities[np.arange(len(y)), y.astype(np.int64)]
    loss = float(np.mean(-np.log(np.clip(p, 1e-7, 1.0))))
    return loss, float(np.mean(probabilities.argmax(axis=1) == y))


def binary_metrics(y: np.ndarray, probabilities: np.ndarray) -> dict[str, float]:
    """Macro-F1 (argmax) and ROC-AUC (attack score ``1 - p(normal)``) in NumPy alone.

    As ``fedad.evaluation.metrics.compute_metrics`` defines them for the
    binary task (the pfl peer has neither fedad nor scikit-learn);
    bench_peers.py rescored every peer's saved probabilities with fedad's
    own function and prints those.
    """
    y = np.asarray(y, dtype=np.int64)
    predicted = probabilities.argmax(axis=1)
    f1s = []
    for c in np.unique(y):  # the classes the test rows hold
        tp = int(np.sum((predicted == c) & (y == c)))
        fp = int(np.sum((predicted == c) & (y != c)))
        fn = int(np.sum((predicted != c) & (y == c)))
        f1s.append(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0)
    positive = y != 0
    score = 1.0 - probabilities[:, 0].astype(np.float64)
    # The Mann-Whitney form of the AUC, tied scores given their mean rank.
    values, inverse, counts = np.unique(score, return_inverse=True, return_counts=True)
    mean_rank = np.cumsum(counts) - (counts - 1) / 2.0
    ranks = mean_rank[inverse]
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    auc = math.nan
    if n_pos and n_neg:
        auc = (ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)
    return {"macro_f1": float(np.mean(f1s)), "roc_auc": float(auc)}


@dataclass
class RoundClock:
    """Each round's start (epoch seconds), wall seconds and this process's CPU seconds."""

    rounds: list[dict[str, float]] = field(default_factory=list)
    _wall: float = 0.0
    _cpu: float = 0.0

    def start(self) -> None:
        """Round 1 begins now."""
        self._wall, self._cpu = time.time(), time.process_time()

    def lap(self) -> None:
        """A round ended now; the next one begins."""
        now, cpu = time.time(), time.process_time()
        self.rounds.append(
            {
                "round": len(self.rounds) + 1,
                "started_at": self._wall,
                "seconds": now - self._wall,
                "cpu_s": cpu - self._cpu,
            }
        )
        self._wall, self._cpu = now, cpu


def result(
    system: str,
    clock: RoundClock,
    launched: float,
    probabilities: np.ndarray,
    y_test: np.ndarray,
    scores_path: str | None,
    **extra: Any,
) -> dict[str, Any]:
    """The peer's figures; its test-set probabilities saved for bench_peers.py to rescore."""
    if scores_path:
        np.save(scores_path, probabilities.astype(np.float32))
    steady = clock.rounds[1:]
    times = os.times()
    first = clock.rounds[0]
    return {
        "system": system,
        "rounds": clock.rounds,
        "steady_round_s": float(np.mean([r["seconds"] for r in steady])) if steady else None,
        "launch_to_round1_end_s": first["started_at"] + first["seconds"] - launched,
        "launch_to_round1_start_s": first["started_at"] - launched,
        "wall_s": time.time() - launched,
        # This process and the children it has waited for (pfl's launcher: every worker).
        "cpu_s": times.user + times.system + times.children_user + times.children_system,
        **binary_metrics(y_test, probabilities),
        **extra,
    }


def emit(figures: dict[str, Any]) -> None:
    """Print the peer's one JSON line."""
    sys.stdout.write(RESULT_PREFIX + json.dumps(figures) + "\n")
    sys.stdout.flush()


def add_arguments(parser: Any) -> None:
    """The command line every peer takes."""
    parser.add_argument("--data", required=True, help="the workload .npz of bench_peers.py")
    parser.add_argument(
        "--launched", type=float, default=None, help="epoch seconds of the launch (default: now)"
    )
    parser.add_argument("--scores", default=None, help="save the test-set probabilities (.npy)")
