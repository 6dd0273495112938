"""FedPer and FedRep: the body travels, a site's head never leaves it, a resume changes nothing."""

from __future__ import annotations

import keras
import numpy as np
import pandas as pd
import pytest
from flwr.app import ArrayRecord, MessageType
from flwr.serverapp.strategy import FedAvg
from messages import server_message
from test_personalize import (
    SITES,
    SMALL,
    initial_model,
    same_metrics,
    site_context,
    site_settings,
    small_data,
)

from fedad.config import compose
from fedad.data.prepared import PreparedData
from fedad.federated import personalize
from fedad.federated.client_app import handle_evaluate, handle_train
from fedad.federated.families.classifier import local_model
from fedad.federated.grid import payload
from fedad.federated.rounds import complete_replies, keep_unsent
from fedad.federated.simulation import run_federated
from fedad.models.keras_models import HEAD_LAYER, TrainingSteps

ROUNDS = 3
# A small MLP: its body is two Dense layers, its head the softmax layer (kernel and bias).
MLP = ("model=mlp", "model.units=16", "model.layers=2")
HEAD = 2


@pytest.fixture(scope="module")
def data() -> PreparedData:
    return small_data()


def _round(settings, contexts, arrays, server_round):
    """One round as :class:`fedad.federated.rounds.Rounds` runs it: train, average, evaluate.

    The replies are completed and averaged, and the server's head kept, as there.

    Returns what each site sent (its reply's array keys, arrays and array bytes, before the
    server completes the replies in place), the next global model and the evaluate replies.
    """
    sent = ArrayRecord(arrays)
    replies = [
        handle_train(
            server_message(arrays, MessageType.TRAIN, {"server-round": server_round}, pid),
            contexts[pid],
            settings,
        )
        for pid in range(SITES)
    ]
    assert all(set(r.content.keys()) == {"arrays", "metrics"} for r in replies)
    sent_up = [
        (list(r.content["arrays"].keys()), r.content["arrays"].to_numpy_ndarrays(), payload(r)[0])
        for r in replies
    ]
    carried = complete_replies(replies, sent)
    merged, _ = FedAvg().aggregate_train(server_round, replies)
    assert merged is not None and carried is not None
    merged = keep_unsent(merged, sent, carried).to_numpy_ndarrays()
    config = {"server-round": server_round}
    evaluations = [
        handle_evaluate(
            server_message(merged, MessageType.EVALUATE, config, pid), contexts[pid], settings
        )
        for pid in range(SITES)
    ]
    return sent_up, merged, evaluations


def _final(settings, contexts, arrays):
    config = {"server-round": ROUNDS, "final": True}
    return [
        handle_evaluate(
            server_message(arrays, MessageType.EVALUATE, config, pid), contexts[pid], settings
        )
        for pid in range(SITES)
    ]


@pytest.mark.parametrize("method", ["fedper", "fedrep"])
def test_a_reply_never_holds_a_site_head(data, tmp_path, method):
    settings = site_settings(data, tmp_path, f"personalize={method}", *MLP)
    start = initial_model(settings)
    contexts = [site_context(pid) for pid in range(SITES)]
    arrays = start
    for server_round in (1, 2):
        sent_up, merged, _ = _round(settings, contexts, arrays, server_round)
        bodies = [body for _, body, _ in sent_up]
        for pid, (keys, body, up) in enumerate(sent_up):
            head = contexts[pid].state[personalize.HEAD_STATE].to_numpy_ndarrays()
            # The site trained its head: it is no longer the server's (the initial one).
            assert not np.array_equal(head[0], start[-HEAD][0])
            # The reply holds the body under the model's own keys: no head array, no head shape.
            assert keys == [str(i) for i in range(len(start) - HEAD)]
            assert all(a.shape == b.shape for a, b in zip(body, start, strict=False))
            assert not any(a.shape == h.shape for a in body for h in head)
            # What travels up is the body's bytes, not the whole model's.
            assert up == ArrayRecord(body).count_bytes() < ArrayRecord(start).count_bytes()
        # The server averaged the bodies and kept its own head, bit for bit.
        for got, bodies_at in zip(merged, zip(*bodies, strict=True), strict=False):
            np.testing.assert_allclose(got, np.mean(bodies_at, axis=0), rtol=1e-6)
        for got, kept in zip(merged[-HEAD:], start[-HEAD:], strict=True):
            np.testing.assert_array_equal(got, kept)
        arrays = merged
    for reply in _final(settings, contexts, arrays):
        assert set(reply.content.keys()) == {"metrics"}
        metrics = reply.content["metrics"]
        assert all(isinstance(v, int | float) for v in metrics.values())
        # The site's own model (the shared body, its head), not the server's scored twice.
        assert metrics[f"{personalize.PREFIX}loss"] != metrics["loss"]


def test_rounds_before_the_final_pass_score_the_sites_own_models(data, tmp_path):
    settings = site_settings(data, tmp_path, "personalize=fedper", *MLP)
    plain = {**settings, "personalize.name": "none"}
    contexts = [site_context(pid) for pid in range(SITES)]
    _, merged, evaluations = _round(settings, contexts, initial_model(settings), 1)
    for pid, reply in enumerate(evaluations):
        own = personalize.own_model(merged, contexts[pid].state, settings)
        config = {"server-round": 1}
        expected = handle_evaluate(
            server_message(own, MessageType.EVALUATE, config, pid), site_context(pid), plain
        )
        assert same_metrics(reply.content["metrics"], expected.content["metrics"])


def test_a_resumed_fedrep_run_equals_an_uninterrupted_one(data, tmp_path):
    # FedRep: the head state of FedPer, and an optimizer across its two phases besides.
    overrides = ("personalize=fedrep", *MLP, "simulation.checkpoint_every=1")
    whole = site_settings(data, tmp_path / "whole", *overrides)
    cut = site_settings(data, tmp_path / "cut", *overrides)
    start = initial_model(whole)
    contexts = [site_context(pid) for pid in range(SITES)]
    arrays = start
    for server_round in range(1, ROUNDS + 1):
        _, arrays, expected_evaluations = _round(whole, contexts, arrays, server_round)
    expected_final = _final(whole, contexts, arrays)

    # Cut after round 2: the sites' memory is gone, their disks keep their heads.
    middle = start
    cut_contexts = [site_context(pid) for pid in range(SITES)]
    for server_round in range(1, ROUNDS):
        _, middle, _ = _round(cut, cut_contexts, middle, server_round)
    resumed = {**cut, "resume": True}
    fresh = [site_context(pid) for pid in range(SITES)]
    _, again, evaluations = _round(resumed, fresh, middle, ROUNDS)
    assert all(personalize.HEAD_STATE in c.state for c in fresh)
    for a, b in zip(again, arrays, strict=True):
        np.testing.assert_array_equal(a, b)
    for ours, theirs in zip(evaluations, expected_evaluations, strict=True):
        assert same_metrics(ours.content["metrics"], theirs.content["metrics"])
    for ours, theirs in zip(_final(resumed, fresh, again), expected_final, strict=True):
        assert same_metrics(ours.content["metrics"], theirs.content["metrics"])
    # A resumed site that never trains again reads its head from its disk, in a round's
    # evaluation as in the final pass.
    idle = [site_context(pid) for pid in range(SITES)]
    config = {"server-round": ROUNDS}
    for pid, theirs in enumerate(expected_evaluations):
        message = server_message(again, MessageType.EVALUATE, config, pid)
        ours = handle_evaluate(message, site_context(pid), resumed)
        assert same_metrics(ours.content["metrics"], theirs.content["metrics"])
    for ours, theirs in zip(_final(resumed, idle, again), expected_final, strict=True):
        assert same_metrics(ours.content["metrics"], theirs.content["metrics"])


def test_a_frozen_part_takes_no_step(data, tmp_path):
    settings = site_settings(data, tmp_path, "personalize=fedrep", *MLP)
    model = local_model(settings)
    head = model.get_layer(HEAD_LAYER).trainable_variables
    body = [v for v in model.trainable_variables if all(v is not h for h in head)]
    X, y = data.X_train[:64], data.y_train[:64]
    for trained in (head, body):
        steps = TrainingSteps(model, trained)
        steps.correct(None)
        before = [np.array(w.numpy()) for w in model.weights]
        steps.epoch(X, y, np.ones(len(y), np.float32), 16)
        moved = {
            id(w) for w, b in zip(model.weights, before, strict=True) if not np.array_equal(w, b)
        }
        assert moved == {id(v) for v in trained}


@pytest.mark.long
def test_a_fedper_simulation_averages_bodies_keeps_its_head_and_scores_each_site(data, tmp_path):
    # A whole run on the Simulation Engine, under FedAdam: a strategy that updates the model it
    # sent, so the replies' missing head must reach it as the sent one (a zero update).
    overrides = (
        "personalize=fedper",
        *MLP,
        "strategy=fedadam",
        "simulation.fraction_train=1.0",
        "simulation.local_sites=0",
    )
    cfg = compose([*SMALL, *overrides])
    parts = np.array_split(np.random.default_rng(0).permutation(len(data.y_train)), SITES)
    run_federated(cfg, data, parts, tmp_path / "run")
    start = initial_model(site_settings(data, tmp_path / "twin", *overrides))
    saved = keras.models.load_model(tmp_path / "run" / "global_model.keras", compile=False)
    for got, kept in zip(saved.get_weights()[-HEAD:], start[-HEAD:], strict=True):
        np.testing.assert_array_equal(got, kept)
    assert not np.array_equal(saved.get_weights()[0], start[0])
    clients = pd.read_csv(tmp_path / "run" / "clients.csv")
    assert clients[f"{personalize.PREFIX}macro_f1"].notna().all()
    history = pd.read_csv(tmp_path / "run" / "history.csv")
    body = ArrayRecord(start[:-HEAD]).count_bytes()
    # Every round, each of the sites sent its body up: nothing more.
    assert (history.loc[history["round"] > 0, "bytes_up_arrays"] == SITES * body).all()
