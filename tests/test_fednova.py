"""FedNova: the server step on real sites' replies, FedAvg's when steps agree, and bad inputs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict
from flwr.common import MessageType
from flwr.serverapp.strategy import FedAvg
from generated import binary_data
from messages import server_message

from fedad.config import compose, make_settings
from fedad.data.prepared import PreparedData
from fedad.errors import FedadError
from fedad.federated import checkpoint
from fedad.federated.families.classifier import KerasFamily
from fedad.federated.fednova import FedNova, aggregate
from fedad.federated.shards import write_shards
from fedad.federated.strategies import build_strategy
from fedad.federated.task import load_site
from fedad.run.validate import validate

# FedNova's step is computed in float64 from float32 replies, Flower's FedAvg mean in float32:
# with equal steps the two agree to a float32 ulp of the weights (|w| < 1 here; 6e-8 measured).
EQUAL_STEPS_TOLERANCE = 1e-6


@pytest.fixture(scope="module")
def data() -> PreparedData:
    return binary_data(1400, 300, 10, n_informative=5, weights=[0.3], random_state=4)


def _replies(data, sizes: list[int], run_dir: Path) -> tuple[list[np.ndarray], list[Message]]:
    """The global model and one real trained reply per site of ``sizes`` rows each (SGD)."""
    order = np.random.default_rng(0).permutation(len(data.y_train))
    cuts = np.cumsum(sizes)[:-1]
    parts = [np.sort(p) for p in np.split(order[: sum(sizes)], cuts)]
    write_shards(data, parts, run_dir)
    cfg = compose(
        [
            "model=logistic",
            "train.optimizer=sgd",
            "train.learning_rate=0.05",
            "train.local_epochs=2",
            "train.batch_size=32",
            f"simulation.num_clients={len(parts)}",
        ]
    )
    settings = {**make_settings(cfg, data, len(parts), run_dir), "resume": False}
    family = KerasFamily(settings)
    family.init_runtime()
    family.seed_initial(0)
    start = family.initial_arrays()
    replies = []
    for pid in range(len(parts)):
        site = load_site(settings, pid, {}, family.val_fraction(), state=RecordDict())
        trained, metrics = family.fit(start, site, {}, seed=pid)
        content = RecordDict({"arrays": ArrayRecord(trained), "metrics": MetricRecord(metrics)})
        replies.append(Message(content, reply_to=server_message(start, MessageType.TRAIN, {}, pid)))
    return start, replies


def _fednova(start: list[np.ndarray], replies: list[Message]) -> list[np.ndarray]:
    strategy = build_strategy({"name": "fednova"}, 1.0, 1.0, 2)
    assert isinstance(strategy, FedNova)
    strategy.sent = start
    arrays, metrics = strategy.aggregate_train(1, replies)
    assert arrays is not None and metrics is not None and "train_steps" in metrics
    return arrays.to_numpy_ndarrays()


def _fedavg(replies: list[Message]) -> list[np.ndarray]:
    arrays, _ = FedAvg().aggregate_train(1, replies)
    assert arrays is not None
    return arrays.to_numpy_ndarrays()


def _metric(reply: Message, key: str) -> float:
    return float(reply.content["metrics"][key])


def test_with_equal_local_steps_fednova_is_fedavg(data, tmp_path):
    start, replies = _replies(data, [300, 300, 300], tmp_path)
    steps = {_metric(r, "train_steps") for r in replies}
    assert len(steps) == 1 and steps.pop() > 0
    nova, mean = _fednova(start, replies), _fedavg(replies)
    assert any(np.abs(a - w).max() > 1e-3 for a, w in zip(nova, start, strict=True))
    for a, b in zip(nova, mean, strict=True):
        assert a.dtype == b.dtype
        np.testing.assert_allclose(a, b, rtol=0, atol=EQUAL_STEPS_TOLERANCE)


def test_unequal_local_steps_are_normalized(data, tmp_path):
    start, replies = _replies(data, [100, 300, 900], tmp_path)
    tau = np.array([_metric(r, "train_steps") for r in replies])
    n = np.array([_metric(r, "num-examples") for r in replies])
    assert len(set(tau)) == 3
    # The paper's step, by hand: p_i, d_i = (w - w_i) / τ_i, τ_eff = Σ p_i τ_i.
    p = n / n.sum()
    tau_eff = float(p @ tau)
    models = [r.content["arrays"].to_numpy_ndarrays() for r in replies]
    nova = _fednova(start, replies)
    for i, w in enumerate(start):
        w64 = w.astype(np.float64)
        d = [(w64 - m[i].astype(np.float64)) / t for m, t in zip(models, tau, strict=True)]
        expected = w64 - tau_eff * sum(pi * di for pi, di in zip(p, d, strict=True))
        np.testing.assert_allclose(nova[i], expected, rtol=0, atol=1e-6)
    # FedAvg lets the site with nine times the steps pull further: the two differ.
    assert max(np.abs(a - b).max() for a, b in zip(nova, _fedavg(replies), strict=True)) > 1e-3


def test_a_site_without_steps_adds_nothing():
    w = [np.array([1.0, 2.0], np.float32)]
    moved = [np.array([0.0, 0.0], np.float32)]
    # The second site took no step (no rows): only the first moves the model, by its own change.
    new = aggregate(w, [moved, w], np.array([4.0, 0.0]), np.array([10.0, 0.0]))
    np.testing.assert_allclose(new[0], moved[0])
    assert aggregate(w, [w], np.array([0.0]), np.array([0.0]))[0].tolist() == [1.0, 2.0]


def test_fednova_keeps_no_state_between_rounds():
    assert checkpoint.strategy_state(build_strategy({"name": "fednova"}, 1.0, 1.0, 2)) == {}


@pytest.mark.parametrize(
    ("overrides", "words"),
    [
        (["train.optimizer=adam"], "strategy=fednova needs train.optimizer=sgd, got adam"),
        (["model=xgboost"], "strategy=fednova does not fit model=xgboost"),
        (["privacy=central"], "strategy=fednova aggregates"),
        (["secure_aggregation=secaggplus"], "strategy=fednova applies its own"),
        (["model=mlp", "personalize=fedrep"], "personalize=fedrep"),
        (["model=mlp", "model.batch_norm=true"], "model.batch_norm=true"),
    ],
)
def test_fednova_refuses_what_it_cannot_run_beside(overrides, words):
    with pytest.raises(FedadError, match=words):
        validate(compose(["strategy=fednova", "train.optimizer=sgd", *overrides]))


@pytest.mark.parametrize(
    "overrides", [[], ["model=autoencoder"], ["model=mlp", "personalize=fedper"], ["privacy=local"]]
)
def test_fednova_with_sgd_is_accepted(overrides):
    validate(compose(["strategy=fednova", "train.optimizer=sgd", *overrides]))
