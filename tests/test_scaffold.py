"""SCAFFOLD: control variates at the sites and the server, in a real Flower run, and bad inputs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from flwr.app import ArrayRecord, RecordDict
from generated import binary_data

from fedad import rundir
from fedad.config import compose, make_settings
from fedad.data.prepared import PreparedData
from fedad.errors import FedadError
from fedad.federated import checkpoint
from fedad.federated.families.classifier import KerasFamily
from fedad.federated.grid import PAYLOAD
from fedad.federated.scaffold import CONTROL, Scaffold, SiteControl, aggregate
from fedad.federated.shards import write_shards
from fedad.federated.simulation import run_federated
from fedad.federated.strategies import build_strategy
from fedad.federated.task import load_site
from fedad.run.validate import validate

REPO = Path(__file__).resolve().parents[1]
# One site: c and c_1 both start at zero and the server adds the site's whole change Δc_1,
# so c = c_1 after every round, up to the float32 rounding of the server's c + Δc_1. The
# correction c - c_1 is then a few ulps of c, and SCAFFOLD's global model is the site's
# plain local training (FedAvg with that one site: each round from the last round's model,
# the site's optimizer kept) to this tolerance, absolute, on every weight after 3 rounds.
ONE_SITE_TOLERANCE = 1e-5
# Differ between runs of the same settings (a resumed run asks every site for its sums again).
TIMING = ["seconds", "started_at", *PAYLOAD, "mb_cumulative"]


@pytest.fixture(scope="module")
def data() -> PreparedData:
    return binary_data(1200, 300, 10, n_informative=5, weights=[0.3], random_state=2)


@pytest.fixture(scope="module")
def partitions(data) -> list[np.ndarray]:
    """Three sites that see the classes in different shares (sorted by label, then cut)."""
    order = np.argsort(data.y_train + np.random.default_rng(0).uniform(0, 1.5, len(data.y_train)))
    return [np.sort(p) for p in np.array_split(order, 3)]


def _family(data, parts, run_dir: Path, *overrides: str) -> KerasFamily:
    write_shards(data, parts, run_dir)
    cfg = compose(["model=mlp", f"simulation.num_clients={len(parts)}", *overrides])
    settings = {**make_settings(cfg, data, len(parts), run_dir), "resume": False}
    family = KerasFamily(settings)
    family.init_runtime()
    family.seed_initial(0)
    return family


def _scaffold_round(family, site, model, control, seed: int):
    """One site's SCAFFOLD training: its model y_i, the reply's Δc_i and its new c_i."""
    content = RecordDict({"arrays": ArrayRecord(model), CONTROL: ArrayRecord(control)})
    site_control = SiteControl(content, site.state)
    family.correction = site_control.correction()
    trained, metrics = family.fit(model, site, {}, seed=seed)
    lr = float(family.settings["train.learning_rate"])
    change = site_control.reply(model, trained, metrics, lr)[CONTROL].to_numpy_ndarrays()
    return trained, metrics, change


def test_one_site_scaffold_is_plain_local_training(data, tmp_path):
    family = _family(data, [np.arange(600)], tmp_path, "train.optimizer=sgd")
    start = family.initial_arrays()
    plain_state, scaffold_state = RecordDict(), RecordDict()
    plain, model = start, start
    control = [np.zeros_like(a) for a in start]
    for server_round in (1, 2, 3):
        site = load_site(family.settings, 0, {}, family.val_fraction(), state=plain_state)
        family.correction = None
        plain, _ = family.fit(plain, site, {}, seed=server_round)

        site = load_site(family.settings, 0, {}, family.val_fraction(), state=scaffold_state)
        trained, metrics, change = _scaffold_round(family, site, model, control, server_round)
        model, control = aggregate(
            model, control, [trained], [change], np.array([metrics["num-examples"]]), 1, 1.0
        )
        own = scaffold_state[CONTROL].to_numpy_ndarrays()
        assert any(np.abs(c).max() > 1e-3 for c in control)
        for c, c_1 in zip(control, own, strict=True):
            np.testing.assert_allclose(c, c_1, rtol=0, atol=1e-6 * max(1.0, np.abs(c).max()))
    for a, b in zip(model, plain, strict=True):
        np.testing.assert_allclose(a, b, rtol=0, atol=ONE_SITE_TOLERANCE)


def test_the_server_control_is_the_mean_of_the_sites_and_corrects_their_drift(
    data, partitions, tmp_path
):
    family = _family(data, partitions, tmp_path, "model=logistic", "train.optimizer=sgd")
    model = family.initial_arrays()
    control = [np.zeros_like(a) for a in model]
    states = [RecordDict() for _ in partitions]
    for server_round in (1, 2):
        replies, changes, weights, corrections = [], [], [], []
        for pid, state in enumerate(states):
            site = load_site(family.settings, pid, {}, family.val_fraction(), state=state)
            trained, metrics, change = _scaffold_round(family, site, model, control, server_round)
            corrections.append(family.correction)
            replies.append(trained)
            changes.append(change)
            weights.append(metrics["num-examples"])
        model, control = aggregate(model, control, replies, changes, np.array(weights), 3, 1.0)
        # c stays the mean of every site's c_i (all sites sampled).
        own = [s[CONTROL].to_numpy_ndarrays() for s in states]
        for i, c in enumerate(control):
            np.testing.assert_allclose(c, np.mean([o[i] for o in own], axis=0), atol=1e-6)
    # Round 2 corrected each site's gradient by c - c_i, not zero at sites that drift apart.
    assert all(any(np.abs(a).max() > 1e-3 for a in c) for c in corrections)


def test_the_server_control_is_strategy_state_a_checkpoint_keeps():
    strategy = build_strategy({"name": "scaffold", "server_learning_rate": 1.0}, 1.0, 1.0, 2)
    assert isinstance(strategy, Scaffold) and strategy.control is None
    assert checkpoint.strategy_state(strategy) == {}
    strategy.control = [np.full((2, 3), 0.5, np.float32), np.arange(3, dtype=np.float32)]
    fresh = build_strategy({"name": "scaffold"}, 1.0, 1.0, 2)
    checkpoint.restore_strategy_state(fresh, checkpoint.strategy_state(strategy))
    assert isinstance(fresh, Scaffold) and fresh.control is not None
    for a, b in zip(fresh.control, strategy.control, strict=True):
        np.testing.assert_array_equal(a, b)


def _run(data, partitions, run_dir: Path, *overrides: str, resume: bool = False):
    cfg = compose(
        [
            "strategy=scaffold",
            "train.optimizer=sgd",
            "model=logistic",
            "simulation.num_clients=3",
            "simulation.local_sites=0",
            "simulation.stop.patience=0",
            *overrides,
        ]
    )
    return run_federated(cfg, data, partitions, run_dir, resume)[0]


@pytest.mark.long
def test_a_scaffold_run_checkpoints_its_control_and_resumes_exactly(data, partitions, tmp_path):
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    _run(data, partitions, whole, "simulation.num_rounds=3")
    _run(data, partitions, cut, "simulation.num_rounds=2")
    saved = checkpoint.load(cut)
    assert saved is not None and saved.round == 2
    control = saved.strategy_state["control"]
    assert [c.shape for c in control] == [a.shape for a in saved.arrays]
    assert any(np.abs(c).max() > 0 for c in control)
    _run(data, partitions, cut, "simulation.num_rounds=3", resume=True)
    history = pd.read_csv(whole / rundir.HISTORY_FILE)
    pd.testing.assert_frame_equal(
        history.drop(columns=TIMING), pd.read_csv(cut / rundir.HISTORY_FILE).drop(columns=TIMING)
    )
    ends = checkpoint.load(whole), checkpoint.load(cut)
    assert ends[0] is not None and ends[1] is not None
    for a, b in zip(ends[0].arrays, ends[1].arrays, strict=True):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(
        ends[0].strategy_state["control"], ends[1].strategy_state["control"], strict=True
    ):
        np.testing.assert_array_equal(a, b)
    # The control variates travel beside the model both ways: twice its bytes, and more.
    model_bytes = sum(a.nbytes for a in ends[0].arrays)
    assert (history.loc[1:, "bytes_down_arrays"] >= 2 * 3 * model_bytes).all()
    assert (history.loc[1:, "bytes_up_arrays"] >= 2 * 3 * model_bytes).all()


@pytest.mark.parametrize(
    ("overrides", "words"),
    [
        (["model=xgboost"], "strategy=scaffold does not fit model=xgboost"),
        (["privacy=local"], "privacy=local"),
        (["train.optimizer=adam"], "strategy=scaffold needs train.optimizer=sgd, got adam"),
    ],
)
def test_scaffold_refuses_what_it_cannot_run_beside(overrides, words):
    with pytest.raises(FedadError, match=words):
        validate(compose(["strategy=scaffold", "train.optimizer=sgd", *overrides]))


def test_scaffold_with_sgd_is_accepted():
    validate(compose(["strategy=scaffold", "train.optimizer=sgd"]))


def test_scaffold_with_privacy_exits_2_before_ray_starts(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "fedad.simulate",
            "strategy=scaffold",
            "train.optimizer=sgd",
            "privacy=central",
            f"hydra.run.dir={tmp_path / 'run'}",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 2, done.stderr[-2000:]
    assert "strategy=scaffold" in done.stderr and "Traceback" not in done.stderr
    assert "ray" not in done.stderr.lower().replace("array", "")
