"""What both Flower apps share: the run settings, a site's data, the model, training, metrics."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import keras
import numpy as np
import tensorflow as tf
from flwr.app import ConfigRecord, UserConfigValue

from fedad.config import Settings, section
from fedad.federated import scaling, shards
from fedad.metrics import compute_metrics
from fedad.models.keras_models import build_model

# Metrics every evaluate reply carries (NaN where undefined), so that all replies
# have the same keys, as Flower's aggregation requires.
CLIENT_METRICS = (
    "accuracy",
    "precision",
    "recall",
    "f1",
    "macro_f1",
    "weighted_f1",
    "roc_auc",
    "pr_auc",
    "fpr",
)

# One compiled model per actor process, reused by every client the actor runs:
# building and tracing a Keras model costs seconds, a message costs milliseconds.
_MODELS: dict[str, ProximalModel] = {}
_RUNTIME_READY = False


class ProximalModel(keras.Model):
    """A functional Keras model whose training loss adds FedProx's proximal term.

    The term is ``mu / 2 * ||w - w_global||^2`` over the trainable weights;
    Flower's FedProx strategy only sends ``mu``, each client must add the term
    itself. ``mu = 0`` gives plain local training (FedAvg and the others).
    The anchor is kept outside Keras' tracking so it is not part of
    ``get_weights()``.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._anchor = _Anchor(
            mu=tf.Variable(0.0, trainable=False),
            weights=[tf.Variable(w, trainable=False) for w in self.get_weights()],
        )

    def set_anchor(self, weights: list[np.ndarray], mu: float) -> None:
        """Pull training towards ``weights`` (the global model) with strength ``mu``."""
        self._anchor.mu.assign(mu)
        for variable, value in zip(self._anchor.weights, weights, strict=True):
            variable.assign(value)

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        """Return the compiled loss plus the proximal term while training."""
        loss = super().compute_loss(
            x=x, y=y, y_pred=y_pred, sample_weight=sample_weight, training=training
        )
        if not training:
            return loss
        gap = tf.add_n(
            [
                tf.reduce_sum(tf.square(w.value - anchor))
                for w, anchor in zip(self.weights, self._anchor.weights, strict=True)
                if w.trainable
            ]
        )
        return loss + 0.5 * self._anchor.mu * gap


@dataclass
class _Anchor:
    mu: tf.Variable
    weights: list[tf.Variable]


@dataclass
class Site:
    """One client's shard, scaled and split into local train, validation and test."""

    X_train: np.ndarray
    y_train: np.ndarray
    X_val: np.ndarray
    y_val: np.ndarray
    X_test: np.ndarray
    y_test: np.ndarray


def run_settings(defaults: Settings, run_config: Settings) -> dict[str, UserConfigValue]:
    """Return ``defaults`` updated with the values ``run_config`` sets.

    Parameters
    ----------
    defaults : Mapping
        Settings passed in code (the Simulation Engine's); empty under ``flwr run``.
    run_config : Mapping
        ``context.run_config``.

    Returns
    -------
    dict
        The settings the apps read; a run-config value ``""`` counts as not set.

    Notes
    -----
    Flower rejects a ``flwr run --run-config`` key that ``[tool.flwr.app.config]``
    in pyproject.toml does not declare, and hands the apps every declared key.
    Which keys a run has depends on its model and strategy (FedAvg takes no
    ``proximal_mu``), so pyproject.toml declares them all as ``""`` and only the
    values that ``python -m fedad.deployment`` writes for the run may count.
    """
    return {**defaults, **{k: v for k, v in run_config.items() if v != ""}}


def predict(model: keras.Model, X: np.ndarray, batch_size: int = 1024) -> np.ndarray:
    """Return ``model``'s class probabilities for ``X``, scored ``batch_size`` rows at a time.

    Unlike ``model.predict``, this builds no tf.data pipeline, which costs
    several times more than scoring a site's test slice.
    """
    if len(X) == 0:
        return np.zeros((0, model.output_shape[-1]), dtype=np.float32)
    batches = [model.predict_on_batch(X[i : i + batch_size]) for i in range(0, len(X), batch_size)]
    return np.concatenate(batches)


def evaluation_metrics(y: np.ndarray, scores: np.ndarray, class_names: list[str]) -> dict:
    """Return cross-entropy ``loss`` plus :data:`CLIENT_METRICS`, NaN where undefined.

    Parameters
    ----------
    y : np.ndarray
        True class codes.
    scores : np.ndarray
        Predicted probabilities ``(n, n_classes)``.
    class_names : list[str]
        Class code to name.

    Returns
    -------
    dict
        Plain floats, ready for a MetricRecord.
    """
    full = compute_metrics(y, scores, class_names)
    out = {"loss": cross_entropy(y, scores)}
    for key in CLIENT_METRICS:
        out[key] = math.nan if full[key] is None else float(full[key])
    return out


def cross_entropy(y: np.ndarray, scores: np.ndarray) -> float:
    """Mean negative log-probability of the true class (NaN for no rows)."""
    if len(y) == 0:
        return math.nan
    p = scores[np.arange(len(y)), np.asarray(y, dtype=np.int64)]
    return float(-np.mean(np.log(np.clip(p, 1e-7, 1.0))))


def load_site(settings: Settings, partition_id: int, config: ConfigRecord) -> Site:
    """Read this client's shard, scale it and split it into train/validation/test.

    With federated scaling the server's pooled ``scale-mean``/``scale-std`` are
    in ``config``; otherwise the site scales with its own shard's statistics.
    The split depends only on the seed and the partition id, so a site keeps
    the same local test slice in every round.
    """
    X, y = shards.read_shard(
        shards.shard_path(settings["run-dir"], partition_id), shards.site_reader(partition_id)
    )
    if "scale-mean" in config:
        mean, std = np.asarray(config["scale-mean"]), np.asarray(config["scale-std"])
    else:
        mean, std = scaling.pooled_moments([scaling.site_sums(X)])
    X = scaling.standardize(X, mean, std)
    use_val = int(settings["train.early_stopping_patience"]) > 0
    train, val, test = local_split(
        len(y),
        float(settings["train.test_fraction"]),
        float(settings["train.val_fraction"]) if use_val else 0.0,
        seed=(int(settings["seed"]), partition_id),
    )
    return Site(X[train], y[train], X[val], y[val], X[test], y[test])


def local_split(
    n: int, test_fraction: float, val_fraction: float, seed: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Return shuffled ``(train, val, test)`` row indices for a shard of ``n`` rows.

    A non-zero fraction gets at least one row and training always keeps at
    least one, so tiny shards still train and report.
    """
    order = np.random.default_rng(seed).permutation(n)

    def size(total: int, fraction: float) -> int:
        if fraction <= 0 or total < 2:
            return 0
        return min(max(1, round(total * fraction)), total - 1)

    n_test = size(n, test_fraction)
    n_val = size(n - n_test, val_fraction)
    return order[n_test + n_val :], order[n_test : n_test + n_val], order[:n_test]


def local_model(settings: Settings) -> ProximalModel:
    """Return this process's compiled model for ``settings``, built on first use."""
    model_cfg = section(settings, "model")
    n_classes = len(json.loads(settings["class-names"]))
    key = json.dumps(
        [
            model_cfg,
            settings["num-features"],
            n_classes,
            settings["train.learning_rate"],
            settings["train.optimizer"],
        ],
        sort_keys=True,
    )
    if key not in _MODELS:
        base = build_model(
            model_cfg,
            int(settings["num-features"]),
            n_classes,
            float(settings["train.learning_rate"]),
            str(settings["train.optimizer"]),
        )
        model = ProximalModel(inputs=base.inputs, outputs=base.outputs, name=base.name)
        model.compile(
            optimizer=keras.optimizers.deserialize(keras.optimizers.serialize(base.optimizer)),
            loss=base.loss,
            metrics=["accuracy"],
        )
        _MODELS[key] = model
    return _MODELS[key]


def train_local(
    model: ProximalModel,
    global_weights: list[np.ndarray],
    site: Site,
    settings: Settings,
    mu: float,
    seed: int,
) -> dict[str, float]:
    """Train ``model`` from ``global_weights`` on the site's training rows.

    Parameters
    ----------
    model : ProximalModel
        From :func:`local_model`; its weights and optimizer state are reset here.
    global_weights : list[np.ndarray]
        The global model received from the server (also the proximal anchor).
    site : Site
        Scaled local data.
    settings : Mapping
        ``train.*`` settings: ``local_epochs``, ``batch_size``,
        ``learning_rate``, ``class_weights``, ``early_stopping_patience``.
    mu : float
        FedProx proximal strength; 0 for every other strategy.
    seed : int
        Seeds shuffling and dropout, so one seed gives one update.

    Returns
    -------
    dict[str, float]
        ``train_loss`` (including the proximal term) and ``train_accuracy``
        of the last epoch, and ``train_epochs`` run.
    """
    model.set_weights(global_weights)
    model.set_anchor(global_weights, mu)
    _reset_optimizer(model.optimizer, float(settings["train.learning_rate"]))
    _reseed(model, seed)
    # The seed orders the rows; Keras' shuffle on top draws from TensorFlow's global seed.
    order = np.random.default_rng(seed).permutation(len(site.y_train))
    X, y = site.X_train[order], site.y_train[order]
    sample_weight = balanced_weights(y) if settings["train.class_weights"] else None
    callbacks, validation = [], None
    patience = int(settings["train.early_stopping_patience"])
    if patience > 0 and len(site.y_val):
        callbacks = [
            keras.callbacks.EarlyStopping(
                monitor="val_loss", patience=patience, restore_best_weights=True
            )
        ]
        validation = (site.X_val, site.y_val)
    history = model.fit(
        X,
        y,
        sample_weight=sample_weight,
        epochs=int(settings["train.local_epochs"]),
        batch_size=int(settings["train.batch_size"]),
        validation_data=validation,
        callbacks=callbacks,
        shuffle=True,
        verbose=0,
    ).history
    return {
        "train_loss": float(history["loss"][-1]),
        "train_accuracy": float(history["accuracy"][-1]),
        "train_epochs": float(len(history["loss"])),
    }


def balanced_weights(y: np.ndarray) -> np.ndarray:
    """Per-row weights ``n / (k * count(class))`` over the k classes present locally."""
    classes, inverse, counts = np.unique(y, return_inverse=True, return_counts=True)
    return (len(y) / (len(classes) * counts[inverse])).astype(np.float32)


def global_model(settings: Settings) -> keras.Model:
    """Build and compile the server's copy of the model the sites train, from ``settings``.

    Parameters
    ----------
    settings : Mapping
        Flat run settings with ``model.*``, ``num-features``, ``class-names``,
        ``train.learning_rate`` and ``train.optimizer``.

    Returns
    -------
    keras.Model
        Fresh weights drawn from Keras's current random state.
    """
    return build_model(
        section(settings, "model"),
        int(settings["num-features"]),
        len(json.loads(str(settings["class-names"]))),
        float(settings["train.learning_rate"]),
        str(settings["train.optimizer"]),
    )


def init_runtime(settings: Settings) -> None:
    """Size TensorFlow's thread pools to the actor's CPUs and fix its global seed.

    Must run before any TF op. Keras' shuffle draws from the global seed
    afresh in every fit, so one fixed seed gives each fit the same draws and
    :func:`train_local`'s seed alone decides the row order. Setting it once
    matters: setting it clears TensorFlow's caches, and every traced
    function then has to be instantiated again, which costs more than a
    small site's training.
    """
    global _RUNTIME_READY
    if _RUNTIME_READY:
        return
    threads = int(settings.get("client-threads", 1))
    tf.config.threading.set_intra_op_parallelism_threads(threads)
    tf.config.threading.set_inter_op_parallelism_threads(threads)
    tf.config.experimental.enable_op_determinism()
    tf.random.set_seed(int(settings.get("seed", 0)))
    _RUNTIME_READY = True


def _reset_optimizer(optimizer: keras.optimizers.Optimizer, learning_rate: float) -> None:
    # Zeroed slots and step count are what a fresh optimizer starts from; the
    # cached model is shared by many sites, so no site inherits another's moments.
    for variable in optimizer.variables:
        variable.assign(np.zeros(variable.shape, dtype=variable.dtype))
    optimizer.learning_rate = learning_rate


def _reseed(model: keras.Model, seed: int) -> None:
    # Dropout draws from a per-layer seed state that advances with every step;
    # resetting it makes the update independent of which sites the actor ran before.
    for i, layer in enumerate(model.layers):
        generator = getattr(layer, "seed_generator", None)
        if isinstance(generator, keras.random.SeedGenerator):
            state = np.array([(seed + i) % 2**32, 0])
            generator.state.assign(state.astype(generator.state.dtype))
