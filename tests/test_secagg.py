"""SecAgg+ (secure_aggregation=secaggplus) on real Flower simulations: the sum, masks, dropouts."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from flwr.app import Context, Message, MessageType, RecordDict
from flwr.common import FitIns, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.compat.common import recorddict_compat as compat
from generated import binary_data

from fedad import rundir
from fedad.config import compose, make_settings
from fedad.data.prepared import PreparedData
from fedad.errors import FedadError
from fedad.federated import checkpoint, secagg
from fedad.federated.families.registry import family_for
from fedad.federated.secagg import client
from fedad.federated.simulation import run_federated
from fedad.run.commandline import check

REPO = Path(__file__).resolve().parents[1]
SITES = 3
BASE = [
    "model=logistic",
    "secure_aggregation=secaggplus",
    "simulation.local_sites=0",
    "simulation.stop.patience=0",
    "simulation.checkpoint_every=1",
    "train.val_fraction=0",
    "train.learning_rate=0.05",  # updates that differ from site to site well beyond the bound
    "seed=3",
]


@pytest.fixture(scope="module")
def data() -> PreparedData:
    return binary_data(560, 140, 6, n_informative=4, weights=[0.4], class_sep=1.5, random_state=4)


def _parts(n: int, rows: int = 560) -> list[np.ndarray]:
    order = np.random.default_rng(1).permutation(rows)
    # Unequal sites, so the weighted mean differs from the plain one.
    cuts = np.cumsum(np.linspace(1, 2, n) / np.linspace(1, 2, n).sum() * rows).astype(int)[:-1]
    return [np.sort(p) for p in np.split(order, cuts)]


@pytest.fixture(scope="module")
def one_round(data, tmp_path_factory):
    """One SecAgg+ round of 3 sites; the run folder and its config."""
    run_dir = tmp_path_factory.mktemp("secagg")
    cfg = compose([*BASE, f"simulation.num_clients={SITES}", "simulation.num_rounds=1"])
    result = run_federated(cfg, data, _parts(SITES), run_dir)[0]
    return cfg, run_dir, result


def _plain_updates(
    cfg, data, run_dir: Path
) -> tuple[list[np.ndarray], list[list[np.ndarray]], list[int]]:
    """The initial model and each site's own round-1 update, trained here by the sites' handler."""
    settings = {**make_settings(cfg, data, SITES, run_dir), **secagg.run_settings(cfg)}
    settings["resume"] = False
    family = family_for(settings)
    family.seed_initial(int(settings["seed"]))
    initial = family.initial_arrays()
    with np.load(run_dir / rundir.SCALING_FILE) as stats:
        config = {"scale-mean": stats["mean"].tolist(), "scale-std": stats["std"].tolist()}
    updates, counts = [], []
    for pid in range(SITES):
        fitins = FitIns(ndarrays_to_parameters(initial), {**config, "server-round": 1})
        message = Message(
            compat.fitins_to_recorddict(fitins, keep_input=True),
            dst_node_id=pid + 1,
            message_type=MessageType.TRAIN,
        )
        context = Context(
            run_id=0,
            node_id=pid + 1,
            node_config={"partition-id": pid, "num-partitions": SITES},
            state=RecordDict(),
            run_config={},
        )
        reply = client.handle_train(message, context, settings)
        fitres = compat.recorddict_to_fitres(reply.content, keep_input=True)
        updates.append(parameters_to_ndarrays(fitres.parameters))
        counts.append(fitres.num_examples)
    return initial, updates, counts


@pytest.mark.long
def test_the_secure_sum_is_fedavg_within_the_bound_and_no_site_update_reaches_the_strategy(
    one_round, data
):
    cfg, run_dir, result = one_round
    _, updates, counts = _plain_updates(cfg, data, run_dir)
    secure = checkpoint.load(run_dir).arrays
    weights = np.asarray(counts, dtype=float)
    fedavg = [
        sum(w * u[i] for w, u in zip(weights, updates, strict=True)) / weights.sum()
        for i in range(len(secure))
    ]
    # The bound: site i sends round(Q n_i / W) / Q x its update, stochastically rounded to one of
    # Q levels over [-c, c] (an error below 2c / Q), so the sum of n sites is off by at most
    # n 2c / Q; the rounded weights move the weighted mean by at most max |update - mean| x
    # n / (2Q); both are divided by the sum of the rounded weights, about sum(n_i) / W.
    sa = cfg.secure_aggregation
    q, c, w = int(sa.quantization_range), float(sa.clipping_range), float(sa.max_weight)
    spread = max(
        float(np.max(np.abs(u[i] - fedavg[i]))) for u in updates for i in range(len(fedavg))
    )
    ratio = sum(round(q * n / w) / q for n in counts)
    bound = SITES * (2 * c + spread / 2) / (q * ratio) + 1e-6  # + float32's rounding of the result
    errors = [float(np.max(np.abs(s - f))) for s, f in zip(secure, fedavg, strict=True)]
    assert max(errors) <= bound, (errors, bound)
    assert bound < 1e-3  # the settings imply a tight bound: the test can fail
    # Each site's own update is farther from the sum than the bound: the sum is none of them.
    for update in updates:
        apart = max(float(np.max(np.abs(s - u))) for s, u in zip(secure, update, strict=True))
        assert apart > 10 * bound
    # What the server's aggregation step received: three results holding one and the same
    # arrays, the unmasked sum (in a plain run: three different updates).
    history = pd.read_csv(run_dir / rundir.HISTORY_FILE)
    row = history[history["round"] == 1].iloc[0]
    assert row["secagg_results"] == SITES and row["secagg_distinct_arrays"] == 1
    assert len({tuple(np.concatenate([a.ravel() for a in u]).round(6)) for u in updates}) == SITES


@pytest.mark.long
def test_each_stage_has_its_cost_in_the_history(one_round):
    _, run_dir, result = one_round
    row = pd.read_csv(run_dir / rundir.HISTORY_FILE).set_index("round").loc[1]
    for stage in secagg.STAGES:
        assert row[f"secagg_{stage}_bytes_down"] > 0 and row[f"secagg_{stage}_bytes_up"] > 0
        assert row[f"secagg_{stage}_seconds"] > 0 and row[f"secagg_{stage}_failures"] == 0
    # The masked vectors go up in ConfigRecords: no array record leaves a site in training.
    masked = row["secagg_collect_masked_vectors_bytes_up"]
    assert row["bytes_up_other"] >= masked > row["bytes_down_arrays"] / SITES
    # The usual outputs of a run: the final model scored at every site and on the test set.
    assert len(pd.read_csv(run_dir / rundir.CLIENTS_FILE)) == SITES
    assert result.info["stopping"]["best_round"] == 1 and "macro_f1" in result.metrics


def _four_sites(down: float, stage: str, rounds: int = 1) -> list[str]:
    return [
        *BASE,
        "simulation.num_clients=4",
        f"simulation.num_rounds={rounds}",
        f"simulation.client_failure_rate={down}",  # floor(4 x down) sites down each round
        "simulation.min_clients=2",
        "secure_aggregation.reconstruction_threshold=3",
        f"secure_aggregation.failure_stage={stage}",
    ]


@pytest.mark.long
@pytest.mark.parametrize("stage", ["collect_masked_vectors", "unmask"])
def test_a_site_dropping_out_leaves_the_round_whole_above_the_threshold(data, tmp_path, stage):
    run_federated(compose(_four_sites(0.25, stage)), data, _parts(4), tmp_path)
    row = pd.read_csv(tmp_path / rundir.HISTORY_FILE).set_index("round").loc[1]
    # Counted once, at the stage the site failed, not again in the stages after it.
    assert {s: row[f"secagg_{s}_failures"] for s in secagg.STAGES} == {
        s: int(s == stage) for s in secagg.STAGES
    }
    # A site lost after its masked vector went up is still in the sum (its mask is rebuilt).
    assert row["secagg_results"] == (4 if stage == "unmask" else 3)
    assert row["secagg_distinct_arrays"] == 1 and row["failures"] == 1


@pytest.mark.long
@pytest.mark.parametrize(
    ("down", "stage"),
    [
        (0.5, "collect_masked_vectors"),  # two of four left, below the threshold of 3
        (0.5, "unmask"),
        # flwr 1.42: a site lost before its key shares went out halts the round whatever the
        # threshold (the unmask stage asks every site for the lost one's shares, which none has).
        (0.25, "setup"),
        (0.25, "share_keys"),
    ],
)
def test_below_the_threshold_the_round_fails_cleanly_and_is_counted(data, tmp_path, down, stage):
    cfg = compose(_four_sites(down, stage, rounds=2))
    with pytest.raises(FedadError, match="halted at the SecAgg\\+ stage") as halted:
        run_federated(cfg, data, _parts(4), tmp_path)
    assert "\n" not in str(halted.value)
    # Round 1 changed nothing (Flower keeps the old model): the run stops with round 0 saved.
    assert checkpoint.load(tmp_path).round == 0


@pytest.mark.long
def test_a_resumed_secaggplus_run_goes_on_from_its_checkpoint(data, tmp_path):
    overrides = [*BASE, f"simulation.num_clients={SITES}"]
    run_federated(compose([*overrides, "simulation.num_rounds=1"]), data, _parts(SITES), tmp_path)
    cfg = compose([*overrides, "simulation.num_rounds=2"])
    resumed = run_federated(cfg, data, _parts(SITES), tmp_path, resume=True)[0]
    assert resumed.history["round"].tolist() == [0, 1, 2]
    row = resumed.history.set_index("round").loc[2]
    assert row["secagg_results"] == SITES and row["secagg_distinct_arrays"] == 1
    assert checkpoint.load(tmp_path).round == 2


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        (["secure_aggregation.reconstruction_threshold=11"], "above the 10 sites a round samples"),
        (["strategy=krum"], "strategy=krum needs every site's update on its own"),
        (["strategy=fedtrimmedavg"], "strategy=fedtrimmedavg needs every site's update"),
        (["strategy=fedadam"], "strategy=fedadam applies its own server step"),
        (["model=xgboost", "strategy=fedxgb_bagging"], "model=xgboost sends boosted trees"),
        (["privacy=central"], "distributed DP, with the noise added by the sites"),
        (["privacy=local"], "privacy=local noises the update with Flower's LocalDpMod"),
        (["secure_aggregation.num_shares=2"], "secure_aggregation.num_shares must be"),
        (["personalize=ditto"], "personalize=ditto trains each site's personal model"),
        (["secure_aggregation.failure_stage=later"], "secure_aggregation.failure_stage must be"),
    ],
)
def test_what_does_not_combine_is_refused_in_one_paragraph(overrides, named):
    with pytest.raises(FedadError) as refused:
        check(["secure_aggregation=secaggplus", *overrides])
    message = str(refused.value)
    assert named in message and "\n" not in message


def test_a_site_above_max_weight_is_refused_before_the_engine_starts():
    settings = {"secure_aggregation.name": "secaggplus", "secure_aggregation.max_weight": 1000}
    secagg.check_sites(settings, [900, 1000])
    with pytest.raises(FedadError, match="secure_aggregation.max_weight=1500 or more"):
        secagg.check_sites(settings, [900, 1500])
    secagg.check_sites({"secure_aggregation.name": "none"}, [10**6])


def test_secaggplus_with_krum_exits_2_before_the_run_folder_exists(tmp_path):
    run_dir = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    overrides = [f"hydra.run.dir={run_dir}", "secure_aggregation=secaggplus", "strategy=krum"]
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
    assert "strategy=krum needs every site's update" in " ".join(done.stderr.split())
    assert done.stderr.count("\n\n") == 0
    assert not run_dir.exists()
