"""The sites' compiled training step: Keras' fit on the same batches, FedProx, state, stopping."""

from __future__ import annotations

import math
from itertools import islice
from pathlib import Path

import keras
import numpy as np
import pytest
from flwr.app import ArrayRecord, RecordDict

from fedad.config import compose, make_settings
from fedad.data.prepared import PreparedData
from fedad.federated.families.classifier import (
    OPTIMIZER_STATE,
    init_runtime,
    local_model,
    start_local,
    train_local,
)
from fedad.models.keras_models import row_orders

# The compiled step and Keras' fit, given the same start, seeds and batches, agree to this
# (absolute, on every weight after three epochs; docs/architecture.md). Both run Keras' own
# train step, so on one machine they agree bit for bit; the tolerance leaves room for a
# different summation order of another TensorFlow build.
FIT_TOLERANCE = 1e-5


def _data(n_features: int = 8, rows: int = 400, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(rows, n_features)).astype(np.float32)
    y = (X[:, 0] + 0.5 * X[:, 1] > 0.3).astype(np.int64)
    return X, y


def _settings(tmp_path: Path, *overrides: str) -> dict:
    X, y = _data()
    data = PreparedData(X, y, X[:10], y[:10], list("abcdefgh"), ["normal", "attack"], "binary")
    cfg = compose(["simulation.num_clients=2", "train.batch_size=32", *overrides])
    settings = {**make_settings(cfg, data, 2, tmp_path), "resume": False, "fingerprint": "{}"}
    init_runtime(settings)
    return settings


def _equal(a: list[np.ndarray], b: list[np.ndarray]) -> bool:
    return all(np.array_equal(u, v) for u, v in zip(a, b, strict=True))


def _distance(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    return math.sqrt(sum(float(np.sum((u - v) ** 2)) for u, v in zip(a, b, strict=True)))


@pytest.mark.parametrize(
    "model", ["model=mlp model.batch_norm=true", "model=autoencoder model.dropout=0.2"]
)
def test_the_compiled_step_trains_as_keras_fit_on_the_same_batches(tmp_path, model):
    settings = _settings(tmp_path, *model.split(), "train.local_epochs=3")
    net = local_model(settings)
    X, y = _data()
    autoencoder = net.steps.classify is False
    targets = X if autoencoder else y
    weights = np.linspace(0.5, 2.0, len(y)).astype(np.float32)
    keras.utils.set_random_seed(3)
    start = [w + np.float32(0.05) for w in net.get_weights()]
    mu, seed = 0.1, 11

    # Keras' fit, one epoch a call, on the rows in the orders the compiled step uses.
    start_local(net, start, settings, mu, seed)
    history = []
    for order in islice(row_orders(seed, len(y)), 3):
        fitted = net.fit(
            X[order],
            targets[order],
            sample_weight=weights[order],
            batch_size=32,
            epochs=1,
            shuffle=False,
            verbose=0,
        )
        history.append(fitted.history)
    by_fit = net.get_weights()

    out = train_local(net, start, X, targets, settings, mu=mu, seed=seed, sample_weight=weights)
    compiled = net.get_weights()
    assert not _equal(compiled, start)
    for a, b in zip(compiled, by_fit, strict=True):
        np.testing.assert_allclose(a, b, rtol=0, atol=FIT_TOLERANCE)
    # The reported loss (proximal term included) and accuracy are fit's last epoch's.
    assert out["train_epochs"] == 3 and out["train_steps"] == 3 * math.ceil(len(y) / 32)
    assert out["train_loss"] == pytest.approx(history[-1]["loss"][0], rel=1e-5)
    if autoencoder:
        assert "train_accuracy" not in out
    else:
        assert out["train_accuracy"] == pytest.approx(history[-1]["accuracy"][0], abs=1e-6)


def test_one_seed_gives_one_update_whatever_the_actor_ran_before(tmp_path):
    settings = _settings(tmp_path, "model=mlp", "train.local_epochs=2")
    net = local_model(settings)
    X, y = _data()
    other_X, other_y = _data(seed=5)
    start = net.get_weights()

    def update(seed: int, rows: tuple[np.ndarray, np.ndarray] = (X, y)) -> list[np.ndarray]:
        train_local(net, start, *rows, settings, mu=0.0, seed=seed)
        return net.get_weights()

    first = update(1)
    update(2, (other_X, other_y))  # another site, served by the same cached model
    assert _equal(update(1), first)
    # The seed orders the rows and draws the dropout masks: another seed, another update.
    assert not _equal(update(2), first)


def test_the_proximal_term_pulls_towards_its_anchor(tmp_path):
    settings = _settings(tmp_path, "model=logistic", "train.local_epochs=3")
    net = local_model(settings)
    X, y = _data()
    start = [w + np.float32(0.5) for w in net.get_weights()]
    anchor = [w - np.float32(0.2) for w in start]

    def update(mu: float, towards: list[np.ndarray] | None = None) -> list[np.ndarray]:
        train_local(net, start, X, y, settings, mu=mu, seed=1, anchor=towards)
        return net.get_weights()

    plain, held = update(0.0), update(50.0)
    # mu large: the update stays near the starting weights (the default anchor).
    assert _distance(held, start) < 0.2 * _distance(plain, start)
    # Anchored elsewhere, it heads there: each weight moves towards the anchor.
    pulled = update(50.0, anchor)
    assert _distance(pulled, anchor) < 0.5 * _distance(start, anchor)
    # With mu = 0 the anchor plays no part.
    assert _equal(update(0.0, anchor), plain)


def test_a_site_optimizer_goes_on_from_its_kept_state(tmp_path):
    settings = _settings(tmp_path, "model=mlp")
    net = local_model(settings)
    X, y = _data()
    start = net.get_weights()
    steps = math.ceil(len(y) / 32)
    state = RecordDict()
    train_local(net, start, X, y, settings, mu=0.0, seed=1, state=state)
    after_one = net.get_weights()
    kept = [v.copy() for v in state[OPTIMIZER_STATE].to_numpy_ndarrays()]
    # Another site trains with the actor's cached model and optimizer in between.
    train_local(net, start, *_data(seed=5), settings, mu=0.0, seed=2, state=RecordDict())

    train_local(net, after_one, X, y, settings, mu=0.0, seed=2, state=state)
    second = net.get_weights()
    assert int(state[OPTIMIZER_STATE].to_numpy_ndarrays()[0]) == 2 * steps
    # The same kept state, handed over afresh (as a resumed site reads it), gives the same step.
    train_local(
        net,
        after_one,
        X,
        y,
        settings,
        0.0,
        2,
        state=RecordDict({OPTIMIZER_STATE: ArrayRecord(kept)}),
    )
    assert _equal(net.get_weights(), second)
    # A fresh optimizer (no state) takes another step: the moments were restored, not zeroed.
    train_local(net, after_one, X, y, settings, mu=0.0, seed=2)
    assert not _equal(net.get_weights(), second)


def test_early_stopping_keeps_the_best_epoch(tmp_path):
    settings = _settings(tmp_path, "model=mlp", "train.local_epochs=10")
    settings["train.early_stopping_patience"] = 2
    net = local_model(settings)
    X, y = _data()
    start = net.get_weights()
    # Validation labels opposite to the training labels: the validation loss is lowest after
    # the first epoch and rises from there on.
    flipped = (X[:100], 1 - y[:100])
    out = train_local(net, start, X, y, settings, mu=0.0, seed=4, validation=flipped)
    stopped = net.get_weights()
    assert out["train_epochs"] == 3 and out["train_steps"] == math.ceil(len(y) / 32)
    settings["train.local_epochs"] = 1
    train_local(net, start, X, y, settings, mu=0.0, seed=4)
    assert _equal(stopped, net.get_weights())
    # Honest validation rows keep improving: every epoch runs, the last one is kept.
    settings["train.local_epochs"] = 4
    honest = train_local(net, start, X, y, settings, mu=0.0, seed=4, validation=(X[:100], y[:100]))
    assert honest["train_epochs"] == 4 and honest["train_steps"] == 4 * math.ceil(len(y) / 32)
