"""Tests for the Flower simulation: real runs on small generated data, plus the pieces alone."""

from __future__ import annotations

import json
import math
from pathlib import Path

import keras
import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from generated import binary_data
from omegaconf import OmegaConf

from fedad.config import compose, make_settings
from fedad.data.prepared import PreparedData
from fedad.data.scaling import pooled_moments, site_sums, standardize
from fedad.errors import FedadError
from fedad.federated import local_only, server_app
from fedad.federated.families.classifier import local_model, train_local
from fedad.federated.faults import injected_failure
from fedad.federated.local_only import train_alone
from fedad.federated.server_app import final_evaluation_sites, sample_sites
from fedad.federated.shards import read_access_log, write_shards
from fedad.federated.simulation import run_federated, start_engine, validate
from fedad.federated.strategies import STRATEGIES, build_strategy, weighted_mean
from fedad.federated.task import load_site, local_split
from fedad.run.validate import validate as validate_all

CONF = Path(__file__).resolve().parents[1] / "conf"
NUM_CLIENTS = 3


@pytest.fixture(scope="module")
def data() -> PreparedData:
    return binary_data(
        2400,
        600,
        20,
        scale=(0.5, 20, 7),  # off-centre, unequal scales: standardization matters
        n_informative=8,
        weights=[0.16],  # 84% attacks, as in many IoT intrusion sets
        class_sep=1.5,
        random_state=0,
    )


@pytest.fixture(scope="module")
def partitions(data) -> list[np.ndarray]:
    order = np.random.default_rng(0).permutation(len(data.y_train))
    return [np.sort(p) for p in np.array_split(order, NUM_CLIENTS)]


def make_cfg(**simulation):
    """The repo's config with small, fast settings."""
    base = OmegaConf.load(CONF / "config.yaml")
    cfg = OmegaConf.create(
        {
            "seed": 7,
            "model": OmegaConf.load(CONF / "model" / "cnn.yaml"),
            "strategy": OmegaConf.load(CONF / "strategy" / "fedavg.yaml"),
            "train": base.train,
            "simulation": base.simulation,
        }
    )
    cfg.train.learning_rate = 0.005
    cfg.train.batch_size = 32
    cfg.simulation.num_clients = NUM_CLIENTS
    cfg.simulation.num_rounds = 2
    cfg.simulation.local_sites = 0
    for key, value in simulation.items():
        OmegaConf.update(cfg, key, value)
    return cfg


# One Ray start-up per run is the expensive part, so the runs are shared:
# two identical runs (with a failing site each round) and one with the other code paths.
@pytest.fixture(scope="module")
def twin_runs(data, partitions, tmp_path_factory):
    cfg = make_cfg(**{"simulation.client_failure_rate": 0.34})
    first = run_federated(cfg, data, partitions, tmp_path_factory.mktemp("run0"))[0]
    # The second twin as `python -m fedad.simulate` runs it: Ray and the actors started
    # before the data is at hand (start_engine); the results must not tell them apart.
    started = start_engine(cfg)
    try:
        second = run_federated(
            cfg, data, partitions, tmp_path_factory.mktemp("run1"), False, started
        )[0]
    finally:
        started.close()
    return [first, second]


@pytest.mark.slow
def test_final_global_model_beats_the_initial_model(twin_runs):
    history = twin_runs[0].history
    assert list(history["round"]) == [0, 1, 2]
    first, last = history.iloc[0], history.iloc[-1]
    assert last["loss"] < first["loss"]
    assert last["roc_auc"] > first["roc_auc"]
    # The model scored is the round early stopping kept (the best pooled validation loss).
    kept = history[history["round"] == twin_runs[0].info["stopping"]["best_round"]].iloc[0]
    assert twin_runs[0].metrics["roc_auc"] == pytest.approx(kept["roc_auc"])


@pytest.mark.slow
def test_injected_failures_are_survived_and_counted(twin_runs):
    history = twin_runs[0].history
    # floor(0.34 * 3) = 1 site down per round, in training and in evaluation.
    assert list(history["failures"]) == [0, 1, 1]
    assert list(history["eval_failures"]) == [0, 1, 1]
    assert history["train_loss"].iloc[1:].notna().all()
    # The final pass measures the final model at every site.
    clients = twin_runs[0].clients
    assert sorted(clients["client"]) == [0, 1, 2]
    assert clients["roc_auc"].notna().all()
    assert "error" not in clients.columns


@pytest.mark.slow
def test_the_model_arrays_on_the_wire_are_counted_exactly(twin_runs):
    """history.csv's array bytes against a count made here from the model's own size."""
    run = twin_runs[0]
    model_bytes = ArrayRecord(run.model.model.get_weights()).count_bytes()
    history = run.history
    sites = NUM_CLIENTS
    # Round 0: the scaling query carries no array. Then each round sends the model to every
    # site twice (train, evaluate); only good training replies send one back. The last
    # row adds the final evaluation of the final model at every site.
    down = [0] + [2 * sites * model_bytes] * (len(history) - 1)
    down[-1] += sites * model_bytes
    up = [0] + [(sites - f) * model_bytes for f in history["failures"].iloc[1:]]
    assert history["bytes_down_arrays"].tolist() == down
    assert history["bytes_up_arrays"].tolist() == up
    # Configs (pooled scaling statistics) and metrics travel too, counted apart.
    assert (history["bytes_down_other"].iloc[1:] > 0).all()
    assert (history["bytes_up_other"] > 0).all()
    total = (
        history[["bytes_down_arrays", "bytes_down_other", "bytes_up_arrays", "bytes_up_other"]]
        .to_numpy()
        .sum()
    )
    assert history["mb_cumulative"].iloc[-1] == pytest.approx(total / 1e6)


@pytest.mark.slow
def test_one_seed_gives_one_result(twin_runs):
    a, b = twin_runs
    np.testing.assert_allclose(a.scores, b.scores, atol=1e-6)
    for key in ("accuracy", "macro_f1", "roc_auc", "pr_auc", "fpr"):
        assert a.metrics[key] == pytest.approx(b.metrics[key], abs=1e-6)
    columns = ["loss", "roc_auc", "client_loss", "train_loss"]
    np.testing.assert_allclose(a.history[columns], b.history[columns], atol=1e-6)


@pytest.mark.slow
def test_each_client_reads_only_its_own_shard(twin_runs):
    reads = read_access_log(twin_runs[0].model.path.parent)
    readers = {read.reader for read in reads}
    assert readers == {"server", "client_0000", "client_0001", "client_0002"}
    for read in reads:
        assert read.shard == ("test" if read.reader == "server" else read.reader)
    # A local simulation runs on one Ray node, which every read names.
    assert len({read.node for read in reads}) == 1 and reads[0].node


@pytest.mark.slow
def test_federated_scaling_statistics_equal_the_pooled_ones(twin_runs, data):
    with np.load(twin_runs[0].model.path.parent / "scaling.npz") as stats:
        np.testing.assert_allclose(stats["mean"], data.X_train.astype(np.float64).mean(0))
        np.testing.assert_allclose(stats["std"], data.X_train.astype(np.float64).std(0))


@pytest.mark.slow
def test_outputs_are_written_and_the_saved_model_reproduces_the_scores(twin_runs, data):
    result = twin_runs[0]
    run_dir = result.model.path.parent
    for name in ("history.csv", "clients.csv", "global_model.keras", "scaling.npz"):
        assert (run_dir / name).exists()
    for column in ("macro_f1", "f1", "pr_auc", "fpr", "client_macro_f1", "seconds"):
        assert column in result.history.columns
    model = keras.models.load_model(result.model.path)
    with np.load(run_dir / "scaling.npz") as stats:
        X = standardize(data.X_test, stats["mean"], stats["std"])
    np.testing.assert_allclose(model.predict(X, verbose=0), result.scores, atol=1e-6)
    assert result.scores.shape == (len(data.y_test), 2)
    assert result.train_seconds > 0


@pytest.mark.slow
def test_local_scaling_fedprox_and_partial_sampling_run(data, partitions, tmp_path, monkeypatch):
    # As a run past SCALING_SITES sites does: the pooled statistics come from a sample.
    monkeypatch.setattr(server_app, "SCALING_SITES", 2)
    cfg = make_cfg(
        **{
            "simulation.scaling": "local",
            "simulation.fraction_train": 0.67,
            "simulation.min_clients": 2,
            "simulation.final_eval_fraction": 0.67,
            "train.learning_rate": 0.02,
        }
    )
    cfg.model = OmegaConf.load(CONF / "model" / "logistic.yaml")
    cfg.strategy = OmegaConf.load(CONF / "strategy" / "fedprox.yaml")
    result = run_federated(cfg, data, partitions, tmp_path)[0]
    history = result.history
    assert list(history["failures"]) == [0, 0, 0]
    assert history["loss"].iloc[-1] < history["loss"].iloc[0]
    # The final model is evaluated at exactly the sites the seed picks: 2 of the 3.
    chosen = final_evaluation_sites(NUM_CLIENTS, 0.67, seed=7)
    clients = result.clients
    assert len(chosen) == 2 and len(clients) == NUM_CLIENTS
    assert clients.loc[clients["evaluated"], "client"].tolist() == chosen
    assert clients.loc[clients["evaluated"], "macro_f1"].notna().all()
    assert clients.loc[~clients["evaluated"], "macro_f1"].isna().all()
    # The scaling query asked the 2 sites the seed picks, and no other.
    asked = sample_sites(NUM_CLIENTS, 2, seed=7, stream=server_app.SCALING_STREAM)
    assert result.info["scaling_sites"] == 2 and asked != chosen
    assert clients.loc[clients["n_examples"].notna(), "client"].tolist() == asked
    rows = np.concatenate([partitions[i] for i in asked])
    with np.load(tmp_path / "scaling.npz") as stats:
        np.testing.assert_allclose(stats["mean"], data.X_train[rows].astype(np.float64).mean(0))


def test_fedprox_term_keeps_the_client_update_near_the_global_model(data, partitions, tmp_path):
    write_shards(data, partitions, tmp_path)
    settings = make_settings(make_cfg(), data, NUM_CLIENTS, tmp_path)
    settings["train.local_epochs"] = 3
    config = ConfigRecord()
    site = load_site(settings, 0, config)
    model = local_model(settings)
    keras.utils.set_random_seed(0)
    start = [w + np.float32(0.5) for w in model.get_weights()]

    def update(mu: float) -> list[np.ndarray]:
        train_local(model, start, site.X_train, site.y_train, settings, mu=mu, seed=1)
        return model.get_weights()

    def distance(weights: list[np.ndarray]) -> float:
        return math.sqrt(
            sum(float(np.sum((w - s) ** 2)) for w, s in zip(weights, start, strict=True))
        )

    plain, again, proximal = update(0.0), update(0.0), update(10.0)
    # Same seed, same update: the cached model carries nothing over between calls.
    for w, v in zip(plain, again, strict=True):
        np.testing.assert_array_equal(w, v)
    assert any(not np.allclose(w, v) for w, v in zip(plain, proximal, strict=True))
    assert distance(proximal) < 0.5 * distance(plain)


def test_pooled_moments_equal_the_moments_of_all_rows():
    rng = np.random.default_rng(0)
    X = (rng.normal(size=(1000, 6)) * [1, 10, 100, 0.1, 5, 0] + [0, 3, -50, 1e3, 2, 4]).astype(
        np.float32
    )
    sites = np.split(X, [10, 400, 401])
    mean, std = pooled_moments(site_sums(part) for part in sites)
    np.testing.assert_allclose(mean, X.astype(np.float64).mean(0), rtol=1e-9)
    expected_std = X.astype(np.float64).std(0)
    expected_std[expected_std == 0] = 1.0
    np.testing.assert_allclose(std, expected_std, rtol=1e-6)


def test_injected_failures_are_deterministic_and_of_the_configured_share():
    for server_round in range(1, 6):
        down = [injected_failure(3, server_round, pid, 10, 0.25) for pid in range(10)]
        assert sum(down) == 2
        assert down == [injected_failure(3, server_round, pid, 10, 0.25) for pid in range(10)]
    assert not any(injected_failure(3, 1, pid, 3, 0.3) for pid in range(3))
    assert sum(injected_failure(3, 1, pid, 3, 0.99) for pid in range(3)) == 2


def test_local_split_keeps_every_row_once_and_tiny_shards_usable():
    train, val, test = local_split(100, 0.2, 0.1, seed=(0, 1))
    assert (len(train), len(val), len(test)) == (72, 8, 20)
    assert sorted(np.concatenate([train, val, test])) == list(range(100))
    train, val, test = local_split(2, 0.2, 0.1, seed=(0, 1))
    assert (len(train), len(val), len(test)) == (1, 0, 1)


def test_client_metrics_are_averaged_over_the_sites_that_define_them():
    replies = [
        RecordDict({"m": MetricRecord({"roc_auc": 0.8, "acc": 1.0, "num-examples": 30})}),
        RecordDict({"m": MetricRecord({"roc_auc": math.nan, "acc": 0.0, "num-examples": 10})}),
    ]
    out = weighted_mean(replies, "num-examples")
    assert out["roc_auc"] == pytest.approx(0.8)
    assert out["acc"] == pytest.approx(0.75)
    assert "num-examples" not in out


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_every_strategy_config_builds(name):
    cfg = make_cfg()
    cfg.strategy = OmegaConf.load(CONF / "strategy" / f"{name}.yaml")
    strategy = build_strategy(OmegaConf.to_container(cfg.strategy, resolve=True), 1.0, 1.0, 2)
    assert type(strategy) is STRATEGIES[name]


def test_unknown_strategy_lists_the_valid_names():
    with pytest.raises(FedadError, match="fedavg, fedprox"):
        build_strategy({"name": "fedsgd"}, 1.0, 1.0, 2)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("simulation.num_rounds=0", "simulation.num_rounds must be a whole number >= 1"),
        ("simulation.fraction_train=0.0", "simulation.fraction_train must be a number in"),
        ("simulation.fraction_evaluate=1.5", "simulation.fraction_evaluate must be a number in"),
        ("simulation.min_clients=11", r"simulation.min_clients \(11\) cannot exceed"),
        ("simulation.client_failure_rate=1.0", "client_failure_rate must be a number in"),
        ("simulation.scaling=global", "simulation.scaling must be one of federated, local"),
        ("strategy.name=fedsgd", "strategy must be one of fedavg, fedprox"),
        ("train.local_epochs=0", "train.local_epochs must be a whole number >= 1"),
        ("train.batch_size=0", "train.batch_size must be a whole number >= 1"),
        ("model.kernel_size=abc", "model.kernel_size must be a whole number >= 1, got 'abc'"),
    ],
)
def test_invalid_settings_fail_before_any_data_is_read(override, message):
    with pytest.raises(FedadError, match=message):
        validate_all(compose([override]))


def test_min_clients_is_checked_against_the_sites_the_partition_made(partitions):
    cfg = make_cfg()
    cfg.simulation.min_clients = NUM_CLIENTS + 1
    with pytest.raises(FedadError, match="min_clients must be between 1 and the 3 clients"):
        validate(cfg, partitions)


def test_settings_are_flat_scalars_like_a_flower_run_config(data, tmp_path):
    settings = make_settings(make_cfg(), data, NUM_CLIENTS, tmp_path)
    assert all(isinstance(v, bool | int | float | str) for v in settings.values())
    assert settings["model.filters"] == 32
    assert settings["simulation.num_rounds"] == 2
    assert json.loads(settings["class-names"]) == ["normal", "attack"]
    assert not any(k.startswith("simulation.client_resources") for k in settings)


def test_sites_alone_train_the_same_in_parallel_processes(data, partitions, tmp_path, monkeypatch):
    cfg = make_cfg(**{"model": OmegaConf.load(CONF / "model" / "logistic.yaml")})
    write_shards(data, partitions, tmp_path)
    settings = make_settings(cfg, data, NUM_CLIENTS, tmp_path)
    site_rows = [len(p) for p in partitions]
    in_driver = {m.name: m for m in train_alone(settings, data, site_rows, 2)}
    # Any work is enough to go parallel: one spawned process per CPU, each site in one of them.
    monkeypatch.setattr(local_only, "PARALLEL_ROW_PASSES", 0)
    in_workers = {m.name: m for m in train_alone(settings, data, site_rows, 2)}
    assert set(in_driver) == set(in_workers) == {"local_logistic", "local_logistic_worst"}
    driver, workers = in_driver["local_logistic"].info, in_workers["local_logistic"].info
    assert driver["sites"] == workers["sites"] and len(driver["sites"]) == 2
    assert workers["site_macro_f1"] == pytest.approx(driver["site_macro_f1"], abs=0.01)
    worst = in_workers["local_logistic_worst"]
    assert worst.scores.shape == (len(data.y_test), 2)
    assert worst.metrics["macro_f1"] == min(workers["site_macro_f1"])
