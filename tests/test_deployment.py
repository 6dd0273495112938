"""Flower's Deployment Engine: a tiny run through a real SuperLink and SuperNodes on localhost."""

from __future__ import annotations

import tomllib
from pathlib import Path

import keras
import numpy as np
import pandas as pd
import pytest
from flwr.common.config import flatten_dict, fuse_dicts, parse_config_args

from fedad import deployment
from fedad.config import CONF_DIR, FLOWER_KEYS, available_options, compose, make_settings
from fedad.data.prepared import PreparedData
from fedad.data.scaling import standardize
from fedad.deployment.__main__ import main as deployment_main
from fedad.errors import FedadError
from fedad.federated import shards
from fedad.federated.shards import read_access_log
from fedad.federated.task import evaluation_metrics, run_settings

# 2 sites, 2 rounds on 1,600 training rows: what a deployment does, as cheaply as it gets.
OVERRIDES = [
    "dataset.n_rows=2000",
    "simulation.num_clients=2",
    "simulation.num_rounds=2",
    "baselines=none",
    "explain=false",
    "seed=5",
]
# Metrics of the global test set, the clients' training and their evaluation, per round.
METRICS = ["loss", "accuracy", "macro_f1", "roc_auc", "pr_auc", "fpr", "train_loss"]
linux_only = pytest.mark.skipif(
    not Path("/proc/self/environ").exists(), reason="finds the Flower processes through /proc"
)


@pytest.fixture(scope="module")
def deployed(tmp_path_factory) -> deployment.PreparedRun:
    """The run through `python -m fedad.deployment --local` (about 2 minutes on 2 cores)."""
    run_dir = tmp_path_factory.mktemp("deployment") / "run"
    return deployment_main(["--local", "--run-dir", str(run_dir), "--timeout", "240", *OVERRIDES])


@pytest.fixture(scope="module")
def simulated(tmp_path_factory) -> Path:
    """The same run on the Simulation Engine, through fedad.simulate's own steps."""
    from fedad.simulate import run

    run_dir = tmp_path_factory.mktemp("simulation")
    run(compose(OVERRIDES), run_dir)
    return run_dir


@pytest.mark.slow
@linux_only
def test_both_rounds_run_on_both_sites_with_finite_metrics(deployed):
    run = deployed
    history = pd.read_csv(run.run_dir / "history.csv")
    assert list(history["round"]) == [0, 1, 2]
    assert np.isfinite(history.loc[1:, METRICS].to_numpy()).all()
    assert list(history["failures"]) == [0, 0, 0]
    assert list(history["eval_failures"]) == [0, 0, 0]
    assert history["loss"].iloc[-1] < history["loss"].iloc[0]
    clients = pd.read_csv(run.run_dir / "clients.csv")
    assert sorted(clients["client"]) == [0, 1]
    assert "error" not in clients.columns
    assert (clients["n_test"] > 0).all()


@pytest.mark.slow
@linux_only
def test_the_saved_global_model_scores_what_the_last_round_reported(deployed):
    run = deployed
    model = keras.models.load_model(run.run_dir / "global_model.keras")
    # Read around read_shard, which would add a line to the access log checked below.
    X, y = (np.load(shards.test_path(run.run_dir) / f"{name}.npy") for name in ("X", "y"))
    with np.load(run.run_dir / "scaling.npz") as stats:
        scores = model.predict(standardize(X, stats["mean"], stats["std"]), verbose=0)
    history = pd.read_csv(run.run_dir / "history.csv")
    metrics = evaluation_metrics(y, scores, ["normal", "attack"])
    assert metrics["macro_f1"] == pytest.approx(history["macro_f1"].iloc[-1], abs=1e-6)


@pytest.mark.slow
@linux_only
def test_each_site_reads_only_its_own_shard_and_the_server_only_the_test_set(deployed):
    run = deployed
    # No Ray on Flower's Deployment Engine: the reads name no Ray node.
    reads = set(read_access_log(run.run_dir))
    assert reads == {
        ("client_0000", "client_0000", ""),
        ("client_0001", "client_0001", ""),
        ("server", "test", ""),
    }


@pytest.mark.slow
@linux_only
def test_no_flower_process_is_left_running(deployed):
    run = deployed
    assert deployment.flower_processes(run.flwr_home) == []
    # The processes did run with that marker: the ServerApp wrote the outputs.
    assert (run.run_dir / "deployment" / "superlink.log").stat().st_size > 0


@pytest.mark.slow
@linux_only
def test_one_seed_gives_the_simulation_result(deployed, simulated):
    run = deployed
    columns = [*METRICS, "train_accuracy", "client_loss", "client_macro_f1"]
    ours = pd.read_csv(run.run_dir / "history.csv")[columns]
    theirs = pd.read_csv(simulated / "history.csv")[columns]
    # Same shards, settings, seeds and aggregation order: the engines differ only in
    # how messages travel, so the numbers agree as closely as two simulations do.
    np.testing.assert_allclose(ours.to_numpy(), theirs.to_numpy(), atol=1e-6, equal_nan=True)
    keys = ["client", "n_examples", "n_test", "macro_f1", "loss"]
    ours_c = pd.read_csv(run.run_dir / "clients.csv")[keys].sort_values("client")
    theirs_c = pd.read_csv(simulated / "clients.csv")[keys].sort_values("client")
    np.testing.assert_allclose(ours_c.to_numpy(), theirs_c.to_numpy(), atol=1e-6)
    ours_w = keras.models.load_model(run.run_dir / "global_model.keras").get_weights()
    theirs_w = keras.models.load_model(simulated / "global_model.keras").get_weights()
    for a, b in zip(ours_w, theirs_w, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6)


def _settings(make_cfg, tmp_path, *overrides: str) -> dict:
    data = PreparedData(
        X_train=np.zeros((4, 3), np.float32),
        y_train=np.array([0, 1, 0, 1]),
        X_test=np.zeros((2, 3), np.float32),
        y_test=np.array([0, 1]),
        feature_names=["a", "b", "c"],
        class_names=["normal", "attack"],
        task="binary",
    )
    settings = make_settings(make_cfg(*overrides), data, 2, tmp_path)
    return {**settings, "resume": False, "fingerprint": "{}"}


@pytest.mark.parametrize("model", available_options("model"))
@pytest.mark.parametrize("strategy", available_options("strategy"))
def test_flower_keys_cover_every_setting_of_every_model_and_strategy(
    make_cfg, tmp_path, model, strategy
):
    settings = _settings(make_cfg, tmp_path, f"model={model}", f"strategy={strategy}")
    assert set(settings) <= set(FLOWER_KEYS), sorted(set(settings) - set(FLOWER_KEYS))


def test_pyproject_declares_exactly_the_flower_keys():
    """`flwr run .` from a checkout sees the same keys as the app fedad.deployment writes."""
    pyproject = tomllib.loads((CONF_DIR.parent / "pyproject.toml").read_text())
    declared = set(flatten_dict(pyproject["tool"]["flwr"]["app"]["config"]))
    assert not declared - set(FLOWER_KEYS), (
        f"declared in pyproject.toml, missing from fedad.config.FLOWER_KEYS: "
        f"{sorted(declared - set(FLOWER_KEYS))}"
    )
    assert not set(FLOWER_KEYS) - declared, (
        f"in fedad.config.FLOWER_KEYS, not declared in pyproject.toml [tool.flwr.app.config]: "
        f"{sorted(set(FLOWER_KEYS) - declared)}"
    )


def test_the_written_app_declares_the_flower_keys(tmp_path):
    app = tomllib.loads((deployment.write_app(tmp_path) / "pyproject.toml").read_text())
    assert set(flatten_dict(app["tool"]["flwr"]["app"]["config"])) == set(FLOWER_KEYS)


def test_the_run_config_reaches_the_apps_as_the_simulation_passes_it(make_cfg, tmp_path):
    settings = _settings(make_cfg, tmp_path, "strategy=fedprox", "train.class_weights=true")
    path = deployment.write_run_config(settings, tmp_path / "run_config.toml")
    # What `flwr run --run-config` sends and what the SuperLink and SuperNodes make
    # of it: the overrides fused into the declared defaults.
    overrides = parse_config_args([str(path)])
    declared = flatten_dict(
        dict.fromkeys(FLOWER_KEYS, "")  # the app's declared defaults: all ""
    )
    run_config = fuse_dicts(declared, overrides)
    assert run_settings({}, run_config) == settings
    assert all(type(run_config[k]) is type(v) for k, v in settings.items())
    assert run_config["strategy.proximal_mu"] == pytest.approx(0.1)
    assert "strategy.eta" not in run_settings({}, run_config)


@pytest.mark.parametrize(
    "overrides, words",
    [
        (
            ["secure_aggregation=secaggplus", "secure_aggregation.max_weight=100000"],
            "secure_aggregation=secaggplus runs only under the Simulation Engine",
        ),
        (
            ["model=xgboost", "strategy=fedxgb_histogram"],
            "strategy=fedxgb_histogram runs only under the Simulation Engine",
        ),
    ],
)
def test_what_only_the_simulation_runs_is_refused_before_the_folder_is_made(
    make_cfg, tmp_path, overrides, words
):
    run_dir = tmp_path / "run"
    with pytest.raises(FedadError, match=words):
        deployment.prepare_run(make_cfg(*overrides), run_dir)
    assert not run_dir.exists()
