"""Tests for the Keras models the federated clients and baselines train."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from fedad.errors import FedadError
from fedad.models.keras_models import build_model

CNN = {"name": "cnn", "filters": 8, "kernel_size": 3, "dense_units": 16, "dropout": 0.3}


@pytest.mark.parametrize("n_features", [1, 16, 20, 41])
@pytest.mark.parametrize("n_classes", [2, 5])
def test_cnn_takes_2d_rows_and_returns_probabilities(n_features, n_classes):
    model = build_model(CNN, n_features, n_classes, 1e-3, "adam")
    probs = model.predict(np.random.default_rng(0).random((7, n_features)), verbose=0)
    assert probs.shape == (7, n_classes)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)


def test_cnn_pads_features_to_a_square_image_and_reads_sizes_from_config():
    model = build_model(CNN, 20, 2, 1e-3, "adam")
    assert model.get_layer("as_image").output.shape[1:] == (5, 5, 1)
    assert model.get_layer("conv").filters == 8
    assert model.get_layer("conv").kernel_size == (3, 3)
    assert model.get_layer("dense").units == 16
    assert model.get_layer("dropout").rate == 0.3


def test_logistic_is_one_softmax_layer():
    model = build_model({"name": "logistic"}, 20, 3, 0.1, "sgd")
    dense = [layer for layer in model.layers if isinstance(layer, keras.layers.Dense)]
    assert len(dense) == 1
    assert model.count_params() == (20 + 1) * 3
    assert isinstance(model.optimizer, keras.optimizers.SGD)


@pytest.mark.parametrize("cfg", [CNN, {"name": "logistic"}])
def test_models_learn_a_separable_problem(cfg):
    rng = np.random.default_rng(0)
    X = rng.normal(size=(600, 12)).astype(np.float32)
    y = (X[:, 0] + X[:, 1] > 0).astype(np.int64)
    keras.utils.set_random_seed(0)
    model = build_model(cfg, 12, 2, 0.01, "adam")
    history = model.fit(X, y, epochs=8, batch_size=32, verbose=0).history
    assert history["loss"][-1] < history["loss"][0]
    assert history["accuracy"][-1] > 0.9


@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")
def test_saved_cnn_reloads_with_the_same_predictions(tmp_path):
    model = build_model(CNN, 10, 3, 1e-3, "adam")
    X = np.random.default_rng(1).random((5, 10)).astype(np.float32)
    model.save(tmp_path / "m.keras")
    loaded = keras.models.load_model(tmp_path / "m.keras", compile=False)
    np.testing.assert_allclose(loaded.predict(X, verbose=0), model.predict(X, verbose=0))


def test_unknown_model_lists_the_valid_names():
    with pytest.raises(FedadError, match="cnn, logistic"):
        build_model({"name": "transformer"}, 10, 2, 1e-3, "adam")


def test_unknown_optimizer_is_a_user_error():
    with pytest.raises(FedadError, match="adam, sgd"):
        build_model({"name": "logistic"}, 10, 2, 1e-3, "rmsprop")


def test_invalid_cnn_sizes_are_a_user_error():
    with pytest.raises(FedadError, match="dropout"):
        build_model({**CNN, "dropout": 1.5}, 10, 2, 1e-3, "adam")
