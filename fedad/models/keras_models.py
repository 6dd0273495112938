"""Keras models trained by the federated sites and the centralized baselines."""

from __future__ import annotations

import math
from collections.abc import Mapping

import keras

from fedad.errors import FedadError
from fedad.models.catalog import MODEL_NAMES, OPTIMIZERS


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
        outputs = keras.layers.Dense(n_classes, activation="softmax", name="softmax")(inputs)
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
        optimizer=_optimizer(optimizer, learning_rate),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    return model


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
    return keras.layers.Dense(n_classes, activation="softmax", name="softmax")(x)


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
    return keras.layers.Dense(n_classes, activation="softmax", name="softmax")(x)


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
