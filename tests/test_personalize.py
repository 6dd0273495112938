"""Personal models (finetune, ditto): kept at the site, resumable, bad inputs refused."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Context, MessageType, RecordDict
from messages import server_message
from sklearn.datasets import make_classification

from fedad.config import compose
from fedad.data.prepared import PreparedData
from fedad.errors import FedadError
from fedad.federated import personalize
from fedad.federated.client_app import handle_evaluate, handle_train
from fedad.federated.simulation import prepare_sites
from fedad.run.validate import validate

REPO = Path(__file__).resolve().parents[1]
SITES, ROUNDS = 3, 3
# Small and quick: a logistic model, three sites of ~130 training rows.
SMALL = [
    "model=logistic",
    "partition=iid",
    f"simulation.num_clients={SITES}",
    f"simulation.num_rounds={ROUNDS}",
    "simulation.stop.patience=0",
    "decision.rule=argmax",
    "train.batch_size=32",
]


@pytest.fixture(scope="module")
def data() -> PreparedData:
    return small_data()


def small_data() -> PreparedData:
    """Two classes, ten features, 720 training rows: three sites of ~130 after validation."""
    X, y = make_classification(
        n_samples=900, n_features=10, n_informative=5, weights=[0.6], random_state=3
    )
    return PreparedData(
        X_train=X[:720].astype(np.float32),
        y_train=y[:720].astype(np.int64),
        X_test=X[720:].astype(np.float32),
        y_test=y[720:].astype(np.int64),
        feature_names=[f"f{i}" for i in range(10)],
        class_names=["normal", "attack"],
        task="binary",
    )


def site_settings(data: PreparedData, run_dir: Path, *overrides: str) -> dict:
    """The apps' settings of a small run whose shards are written to ``run_dir``."""
    cfg = compose([*SMALL, *overrides])
    parts = np.array_split(np.random.default_rng(0).permutation(len(data.y_train)), SITES)
    return prepare_sites(cfg, data, parts, run_dir)


def site_context(pid: int) -> Context:
    node = {"partition-id": pid, "num-partitions": SITES}
    return Context(run_id=1, node_id=pid + 1, node_config=node, state=RecordDict(), run_config={})


def initial_model(settings: dict) -> list[np.ndarray]:
    from fedad.federated.families.registry import family_for

    family = family_for(settings)
    family.init_runtime()
    family.seed_initial(int(settings["seed"]))
    return family.initial_arrays()


def _round(settings, contexts, arrays, server_round):
    """One round at every site; the replies and their plain mean (the next global model)."""
    replies = [
        handle_train(
            server_message(arrays, MessageType.TRAIN, {"server-round": server_round}, pid),
            contexts[pid],
            settings,
        )
        for pid in range(SITES)
    ]
    updates = [r.content["arrays"].to_numpy_ndarrays() for r in replies]
    return replies, [np.mean(layer, axis=0) for layer in zip(*updates, strict=True)]


def _final(settings, contexts, arrays):
    config = {"server-round": ROUNDS, "final": True}
    return [
        handle_evaluate(
            server_message(arrays, MessageType.EVALUATE, config, pid), contexts[pid], settings
        )
        for pid in range(SITES)
    ]


def same_metrics(ours, theirs) -> bool:
    """Exactly the same metrics (NaN where both are undefined)."""
    return dict(ours).keys() == dict(theirs).keys() and all(
        ours[k] == theirs[k] or (np.isnan(ours[k]) and np.isnan(theirs[k])) for k in ours
    )


def _train(settings, contexts, arrays, rounds):
    for server_round in rounds:
        replies, arrays = _round(settings, contexts, arrays, server_round)
    return replies, arrays


@pytest.mark.parametrize("method", ["ditto", "finetune"])
def test_replies_never_hold_a_personal_model(data, tmp_path, method):
    personal = site_settings(data, tmp_path, f"personalize={method}", "personalize.epochs=2")
    plain = {**personal, "personalize.name": "none"}
    start = initial_model(personal)
    ours, theirs = (
        [site_context(pid) for pid in range(SITES)],
        [site_context(pid) for pid in range(SITES)],
    )
    for server_round in (1, 2):
        replies, arrays = _round(personal, ours, start, server_round)
        expected, _ = _round(plain, theirs, start, server_round)
        for reply, same in zip(replies, expected, strict=True):
            # The global update only: what the site would send without personalization.
            assert set(reply.content.keys()) == {"arrays", "metrics"}
            sent = reply.content["arrays"].to_numpy_ndarrays()
            for a, b in zip(sent, same.content["arrays"].to_numpy_ndarrays(), strict=True):
                np.testing.assert_array_equal(a, b)
            assert not any(k.startswith(personalize.PREFIX) for k in reply.content["metrics"])
        start = arrays
    for pid, context in enumerate(ours):
        kept = personalize.PERSONAL_STATE in context.state
        assert kept == (method == "ditto")
        if kept:
            mine = context.state[personalize.PERSONAL_STATE].to_numpy_ndarrays()
            sent = replies[pid].content["arrays"].to_numpy_ndarrays()
            assert not all(np.array_equal(a, b) for a, b in zip(mine, sent, strict=True))
    for reply in _final(personal, ours, start):
        # Metrics only: scalars, the personal model's among them; no array of any kind.
        assert set(reply.content.keys()) == {"metrics"}
        metrics = reply.content["metrics"]
        assert all(isinstance(v, int | float) for v in metrics.values())
        assert {f"{personalize.PREFIX}{k}" for k in ("macro_f1", "fpr", "recall")} <= set(metrics)
        # A model of the site's own, not the global one scored twice.
        assert metrics[f"{personalize.PREFIX}loss"] != metrics["loss"]


def test_a_resumed_ditto_run_equals_an_uninterrupted_one(data, tmp_path):
    overrides = ("personalize=ditto", "personalize.lambda=0.5", "simulation.checkpoint_every=1")
    whole = site_settings(data, tmp_path / "whole", *overrides)
    cut = site_settings(data, tmp_path / "cut", *overrides)
    start = initial_model(whole)
    contexts = [site_context(pid) for pid in range(SITES)]
    expected, arrays = _train(whole, contexts, start, range(1, ROUNDS + 1))
    expected_final = _final(whole, contexts, arrays)

    # Cut after round 2: the sites' memory is gone, their disks keep it.
    _, middle = _train(cut, [site_context(pid) for pid in range(SITES)], start, range(1, ROUNDS))
    resumed = {**cut, "resume": True}
    fresh = [site_context(pid) for pid in range(SITES)]
    replies, again = _train(resumed, fresh, middle, [ROUNDS])
    assert all(personalize.PERSONAL_STATE in c.state for c in fresh)
    for a, b in zip(again, arrays, strict=True):
        np.testing.assert_array_equal(a, b)
    for ours, theirs in zip(_final(resumed, fresh, again), expected_final, strict=True):
        assert same_metrics(ours.content["metrics"], theirs.content["metrics"])
    # And a resumed site that never trains again reads its personal model from its disk.
    idle = [site_context(pid) for pid in range(SITES)]
    for ours, theirs in zip(_final(resumed, idle, again), expected_final, strict=True):
        assert same_metrics(ours.content["metrics"], theirs.content["metrics"])


@pytest.mark.parametrize(
    ("overrides", "phrase"),
    [
        (["personalize=finetune", "model=xgboost"], "no personal tree model"),
        (["personalize=ditto", "model=xgboost"], "model=xgboost has none"),
        (
            ["personalize=ditto", "personalize.lambda=-1"],
            "personalize.lambda must be a number >= 0",
        ),
        (["personalize=ditto", "personalize.epochs=0"], "personalize.epochs must be a whole"),
        (["personalize=finetune", "personalize.epochs=0.5"], "personalize.epochs must be a whole"),
        (["personalize=finetune", "+personalize.lambda=1"], "not a parameter of finetune"),
        (["personalize=ditto", "model=autoencoder", "task=binary"], "federation's threshold"),
        (["personalize=fedper", "model=xgboost"], "no layers to split"),
        (["personalize=fedrep", "model=logistic"], "there is no body to federate"),
        (["personalize=fedper", "model=mlp", "strategy=scaffold"], "control variates"),
        (["personalize=fedrep", "model=cnn", "privacy=central"], "privacy=central"),
        (["personalize=fedrep", "model=mlp", "personalize.head_epochs=0"], "head_epochs must"),
        (["personalize=fedper", "model=mlp", "+personalize.epochs=1"], "not a parameter"),
    ],
)
def test_bad_personalization_is_refused_naming_the_key(overrides, phrase):
    with pytest.raises(FedadError, match=phrase):
        validate(compose(overrides))


def test_default_and_good_settings_pass():
    for overrides in (
        [],
        ["personalize=finetune"],
        ["personalize=ditto", "model=mlp"],
        ["personalize=fedper", "model=cnn"],
        ["personalize=fedrep", "model=mlp", "strategy=fedadam"],
    ):
        validate(compose(overrides))


def test_bad_personalization_exits_2_before_ray_starts(tmp_path):
    # One bad input through the command line (the refusals themselves are checked above).
    overrides, key = ["personalize=fedper", "model=xgboost"], "personalize=fedper"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "fedad.simulate",
            *overrides,
            f"hydra.run.dir={tmp_path / 'run'}",
        ],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 2, done.stderr[-2000:]
    assert "fedad: error:" in done.stderr and key in done.stderr
    # One paragraph: no blank line inside the message.
    assert "\n\n" not in done.stderr.split("fedad: error:", 1)[1].strip()
    assert "Traceback" not in done.stderr
    assert "Ray" not in done.stdout + done.stderr
