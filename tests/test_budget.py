"""A privacy budget, not a noise level: ``privacy.target_epsilon`` calibrated, spent, enforced.

The calibration is checked with Flower's RDP accountant, the one a run reports with; the
budget is enforced by fedad's DP strategy on real Flower messages; a small simulation spends
at most its target, and a resumed one planning more rounds stops before overspending it.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from generated import binary_data
from messages import server_message

from fedad.config import compose
from fedad.data.prepared import PreparedData
from fedad.errors import FedadError
from fedad.federated import budget, privacy, stopping
from fedad.federated.simulation import run_federated
from fedad.federated.stopping import StopTraining
from fedad.federated.strategies import build_strategy
from fedad.run.commandline import check

pytest.importorskip("dp_accounting", reason="privacy accounting needs fedad[dp]")

REPO = Path(__file__).resolve().parents[1]
DELTA = 1e-5


def _spent(noise: float, rounds: int, delta: float = DELTA) -> float:
    """Epsilon of ``rounds`` releases, from Flower's accountant as a run reports it."""
    dp = {"name": "client", "noise_multiplier": noise, "delta": delta}
    return budget.epsilon(dp, rounds, 3, 3)


@pytest.mark.parametrize(
    ("target", "rounds", "delta"),
    [(1.0, 10, 1e-5), (4.0, 10, 1e-5), (8.0, 50, 1e-5), (0.5, 3, 1e-6), (8.0, 100, 1e-5)],
)
def test_the_calibrated_noise_spends_the_target_and_no_less_noise_would_do(target, rounds, delta):
    noise = budget.calibrate(target, delta, rounds)
    assert noise is not None
    spent = _spent(noise, rounds, delta)
    assert target * 0.99 <= spent <= target
    # The least such noise: 1 % less overspends.
    assert _spent(noise * 0.99, rounds, delta) > target
    # One release at a time, as a round composes it: within the target, and full after.
    ledger = budget.accountant({"delta": delta}, 3)
    for _ in range(rounds):
        assert not ledger.would_exceed(budget.gaussian(noise, 3, 3), target)
        ledger.compose(budget.gaussian(noise, 3, 3))
    assert ledger.get_privacy_spent().epsilon <= target
    assert ledger.would_exceed(budget.gaussian(noise, 3, 3), target)


def test_the_target_fills_the_knob_of_every_option_and_the_defaults_stay():
    central = {"name": "central", "clipping_norm": 1.0, "delta": DELTA, budget.TARGET: 4.0}
    resolved = budget.resolve(central, 10)
    assert resolved["noise_multiplier"] == budget.calibrate(4.0, DELTA, 10)
    assert budget.planned(resolved, 10) == pytest.approx(4.0, rel=0.01)
    # Local DP: the per-round epsilon LocalDpMod turns back into the calibrated noise.
    local = budget.resolve({**central, "name": "local"}, 10)
    assert "noise_multiplier" not in local
    assert budget.noise_multiplier(local) == pytest.approx(resolved["noise_multiplier"], rel=1e-12)
    assert local["epsilon"] == pytest.approx(
        math.sqrt(2 * math.log(1.25 / DELTA)) / resolved["noise_multiplier"]
    )
    assert budget.planned(local, 10) <= 4.0
    # Without a target the options keep the noise they had; a set knob is left alone.
    untargeted = {k: v for k, v in central.items() if k != budget.TARGET}
    assert budget.resolve(untargeted, 10)["noise_multiplier"] == 1.0
    assert budget.resolve({**untargeted, "name": "client_adaptive"}, 10)["noise_multiplier"] == 0.5
    assert budget.resolve({**untargeted, "name": "local"}, 10)["epsilon"] == 1.0
    assert budget.resolve({**untargeted, "noise_multiplier": 2.5}, 10)["noise_multiplier"] == 2.5
    # The apps see it through the flat settings, planned over simulation.num_rounds.
    flat = {f"privacy.{k}": v for k, v in central.items()} | {"simulation.num_rounds": 10}
    assert privacy.settings_of(flat) == resolved


def _release(strategy: privacy.Private, server_round: int) -> None:
    """One round's aggregation of three sites' updates (released: the budget is spent)."""
    replies = []
    for node in range(1, 4):
        update = ArrayRecord([np.full(40, 0.01 * node, np.float32)])
        # As the sites' mods send them: a weight alike, the clipped bit (adaptive clipping).
        metrics = MetricRecord({"num-examples": 10, privacy.WEIGHT_KEY: 1.0, "norm_bit": 1})
        content = RecordDict({"arrays": update, "metrics": metrics})
        sent = server_message([np.zeros(40, np.float32)], MessageType.TRAIN, {}, node - 1)
        replies.append(Message(content, reply_to=sent))
    arrays, _ = strategy.aggregate_train(server_round, replies)
    assert arrays is not None


def _private(name: str, target: float, rounds: int) -> privacy.Private:
    """fedad's DP strategy over FedAvg for three sites, its noise planned for ``rounds``.

    Flower's fixed-clipping wrappers account for a round only once it was configured
    (sampled on a grid): the simulations cover them; here fedad's strategy composes.
    """
    settings: dict[str, float | str] = {
        "privacy.name": name,
        "privacy.delta": DELTA,
        f"privacy.{budget.TARGET}": target,
        "simulation.num_rounds": rounds,
    }
    if name in privacy.ADAPTIVE:
        # Clipped-count noise large enough for the calibrated multiplier (check_config).
        adaptive = dict(zip(privacy.ADAPTIVE_KEYS, (0.1, 0.5, 0.2), strict=True))
        settings |= {f"privacy.{k}": v for k, v in adaptive.items()}
        settings["privacy.clipped_count_stddev"] = 10.0
    else:
        settings["privacy.clipping_norm"] = 1.0
    dp = privacy.settings_of(settings)
    weight = privacy.WEIGHT_KEY if name in privacy.CENTRAL else None
    fedavg = build_strategy({"name": "fedavg"}, 1.0, 1.0, 3, weight_key=weight)
    return privacy.Private(fedavg, dp, 3, 3)


@pytest.mark.parametrize("name", ["client_adaptive", "local"])
def test_training_stops_before_a_round_that_would_overspend_the_target(name):
    strategy = _private(name, 2.0, 3)
    for server_round in (1, 2, 3):
        strategy.check_budget(server_round)  # within the plan: no stop
        _release(strategy, server_round)
    spent = strategy.history_fields()["epsilon"]
    assert 0.99 * 2.0 <= spent <= 2.0
    with pytest.raises(StopTraining, match=r"round 4 would spend more than privacy.target_epsilon"):
        # Raised before the wrapped strategy (and the grid) is asked for anything.
        strategy.configure_train(4, ArrayRecord(), ConfigRecord(), grid=None)


def test_a_resumed_run_planning_more_rounds_replays_the_noise_it_had_and_stays_within():
    first = _private("local", 2.0, 2)
    _release(first, 1)
    row = first.history_fields()  # interrupted after round 1 of 2
    # Continued with 6 rounds planned: more noise from now on, the past replayed as it was.
    resumed = _private("local", 2.0, 6)
    assert resumed.event.noise_multiplier > first.event.noise_multiplier
    resumed.restore(row)
    assert resumed.history_fields()["epsilon"] == pytest.approx(row["epsilon"], rel=1e-9)
    assert resumed.history_fields()["epsilon"] > _spent(resumed.event.noise_multiplier, 1)
    trained = 1
    with pytest.raises(StopTraining):
        while True:
            resumed.check_budget(trained + 1)
            _release(resumed, trained + 1)
            trained += 1
    # Round 1 spent about half the budget: fewer than the 5 rounds left fit in the rest.
    assert 2 <= trained < 6
    assert resumed.history_fields()["epsilon"] <= 2.0
    # Resumed again from there: nothing more fits.
    again = _private("local", 2.0, 6)
    again.restore(resumed.history_fields())
    assert again.history_fields()["epsilon"] == pytest.approx(
        resumed.history_fields()["epsilon"], rel=1e-9
    )
    with pytest.raises(StopTraining):
        again.check_budget(trained + 1)


def test_results_record_the_target_the_plan_and_the_chosen_noise():
    settings = {
        "privacy.name": "central",
        "privacy.clipping_norm": 1.0,
        "privacy.delta": DELTA,
        f"privacy.{budget.TARGET}": 4.0,
        "simulation.num_rounds": 10,
    }
    noise = budget.calibrate(4.0, DELTA, 10)
    assert noise is not None
    history = [{"round": 6, "epsilon": _spent(noise, 6), "dp_releases": 6}]
    info = privacy.describe(settings, history)
    assert info[budget.TARGET] == 4.0 and info["noise_multiplier"] == noise
    assert info["planned_epsilon"] == pytest.approx(_spent(noise, 10), rel=1e-12)
    assert info["epsilon"] == history[0]["epsilon"] and info["releases"] == 6
    spent = f"{history[0]['epsilon']:.3g}"
    assert privacy.label(info) == f"ε = {spent} of 4 planned (target 4), δ = 1e-05"
    # Without a target: the multiplier set, and the plan shown only where not all was spent.
    plain = {k: v for k, v in settings.items() if budget.TARGET not in k}
    info = privacy.describe(plain, [{"round": 10, "epsilon": _spent(1.0, 10), "dp_releases": 10}])
    assert info[budget.TARGET] is None and info["noise_multiplier"] == 1.0
    assert privacy.label(info) == f"ε = {_spent(1.0, 10):.3g}, δ = 1e-05"


def test_the_stopping_reason_names_the_budget():
    settings = {"simulation.num_rounds": 5, f"privacy.{budget.TARGET}": 2.0}
    history = [{"round": r} for r in range(4)]
    assert stopping.summary(settings, history)["reason"] == stopping.BUDGET
    assert stopping.summary(settings, [*history, {"round": 4}, {"round": 5}])["reason"] == "off"
    # Early stopping is asked first: a round both would end is the rule's.
    rule = {"simulation.stop.patience": 2, "simulation.stop.metric": "loss"}
    waited = [{**row, stopping.BEST_ROUND: 1} for row in history]
    assert stopping.summary({**settings, **rule}, waited)["reason"] == stopping.PATIENCE
    improving = [{**row, stopping.BEST_ROUND: 3} for row in history]
    assert stopping.summary({**settings, **rule}, improving)["reason"] == stopping.BUDGET


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        (
            ["privacy=central", "privacy.target_epsilon=0"],
            "privacy.target_epsilon must be a number > 0, got 0",
        ),
        (
            ["privacy=local", "privacy.target_epsilon=-1"],
            "privacy.target_epsilon must be a number > 0, got -1",
        ),
        (
            ["privacy=client", "privacy.target_epsilon=4", "privacy.noise_multiplier=1.1"],
            "privacy.target_epsilon=4 and privacy.noise_multiplier=1.1 are both set",
        ),
        (
            ["privacy=local", "privacy.target_epsilon=4", "privacy.epsilon=1"],
            "privacy.target_epsilon=4 and privacy.epsilon=1 are both set",
        ),
        (
            ["privacy=central", "privacy.target_epsilon=0.001", "simulation.num_rounds=1000"],
            "privacy.target_epsilon=0.001 cannot be met over simulation.num_rounds=1000",
        ),
        (
            ["privacy=client_adaptive", "privacy.target_epsilon=1", "simulation.num_rounds=20"],
            "needs noise_multiplier 18.09, but adaptive clipping needs it below twice",
        ),
    ],
)
def test_a_bad_target_is_refused_in_one_paragraph_naming_it(overrides, named):
    with pytest.raises(FedadError) as refused:
        check(overrides)
    message = str(refused.value)
    assert named in message and "\n" not in message


@pytest.mark.parametrize(
    ("bad", "named"),
    [
        (
            ["privacy=central", "privacy.target_epsilon=0"],
            "privacy.target_epsilon must be a number > 0",
        ),
        (
            ["privacy=client", "privacy.target_epsilon=4", "privacy.noise_multiplier=1.1"],
            "privacy.target_epsilon=4 and privacy.noise_multiplier=1.1 are both set",
        ),
    ],
)
def test_a_bad_target_exits_2_before_the_run_folder_exists(tmp_path, bad, named):
    run_dir = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    overrides = [f"hydra.run.dir={run_dir}", *bad]
    done = subprocess.run(
        [sys.executable, "-m", "fedad.simulate", *overrides],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith("fedad: error:") and "Traceback" not in done.stderr
    assert named in " ".join(done.stderr.split())
    assert done.stderr.count("\n\n") == 0  # one paragraph
    assert not run_dir.exists()  # refused before Hydra made the run folder, let alone Ray


@pytest.fixture(scope="module")
def data() -> PreparedData:
    return binary_data(700, 200, 8, n_informative=5, weights=[0.3], class_sep=1.5, random_state=2)


@pytest.mark.slow
def test_a_run_spends_at_most_its_target_and_a_resume_planning_more_stops(data, tmp_path):
    parts = [np.sort(p) for p in np.array_split(np.random.default_rng(5).permutation(700), 3)]
    overrides = [
        "model=logistic",
        "simulation.num_clients=3",
        "simulation.local_sites=0",
        "seed=6",
        "privacy=client",
        "privacy.target_epsilon=3",
        "simulation.stop.patience=0",  # the budget alone can end it
    ]
    cfg = compose([*overrides, "simulation.num_rounds=2"])
    first = run_federated(cfg, data, parts, tmp_path)[0]
    noise = budget.calibrate(3.0, DELTA, 2)
    assert noise is not None
    assert list(first.history["dp_releases"]) == [0, 1, 2]
    assert first.history["epsilon"].tolist() == pytest.approx([_spent(noise, r) for r in range(3)])
    assert 0.99 * 3 <= first.metrics["epsilon"] <= 3
    dp = first.info["privacy"]
    assert dp[budget.TARGET] == 3 and dp["noise_multiplier"] == noise
    assert dp["planned_epsilon"] == pytest.approx(first.metrics["epsilon"])
    assert first.info["stopping"]["reason"] == "off"
    assert first.info["note"] == f"ε = {first.metrics['epsilon']:.3g} (target 3), δ = 1e-05"
    # Continued to 4 rounds: the new plan's noise is larger, but the 2 rounds run spent the
    # budget at the old noise, which the ledger replays; no round fits, training stops.
    cfg = compose([*overrides, "simulation.num_rounds=4"])
    resumed = run_federated(cfg, data, parts, tmp_path, resume=True)[0]
    assert list(resumed.history["round"]) == [0, 1, 2]
    assert resumed.metrics["epsilon"] == pytest.approx(first.metrics["epsilon"], rel=1e-9)
    assert resumed.info["stopping"]["reason"] == stopping.BUDGET
    # results.json: the new plan (4 rounds at its noise, within the target too), the spent ε.
    dp = resumed.info["privacy"]
    assert dp["noise_multiplier"] == budget.calibrate(3.0, DELTA, 4)
    assert dp["noise_multiplier"] > noise and 0.99 * 3 <= dp["planned_epsilon"] <= 3
    assert dp["epsilon"] == resumed.metrics["epsilon"] and dp["releases"] == 2
