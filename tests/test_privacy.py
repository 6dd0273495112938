"""Differential privacy: the budget against the accountant, Flower's DP code on fedad's messages.

The budget is checked against dp-accounting's RDP accountant called directly; the DP
strategy and the site mods run on real Flower messages; two small simulations check that a
DP run spends and records its budget round by round and that ``resume`` continues it, and
that a run without attack and privacy is bit-identical to the same run before they existed.
"""

from __future__ import annotations

import hashlib
import json
import math

import keras
import numpy as np
import pandas as pd
import pytest
from flwr.app import (
    ArrayRecord,
    Context,
    Error,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from generated import binary_data
from messages import server_message

from fedad.config import compose
from fedad.data.prepared import PreparedData
from fedad.federated import attacks, budget, privacy
from fedad.federated.simulation import run_federated
from fedad.federated.strategies import build_strategy
from fedad.report.__main__ import write_report

pytest.importorskip("dp_accounting", reason="privacy accounting needs fedad[dp]")

CENTRAL = {"name": "central", "noise_multiplier": 1.3, "clipping_norm": 1.0, "delta": 1e-5}
LOCAL = {"name": "local", "epsilon": 2.0, "clipping_norm": 0.5, "delta": 1e-5}
# Client-side adaptive clipping: the sites clip and report it, so a round needs no configure.
ADAPTIVE = {
    "name": "client_adaptive",
    "noise_multiplier": 0.05,
    "initial_clipping_norm": 0.1,
    "target_clipped_quantile": 0.5,
    "clip_norm_lr": 0.2,
    "clipped_count_stddev": None,
    "delta": 1e-5,
}


def _direct(noise: float, rounds: int, delta: float) -> float:
    """Epsilon from dp-accounting itself: a Gaussian mechanism composed ``rounds`` times."""
    from dp_accounting import dp_event
    from dp_accounting.rdp import RdpAccountant

    accountant = RdpAccountant()
    accountant.compose(dp_event.GaussianDpEvent(noise), rounds)
    return accountant.get_epsilon(delta)


@pytest.mark.parametrize("rounds", [1, 5, 20])
def test_epsilon_matches_the_accountant_called_directly(rounds):
    assert budget.epsilon(CENTRAL, rounds, 10, 10) == pytest.approx(
        _direct(1.3, rounds, 1e-5), rel=1e-9
    )
    # Local DP: LocalDpMod's calibration sigma = sensitivity * sqrt(2 ln(1.25/delta)) / epsilon.
    local_noise = math.sqrt(2 * math.log(1.25 / 1e-5)) / 2.0
    assert budget.noise_multiplier(LOCAL) == pytest.approx(local_noise)
    assert budget.epsilon(LOCAL, rounds, 10, 10) == pytest.approx(
        _direct(local_noise, rounds, 1e-5), rel=1e-9
    )


def test_epsilon_grows_with_the_rounds_and_shrinks_as_the_noise_grows():
    by_rounds = [budget.epsilon(CENTRAL, r, 10, 10) for r in range(0, 12)]
    assert by_rounds[0] == 0 and all(a < b for a, b in zip(by_rounds, by_rounds[1:], strict=False))
    by_noise = [
        budget.epsilon({**CENTRAL, "noise_multiplier": z}, 10, 10, 10) for z in (0.5, 1, 2, 4)
    ]
    assert all(a > b for a, b in zip(by_noise, by_noise[1:], strict=False))
    assert by_noise[2] < 10 < by_noise[1]  # noise 2 keeps 10 rounds below epsilon 10


def _reply(msg: Message, arrays: list[np.ndarray], **metrics) -> Message:
    content = {
        "arrays": ArrayRecord(arrays),
        "metrics": MetricRecord({"num-examples": 10, **metrics}),
    }
    return Message(RecordDict(content), reply_to=msg)


def _context(defaults_privacy: dict) -> tuple[dict, Context]:
    settings = {f"privacy.{k}": v for k, v in defaults_privacy.items() if v is not None}
    context = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
    return settings, context


def _norm(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    return math.sqrt(sum(float(np.sum((x - y) ** 2)) for x, y in zip(a, b, strict=True)))


def test_client_side_clipping_mod_clips_the_update_and_weighs_the_reply_alike():
    sent = [np.zeros((50, 4), np.float32), np.zeros(4, np.float32)]
    trained = [np.full((50, 4), 0.3, np.float32), np.full(4, 0.3, np.float32)]
    client = {**CENTRAL, "name": "client", "clipping_norm": 0.7}
    settings, context = _context(client)
    msg = server_message(sent, MessageType.TRAIN, {"clipping_norm": 0.7}, 0)
    reply = privacy.train_mod(settings)(msg, context, lambda m, c: _reply(m, trained))
    out = reply.content["arrays"].to_numpy_ndarrays()
    assert _norm(out, sent) == pytest.approx(0.7, rel=1e-5)
    assert _norm(trained, sent) > 0.7
    assert reply.content["metrics"][privacy.WEIGHT_KEY] == 1.0
    # Without privacy the reply is the handler's, untouched.
    plain, context = _context({"name": "none"})
    untouched = privacy.train_mod(plain)(msg, context, lambda m, c: _reply(m, trained))
    assert privacy.WEIGHT_KEY not in untouched.content["metrics"]
    assert _norm(untouched.content["arrays"].to_numpy_ndarrays(), trained) == 0


def test_local_dp_mod_sends_a_clipped_update_with_the_calibrated_noise():
    sent = [np.zeros(20000, np.float32)]
    trained = [np.full(20000, 0.01, np.float32)]  # norm 1.41, clipped to 0.5
    settings, context = _context(LOCAL)
    state = np.random.get_state()
    reply = privacy.train_mod(settings)(
        server_message(sent, MessageType.TRAIN, {}, 0), context, lambda m, c: _reply(m, trained)
    )
    assert all(np.array_equal(a, b) for a, b in zip(state, np.random.get_state(), strict=True))
    out = reply.content["arrays"].to_numpy_ndarrays()[0]
    clipped = 0.01 * 0.5 / math.sqrt(20000 * 0.01**2)
    sigma = 2 * 0.5 * math.sqrt(2 * math.log(1.25 / 1e-5)) / 2.0  # sensitivity 2 x clipping norm
    assert np.mean(out) == pytest.approx(clipped, abs=4 * sigma / math.sqrt(20000))
    assert np.std(out) == pytest.approx(sigma, rel=0.03)
    assert privacy.WEIGHT_KEY not in reply.content["metrics"]  # sites' weights stay their own


def _strategy(privacy_cfg: dict):
    weight = privacy.WEIGHT_KEY if privacy_cfg["name"] in privacy.CENTRAL else None
    return privacy.Private(
        build_strategy({"name": "fedavg"}, 1.0, 1.0, 2, weight_key=weight), privacy_cfg, 3, 3
    )


def _round(strategy, updates: list[np.ndarray], error: bool = False):
    sent = [np.zeros(400, np.float32)]
    replies = []
    for node, update in enumerate(updates, start=1):
        msg = server_message(sent, MessageType.TRAIN, {}, node - 1)
        metrics = {privacy.WEIGHT_KEY: 1.0, "norm_bit": 1}  # as adaptiveclipping_mod adds it
        replies.append(_reply(msg, [update.astype(np.float32)], **metrics))
    if error:
        replies[-1] = Message(Error(code=0, reason="injected"), reply_to=msg)
    return strategy.aggregate_train(1, replies)


def test_private_strategy_spends_its_budget_on_released_rounds_only():
    rng = np.random.default_rng(0)
    updates = [rng.normal(0, 1, 400) for _ in range(3)]
    strategy = _strategy(ADAPTIVE)
    arrays, _ = _round(strategy, updates)
    assert arrays is not None and strategy.releases == 1
    fields = strategy.history_fields()
    assert fields["epsilon"] == pytest.approx(_direct(0.05, 1, 1e-5), rel=1e-9)
    # Adapted to the sites' reports. Every site clipped, yet Flower 1.42 shrinks the norm:
    # it counts clipped updates where Andrew et al. count unclipped ones (docs/privacy.md).
    assert fields["clipping_norm"] < 0.1
    # A failed site: Flower's wrapper releases nothing, so nothing is spent.
    assert _round(strategy, updates, error=True) == (None, None)
    assert strategy.releases == 1 and strategy.history_fields()["epsilon"] == fields["epsilon"]
    # A missing reply: the noise is calibrated to three sites, so no release either.
    assert _round(strategy, updates[:2]) == (None, None) and strategy.releases == 1
    # The noise is secret: the same round from the same global NumPy state differs, and
    # the state is left as it was.
    outputs = []
    for _ in range(2):
        np.random.seed(0)
        outputs.append(_round(_strategy(ADAPTIVE), updates)[0].to_numpy_ndarrays()[0])
        assert np.random.randint(2**31) == np.random.RandomState(0).randint(2**31)
    assert not np.array_equal(*outputs)
    # Resumed: a fresh strategy replays the releases a history row records.
    again = _strategy(ADAPTIVE)
    again.restore({"dp_releases": 3, "clipping_norm": 0.25})
    assert again.history_fields()["epsilon"] == pytest.approx(_direct(0.05, 3, 1e-5), rel=1e-9)
    assert again.strategy.clipping_norm == 0.25


def test_local_dp_leaves_the_strategy_and_counts_each_round():
    updates = [np.full(400, i, np.float32) for i in range(3)]
    strategy = _strategy(LOCAL)
    arrays, _ = _round(strategy, updates)
    np.testing.assert_allclose(arrays.to_numpy_ndarrays()[0], 1.0)  # the plain mean
    assert strategy.history_fields()["epsilon"] == pytest.approx(
        budget.epsilon(LOCAL, 1, 3, 3), rel=1e-12
    )


def test_report_gives_macro_f1_against_epsilon_beside_the_same_sites_without_dp(tmp_path):
    runs = [
        (10, 1.0, 19.05, 0.55),
        (10, 2.0, 8.08, 0.45),
        (100, 2.0, 8.08, 0.70),
        (10, None, None, 0.80),
    ]
    for i, (sites, noise, epsilon, f1) in enumerate(runs):
        dp = {"name": "none"} if noise is None else {**CENTRAL, "noise_multiplier": noise}
        model = {
            "kind": "federated",
            "macro_f1": f1,
            "info": {"privacy": {**dp, "epsilon": epsilon}},
        }
        (tmp_path / f"job{i}").mkdir()
        (tmp_path / f"job{i}" / "results.json").write_text(
            json.dumps(
                {
                    "status": "done",
                    "settings": {"strategy": "fedavg", "seed": 0, "num_clients": sites},
                    "models": {"federated_cnn": model},
                }
            )
        )
    text = write_report(tmp_path).read_text()
    table = pd.read_csv(tmp_path / "privacy.csv")
    assert list(table["num_clients"]) == [10, 10, 100]
    assert table["kept"].tolist()[:2] == pytest.approx([0.55 - 0.80, 0.45 - 0.80])
    assert math.isnan(table["kept"].iloc[2])  # no 100-site run without DP in the folder
    assert "| central | 10 | 2 | 1 | 8.08 | 1e-05 | 0.450 | 0.800 | -0.350 |" in text
    assert (tmp_path / "f1_vs_epsilon.png").exists()


@pytest.fixture(scope="module")
def data() -> PreparedData:
    return binary_data(
        900,
        300,
        12,
        scale=(0.5, 10, 3),
        n_informative=6,
        weights=[0.3],
        class_sep=1.5,
        random_state=1,
    )


@pytest.fixture(scope="module")
def parts() -> list[np.ndarray]:
    return [np.sort(p) for p in np.array_split(np.random.default_rng(3).permutation(900), 3)]


# History of this run (columns but seconds and started_at, as CSV) and the saved model's
# weights. Until the sites trained through the compiled step they were those of commit 484a7e1,
# the last before attacks and privacy existed (the weights those of dd3763a too), which showed
# that attack=none and privacy=none change nothing. The compiled step orders each epoch's rows
# by the seed instead of Keras' shuffle, and adds `train_steps` to the history: the reference is
# now the step's run (commit 08c8b14), and any later change to what such a run computes shows.
REFERENCE_HISTORY = "e7a8c28c7df276546569716056d3a2481d3f2de53b982bd69843c0a3c31aef61"
REFERENCE_WEIGHTS = "52b7fce0535dfb58cb2a67ad765891a9aecf40f5674d053f26c19389229a44c8"
REFERENCE_LOSS = [0.6847115159034729, 0.435880184173584, 0.3508135974407196]


@pytest.mark.slow
def test_no_attack_no_privacy_is_bit_identical_to_the_reference_run(data, parts, tmp_path):
    cfg = compose(
        [
            "simulation.num_clients=3",
            "simulation.num_rounds=2",
            "simulation.local_sites=0",
            "seed=11",
            # The code before them started a fresh optimizer every round, trained every round
            # and decided at argmax.
            "train.keep_optimizer=false",
            "simulation.stop.patience=0",
            "decision.rule=argmax",
        ]
    )
    assert cfg.attack.name == "none" and cfg.privacy.name == "none"
    result = run_federated(cfg, data, parts, tmp_path)[0]
    history = result.history.drop(columns=["seconds", "started_at"])
    assert history["loss"].tolist() == REFERENCE_LOSS
    assert hashlib.sha256(history.to_csv(index=False).encode()).hexdigest() == REFERENCE_HISTORY
    digest = hashlib.sha256()
    for weights in keras.models.load_model(result.model.path, compile=False).get_weights():
        digest.update(np.ascontiguousarray(weights).tobytes())
    assert digest.hexdigest() == REFERENCE_WEIGHTS
    # What the run records of its attack, privacy and scaling (no DP note: none ran).
    run_info = {k: result.info.get(k) for k in ("attack", "privacy", "scaling_sites", "note")}
    assert run_info == {
        "attack": {"name": "none", "malicious_sites": []},
        "privacy": {"name": "none"},
        "scaling_sites": 3,
        "note": None,
    }


@pytest.mark.slow
def test_a_private_attacked_run_records_its_budget_and_resume_continues_it(data, parts, tmp_path):
    overrides = [
        "model=logistic",
        "simulation.num_clients=3",
        "simulation.local_sites=0",
        "seed=4",
        "privacy=client",
        "privacy.noise_multiplier=0.8",
        "attack=targeted_flip",
        "attack.fraction=0.34",
    ]
    first = run_federated(compose([*overrides, "simulation.num_rounds=2"]), data, parts, tmp_path)[
        0
    ]
    assert list(first.history["dp_releases"]) == [0, 1, 2]
    resumed = run_federated(
        compose([*overrides, "simulation.num_rounds=3"]), data, parts, tmp_path, resume=True
    )[0]
    history = resumed.history
    assert list(history["round"]) == [0, 1, 2, 3]
    assert list(history["dp_releases"]) == [0, 1, 2, 3]  # every round released: mods composed
    expected = [budget.epsilon({**CENTRAL, "noise_multiplier": 0.8}, r, 3, 3) for r in range(4)]
    assert history["epsilon"].tolist() == pytest.approx(expected, rel=1e-9)
    assert history["epsilon"].iloc[3] == pytest.approx(_direct(0.8, 3, 1e-5), rel=1e-9)
    assert history["attack_success"].between(0, 1).all()
    assert resumed.metrics["epsilon"] == pytest.approx(expected[-1])
    assert 0 <= resumed.metrics["attack_success"] <= 1
    malicious = resumed.info["attack"]["malicious_sites"]
    assert malicious == attacks.malicious_sites(4, 3, 0.34) and len(malicious) == 1
    assert resumed.info["note"] == f"ε = {expected[-1]:.3g}, δ = 1e-05"
