"""Keras models trained by the federated sites and the centralized baselines, and their step."""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from itertools import islice

import keras
import numpy as np
import tensorflow as tf

from fedad.errors import FedadError
from fedad.models.catalog import MODEL_NAMES, OPTIMIZERS

# The loss build_model compiles a classifier with (the autoencoder's is the mean squared error).
CLASSIFIER_LOSS = "sparse_categorical_crossentropy"
# The output layer of every classifier build_model makes: the head that personalize=fedper and
# fedrep keep at each site, the layers below it the body they federate.
HEAD_LAYER = "softmax"
# Rows one validation-loss step scores: a forward pass only, cheaper per row in big batches.
VALIDATION_BATCH = 1024


def build_model(
    model_cfg: Mapping,
    n_features: int,
    n_classes: int,
    learning_rate: float,
    optimizer: str,
) -> keras.Model:
    """Build and compile a classifier over 2-D feature arrays.

    Parameters
    ----------
    model_cfg : Mapping
        ``name`` (``cnn``, ``logistic``, ``mlp`` or ``autoencoder``); the CNN
        also reads ``filters``, ``kernel_size``, ``dense_units`` and
        ``dropout``; the MLP ``units``, ``layers``, ``dropout``, ``batch_norm``;
        the autoencoder ``units``, ``bottleneck``, ``dropout``.
    n_features : int
        Width of the input rows.
    n_classes : int
        Width of the softmax output (2 for the binary task).
    learning_rate : float
        Optimizer step size.
    optimizer : str
        ``adam`` or ``sgd``.

    Returns
    -------
    keras.Model
        A classifier compiled with sparse categorical cross-entropy and
        accuracy, taking ``(n, n_features)`` float arrays and returning
        ``(n, n_classes)`` probabilities; the autoencoder returns its
        reconstruction ``(n, n_features)``, compiled with the mean squared error.

    Raises
    ------
    FedadError
        If the model or optimizer name is unknown, or a size is invalid.
    """
    name = str(model_cfg.get("name", ""))
    if n_features < 1 or n_classes < 2:
        raise FedadError(
            f"A model needs at least one feature and two classes; got {n_features} "
            f"feature(s) and {n_classes} class(es). Check the dataset and task settings."
        )
    inputs = keras.Input(shape=(n_features,), name="features")
    if name == "cnn":
        outputs = _cnn_head(inputs, model_cfg, n_features, n_classes)
    elif name == "logistic":
        outputs = keras.layers.Dense(n_classes, activation="softmax", name=HEAD_LAYER)(inputs)
    elif name == "mlp":
        outputs = _mlp_head(inputs, model_cfg, n_classes)
    elif name == "autoencoder":
        model = keras.Model(inputs, _autoencoder(inputs, model_cfg, n_features), name=name)
        model.compile(optimizer=_optimizer(optimizer, learning_rate), loss="mse")
        return model
    else:
        raise FedadError(f"Unknown model '{name}'. Set model= to one of: {', '.join(MODEL_NAMES)}.")
    model = keras.Model(inputs, outputs, name=name)
    model.compile(
        optimizer=_optimizer(optimizer, learning_rate), loss=CLASSIFIER_LOSS, metrics=["accuracy"]
    )
    return model


class TrainingSteps:
    """A compiled model's training step and validation-loss step: one compiled call per batch.

    Build it once per model and reuse it: tracing costs about a second, a
    step milliseconds. Keras' ``fit`` runs the same step but pays, per call,
    for its data adapter, callbacks and epoch iterator, which dominates a
    small site's training (the CNN on 2,000 rows: 0.17 s an epoch against
    0.065 s; ``scripts/bench_step.py``).
    The training step is Keras' own (``TensorFlowTrainer.train_step``): the
    model's ``compute_loss`` (the compiled loss over the sample weights, plus
    whatever the model adds to it), its gradient, the optimizer's update;
    with one addition, :attr:`correction`, added to each gradient before the
    optimizer sees it (zero unless a caller sets it, as SCAFFOLD does).

    Parameters
    ----------
    model : keras.Model
        Compiled by :func:`build_model` (or a copy of it): a classifier on
        class codes, or the autoencoder on its inputs.
    variables : Sequence[keras.Variable], optional
        The trainable variables the step updates, the others frozen (FedRep
        trains a model's head, then its body); default: all of them.
    """

    def __init__(self, model: keras.Model, variables: Sequence | None = None) -> None:
        self.model = model
        self.classify = model.loss == CLASSIFIER_LOSS
        model.optimizer.build(model.trainable_variables)
        self.variables = list(model.trainable_variables if variables is None else variables)
        # Where each trained variable sits among model.weights, whose order correct() takes.
        self._positions = [
            next(i for i, w in enumerate(model.weights) if w is v) for v in self.variables
        ]
        self.correction = [
            tf.Variable(tf.zeros(v.shape, v.dtype), trainable=False) for v in self.variables
        ]
        self.target_dtype = np.int64 if self.classify else np.float32
        features = tf.TensorSpec(model.inputs[0].shape, tf.float32)
        targets = tf.TensorSpec(
            [None] if self.classify else model.outputs[0].shape, tf.as_dtype(self.target_dtype)
        )
        weights = tf.TensorSpec([None], tf.float32)
        self._train = tf.function(self._train_step, input_signature=[features, targets, weights])
        self._loss = tf.function(self._loss_step, input_signature=[features, targets])

    def correct(self, values: list[np.ndarray] | None) -> None:
        """Set :attr:`correction` from ``values``, one per array of ``get_weights()``; None: zero.

        Only the trained arrays' values are used (a batch norm's moving
        statistics take no gradient step, nor does a frozen variable).
        """
        if values is None:
            values = [np.zeros(w.shape, np.float32) for w in self.model.weights]
        if len(values) != len(self.model.weights):
            raise ValueError(f"{len(values)} corrections for {len(self.model.weights)} weights")
        for variable, position in zip(self.correction, self._positions, strict=True):
            variable.assign(values[position])

    def _train_step(self, x: tf.Tensor, y: tf.Tensor, weights: tf.Tensor) -> tuple:
        model = self.model
        with tf.GradientTape() as tape:
            predicted = model(x, training=True)
            loss = model.compute_loss(
                x=x, y=y, y_pred=predicted, sample_weight=weights, training=True
            )
        variables = self.variables
        gradients = tape.gradient(loss, variables)
        corrected = [g + c for g, c in zip(gradients, self.correction, strict=True)]
        model.optimizer.apply_gradients(zip(corrected, variables, strict=True))
        if not self.classify:
            return loss, tf.constant(0.0)
        hits = tf.equal(tf.argmax(predicted, axis=-1), y)
        return loss, tf.reduce_sum(tf.cast(hits, tf.float32))

    def _loss_step(self, x: tf.Tensor, y: tf.Tensor) -> tf.Tensor:
        predicted = self.model(x, training=False)
        return self.model.compute_loss(x=x, y=y, y_pred=predicted, training=False)

    def epoch(
        self, X: np.ndarray, y: np.ndarray, weights: np.ndarray, batch_size: int
    ) -> tuple[float, float, int]:
        """One pass over the rows in their order, ``batch_size`` rows a step.

        Returns
        -------
        tuple[float, float, int]
            The training loss averaged over the rows (as Keras' history
            averages it), the share of rows classified right (NaN for the
            autoencoder), and the steps taken.
        """
        loss = hits = 0.0
        steps = 0
        for start in range(0, len(y), batch_size):
            rows = slice(start, start + batch_size)
            batch_loss, batch_hits = self._train(X[rows], y[rows], weights[rows])
            loss += float(batch_loss) * len(y[rows])
            hits += float(batch_hits)
            steps += 1
        if not len(y):
            return math.nan, math.nan, 0
        return loss / len(y), (hits / len(y) if self.classify else math.nan), steps

    def validation_loss(self, X: np.ndarray, y: np.ndarray) -> float:
        """The compiled loss over the rows (the model's training-only terms left out)."""
        X, y = np.asarray(X, np.float32), np.asarray(y, self.target_dtype)
        total = 0.0
        for start in range(0, len(y), VALIDATION_BATCH):
            rows = slice(start, start + VALIDATION_BATCH)
            total += float(self._loss(X[rows], y[rows])) * len(y[rows])
        return total / len(y) if len(y) else math.nan


def row_orders(seed: int, n_rows: int) -> Iterator[np.ndarray]:
    """The row order of each epoch in turn: one permutation after another from ``seed``."""
    rng = np.random.default_rng(seed)
    while True:
        yield rng.permutation(n_rows)


def run_epochs(
    steps: TrainingSteps,
    X: np.ndarray,
    y: np.ndarray,
    epochs: int,
    batch_size: int,
    seed: int,
    sample_weight: np.ndarray | None = None,
    validation: tuple[np.ndarray, np.ndarray] | None = None,
    patience: int = 0,
) -> dict[str, float]:
    """Train ``steps.model`` in place for up to ``epochs`` epochs.

    Rows go in the orders of :func:`row_orders`. With ``patience`` above 0
    and validation rows, training stops as Keras' ``EarlyStopping`` (on
    ``val_loss``, ``restore_best_weights=True``) stops it: after ``patience``
    epochs in a row without a lower validation loss, the weights of the best
    epoch restored.

    Parameters
    ----------
    steps : TrainingSteps
        The model's compiled steps.
    X, y : np.ndarray
        Training inputs and targets (class codes, or the inputs again).
    epochs, batch_size : int
        At most this many passes over the rows, this many rows a step.
    seed : int
        Orders the rows.
    sample_weight : np.ndarray, optional
        Per-row weights of the loss (all 1 by default).
    validation : tuple of np.ndarray, optional
        Held-out rows for early stopping.
    patience : int
        Epochs without improvement before stopping (0: never stop early).

    Returns
    -------
    dict[str, float]
        ``train_loss`` of the last epoch, ``train_accuracy`` (classifiers
        only), ``train_epochs`` run and ``train_steps`` behind the weights
        the model is left with.
    """
    X, y = np.asarray(X, np.float32), np.asarray(y, steps.target_dtype)
    weights = np.ones(len(y), np.float32)
    if sample_weight is not None:
        weights = np.asarray(sample_weight, np.float32)
    stopping = patience > 0 and validation is not None and len(validation[1]) > 0
    best: float | None = None
    best_weights: list[np.ndarray] | None = None
    taken = best_steps = wait = run = 0
    loss = accuracy = math.nan
    for order in islice(row_orders(seed, len(y)), epochs):
        loss, accuracy, epoch_steps = steps.epoch(X[order], y[order], weights[order], batch_size)
        taken, run = taken + epoch_steps, run + 1
        if not stopping or validation is None:
            continue
        current = steps.validation_loss(*validation)
        # As Keras: the first epoch is the best so far, then only a strictly lower loss is.
        if best is None or current < best:
            best, best_weights, best_steps, wait = current, steps.model.get_weights(), taken, 0
            continue
        wait += 1
        if wait >= patience:
            break
    if best_weights is not None:
        steps.model.set_weights(best_weights)
        taken = best_steps
    out = {"train_loss": loss, "train_epochs": float(run), "train_steps": float(taken)}
    if steps.classify:
        out["train_accuracy"] = accuracy
    return out


def _cnn_head(inputs, cfg: Mapping, n_features: int, n_classes: int):
    """Lay the features out as a zero-padded square image and classify it."""
    side = math.isqrt(n_features - 1) + 1
    filters = int(cfg.get("filters", 32))
    kernel = int(cfg.get("kernel_size", 3))
    dense_units = int(cfg.get("dense_units", 64))
    dropout = float(cfg.get("dropout", 0.3))
    if filters < 1 or kernel < 1 or dense_units < 1 or not 0.0 <= dropout < 1.0:
        raise FedadError(
            f"Invalid CNN sizes: filters={filters}, kernel_size={kernel}, "
            f"dense_units={dense_units}, dropout={dropout}. Use positive integers and a "
            "dropout in [0, 1)."
        )
    x = keras.layers.Reshape((n_features, 1), name="as_sequence")(inputs)
    # Padding inside the model keeps every caller on plain 2-D arrays.
    x = keras.layers.ZeroPadding1D((0, side * side - n_features), name="pad_square")(x)
    x = keras.layers.Reshape((side, side, 1), name="as_image")(x)
    x = keras.layers.Conv2D(filters, kernel, padding="same", activation="relu", name="conv")(x)
    # "same" pooling so a 1x1 image (a single feature) still works.
    x = keras.layers.MaxPooling2D(2, padding="same", name="pool")(x)
    x = keras.layers.Flatten(name="flatten")(x)
    x = keras.layers.Dense(dense_units, activation="relu", name="dense")(x)
    x = keras.layers.Dropout(dropout, name="dropout")(x)
    return keras.layers.Dense(n_classes, activation="softmax", name=HEAD_LAYER)(x)


def _mlp_head(inputs, cfg: Mapping, n_classes: int):
    """Dense layers, each half as wide as the one before, then a softmax."""
    units, layers = int(cfg.get("units", 128)), int(cfg.get("layers", 2))
    dropout, batch_norm = float(cfg.get("dropout", 0.2)), bool(cfg.get("batch_norm", False))
    x = inputs
    for i in range(layers):
        x = keras.layers.Dense(max(units >> i, 2), name=f"dense_{i}")(x)
        if batch_norm:
            x = keras.layers.BatchNormalization(name=f"batch_norm_{i}")(x)
        x = keras.layers.Activation("relu", name=f"relu_{i}")(x)
        if dropout:
            x = keras.layers.Dropout(dropout, name=f"dropout_{i}")(x)
    return keras.layers.Dense(n_classes, activation="softmax", name=HEAD_LAYER)(x)


def _autoencoder(inputs, cfg: Mapping, n_features: int):
    """Encoder to a bottleneck and a mirrored decoder back to the features."""
    units, bottleneck = int(cfg.get("units", 64)), int(cfg.get("bottleneck", 8))
    dropout = float(cfg.get("dropout", 0.0))
    x = keras.layers.Dense(units, activation="relu", name="encode")(inputs)
    if dropout:
        x = keras.layers.Dropout(dropout, name="dropout")(x)
    x = keras.layers.Dense(bottleneck, activation="relu", name="bottleneck")(x)
    x = keras.layers.Dense(units, activation="relu", name="decode")(x)
    return keras.layers.Dense(n_features, name="reconstruction")(x)


def _optimizer(name: str, learning_rate: float) -> keras.optimizers.Optimizer:
    """Return a fresh optimizer; ``name`` is ``adam`` or ``sgd``."""
    if name == "adam":
        return keras.optimizers.Adam(learning_rate=learning_rate)
    if name == "sgd":
        return keras.optimizers.SGD(learning_rate=learning_rate)
    raise FedadError(
        f"Unknown optimizer '{name}'. Set train.optimizer to one of: {', '.join(OPTIMIZERS)}."
    )
