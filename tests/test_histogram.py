"""strategy=fedxgb_histogram: equal to its pooled twin, bounded, counted."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import xgboost as xgb

from fedad import rundir
from fedad.errors import FedadError
from fedad.federated.histogram import cohort, pinning, session, twin
from fedad.federated.histogram.server import AggregationServer
from fedad.federated.histogram.strategy import COLLECTIVE_BYTES
from fedad.federated.strategies import check_config
from fedad.models import booster

REPO = Path(__file__).resolve().parents[1]


def _sites(X: np.ndarray, y: np.ndarray, n: int) -> list[np.ndarray]:
    """Unequal, label-skewed shards: rows sorted by label, then cut unevenly."""
    order = np.argsort(y + np.random.default_rng(1).uniform(0, 1.5, len(y)), kind="stable")
    return np.split(order, [len(y) // 5, len(y) // 2])[:n]


def _session(X, y, parts, params, rounds, start=b"", deadline=120.0, world=None):
    """Every site of ``parts`` in one session with a real server; (boosters, rank 0's edges)."""
    counts = np.bincount(y, minlength=int(params.get("num_class", 2)))
    world = len(parts) if world is None else world
    server = AggregationServer(world, 0, timeout=60)

    def site(rank):
        extra, weight = booster.weighting(y[parts[rank]], counts, params["objective"])
        where = {"address": f"localhost:{server.port}", "world": world, "rank": rank}
        return session.run(
            X[parts[rank]],
            y[parts[rank]],
            weight,
            start,
            {**params, **extra},
            rounds,
            where,
            deadline,
        )

    try:
        with ThreadPoolExecutor(len(parts)) as pool:
            results = list(pool.map(site, range(len(parts))))
    finally:
        server.stop()
    return [r[0] for r in results], results[0][1]


def _idle_workers() -> set[int]:
    """The process ids of the sessions' workers waiting for their next session here."""
    return {w.process.pid for w in session._Worker._idle}


def _pooled(X, y, params, rounds, cuts=None):
    """``xgb.train`` on the pooled rows, pooled class weights: the pinned twin given ``cuts``."""
    if cuts is not None:
        return twin.train_pinned(X, y, np.bincount(y), cuts, params, rounds)
    extra, weight = booster.weighting(y, np.bincount(y), params["objective"])
    rows = xgb.QuantileDMatrix(X, label=y, weight=weight, max_bin=params["max_bin"])
    return xgb.train({**params, **extra}, rows, num_boost_round=rounds)


def _data(n=2400, classes=3, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, 5)).astype(np.float32)
    X[:, 4] = np.round(X[:, 4] * 2)  # a feature with few distinct values
    y = np.digitize(X[:, 0] + 0.5 * X[:, 1] + 0.3 * rng.normal(size=n), [-0.3, 1.2][: classes - 1])
    return X, y.astype(np.int64)


def test_pinned_reference_reproduces_the_edges_of_any_feature():
    rng = np.random.default_rng(1)
    columns = [
        rng.exponential(size=600),
        -rng.exponential(size=600),
        np.zeros(600),
        np.full(600, 3.0),
        np.full(600, -2.0),
        rng.integers(0, 3, 600),
        rng.normal(size=600) * 1000,
    ]
    table = np.column_stack(columns).astype(np.float32)
    for max_bin in (4, 16, 256):
        indptr, values = xgb.QuantileDMatrix(table, max_bin=max_bin).get_quantile_cut()
        ref = pinning.reference(indptr, values, max_bin)
        got = ref.get_quantile_cut()
        assert np.array_equal(got[0], indptr) and np.array_equal(got[1], values)


def test_sessions_equal_the_pinned_pooled_twin_and_the_class_weights_are_pooled():
    X, y = _data()
    params = booster.params({"max_depth": 3, "learning_rate": 0.3, "max_bin": 16}, 3, seed=0)
    parts = _sites(X, y, 3)
    # Two Flower rounds: the second session continues the first one's booster.
    first, cuts = _session(X, y, parts, params, rounds=2)
    workers = _idle_workers()
    models, cuts = _session(X, y, parts, params, rounds=2, start=first[0])
    assert len(workers) >= 3 and _idle_workers() == workers  # the same processes served both
    assert len(set(models)) == 1  # every site grew the same trees
    federated = booster.load(models[0])
    rows = xgb.DMatrix(X)
    twin = _pooled(X, y, params, rounds=4, cuts=cuts)
    np.testing.assert_allclose(federated.predict(rows), twin.predict(rows), atol=1e-6)
    # Without the pins the pooled sketch differs on the continuous features: not equal.
    unpinned = _pooled(X, y, params, rounds=4)
    assert np.max(np.abs(federated.predict(rows) - unpinned.predict(rows))) > 1e-6
    # Each site weighting its own classes (as bagging does) grows another model.
    own = booster.train(b"", X[parts[0]], y[parts[0]], params, rounds=1)
    pooled_extra, pooled_weight = booster.weighting(
        y[parts[0]], np.bincount(y), params["objective"]
    )
    _, own_weight = booster.weighting(y[parts[0]], np.bincount(y[parts[0]]), params["objective"])
    assert own.num_boosted_rounds() == 1 and not np.allclose(pooled_weight, own_weight)


def test_few_distinct_values_need_no_pins():
    # Every feature has at most 8 x max_bin distinct values: the merged sketch is exact.
    X, y = _data(classes=2)
    X = np.round(X * 4) / 4
    params = booster.params({"max_depth": 3, "learning_rate": 0.3, "max_bin": 64}, 2, seed=0)
    models, _ = _session(X, y, _sites(X, y, 3), params, rounds=3)
    rows = xgb.DMatrix(X)
    unpinned = _pooled(X, y, params, rounds=3)
    np.testing.assert_allclose(
        booster.load(models[0]).predict(rows), unpinned.predict(rows), atol=1e-6
    )


def test_a_site_that_never_joins_ends_the_session_at_the_deadline():
    X, y = _data(n=600, classes=2)
    params = booster.params({"max_depth": 2, "max_bin": 16}, 2, seed=0)
    # A session of two whose second site never comes: the first is blocked inside XGBoost.
    with pytest.raises(session.SessionFailed, match="did not finish within 4 s"):
        _session(X, y, [np.arange(300)], params, rounds=2, deadline=4.0, world=2)
    # Its worker was ended, not kept for a later session.
    assert all(w.process.poll() is None for w in session._Worker._idle)


def test_a_site_that_dies_mid_session_leaves_the_others_to_their_deadline():
    X, y = _data(n=600, classes=2)
    params = booster.params({"max_depth": 2, "max_bin": 16}, 2, seed=0)
    counts = np.bincount(y)
    parts = _sites(X, y, 2)
    server = AggregationServer(2, 0, timeout=60)

    def site(rank, deadline):
        extra, weight = booster.weighting(y[parts[rank]], counts, params["objective"])
        where = {"address": f"localhost:{server.port}", "world": 2, "rank": rank}
        rows = X[parts[rank]], y[parts[rank]], weight
        # Far more rounds than fit in either deadline: both are mid-session when ended.
        return session.run(*rows, b"", {**params, **extra}, 10**6, where, deadline)

    try:
        with ThreadPoolExecutor(2) as pool:
            # Rank 1 dies mid-session (its process ended at 3 s); rank 0 is left waiting.
            futures = [pool.submit(site, 0, 12.0), pool.submit(site, 1, 3.0)]
            outcomes = [f.exception() for f in futures]
    finally:
        server.stop()
    assert all(isinstance(e, session.SessionFailed) for e in outcomes)
    assert "rank 1 of 2) did not finish within 3 s" in str(outcomes[1])
    # Rank 0 ended by its own deadline, or at once by XGBoost's error: never blocked for good.
    assert "within 12 s" in str(outcomes[0]) or "exited with status" in str(outcomes[0])


def test_a_taken_port_is_refused_before_and_reported_after_the_server_starts():
    with socket.socket() as holder:
        holder.bind(("0.0.0.0", 0))
        holder.listen()
        port = holder.getsockname()[1]
        with pytest.raises(FedadError, match=f"strategy.port={port} is in use"):
            AggregationServer(2, port, timeout=5)
        # Taken after the probe: XGBoost's server crashes, and that is reported, not waited on.
        with pytest.raises(FedadError, match="died as it started"):
            AggregationServer(2, port, timeout=5, probe=False)
        # Started ahead of its round (as the strategy does), it is reported when waited for.
        ahead = AggregationServer(2, port, timeout=5, probe=False, wait=False)
        with pytest.raises(FedadError, match="died as it started"):
            ahead.wait_ready()


def test_bad_settings_are_refused_in_one_phrase_each():
    histogram = {"name": "fedxgb_histogram", "host": "localhost", "port": 0, "session_timeout": 60}
    assert any("does not fit model=mlp" in p for p in check_config(histogram, 3, "mlp"))
    assert check_config(histogram, 3, "xgboost") == []
    bad = check_config({**histogram, "host": "", "port": 70000, "session_timeout": 0}, 3, "xgboost")
    assert [p.split()[0] for p in bad] == [
        "strategy.host",
        "strategy.port",
        "strategy.session_timeout",
    ]
    sim = {"num_clients": 10, "fraction_train": 1.0, "min_clients": 2, "client_resources": {}}
    too_many = {**sim, "num_clients": cohort.SITES_PER_CPU * 4096}
    assert "need" in str(cohort.check(too_many, "fedxgb_histogram"))
    fixed = {**sim, "ray_init_args": {"num_cpus": 4}, "client_resources": {"num_cpus": 1}}
    assert "allows 4" in str(cohort.check(fixed, "fedxgb_histogram"))
    assert cohort.check(too_many, "fedxgb_bagging") is None


def _simulate(folder, *overrides):
    """``python -m fedad.simulate strategy=fedxgb_histogram ...`` as a user runs it."""
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    command = [sys.executable, "-m", "fedad.simulate", f"hydra.run.dir={folder}"]
    return subprocess.run(
        [*command, "strategy=fedxgb_histogram", *overrides],
        cwd=folder.parent,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_bad_input_is_one_paragraph_and_exit_2_before_ray_starts(tmp_path):
    # A non-tree model, a cohort larger than this machine holds at once and a taken port: one
    # command (each check runs; one start of Python instead of three), one paragraph naming all.
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "NOTES.txt").write_text("the user's own file\n")
    too_many = cohort.SITES_PER_CPU * (os.cpu_count() or 1) + 1
    with socket.socket() as holder:
        holder.bind(("0.0.0.0", 0))
        holder.listen()
        port = holder.getsockname()[1]
        done = _simulate(
            folder, "model=mlp", f"simulation.num_clients={too_many}", f"strategy.port={port}"
        )
    error = done.stderr[done.stderr.find("fedad: error:") :]
    assert done.returncode == 2 and error, done.stderr[-3000:]
    words = " ".join(error.split())
    assert "strategy=fedxgb_histogram does not fit model=mlp" in words
    assert f"need {too_many} Ray actors alive together" in words
    assert f"strategy.port={port} is in use" in words
    assert "\n\n" not in error.strip() and "Traceback" not in done.stderr  # one paragraph
    assert "local Ray instance" not in done.stdout + done.stderr  # refused before Ray starts
    assert (folder / "NOTES.txt").read_text() == "the user's own file\n"


def test_a_cohorts_actors_start_without_tensorflow():
    from fedad.federated.engine import ray_options

    init_args, _ = ray_options({"num_cpus": 1}, {}, None, cohort=3)
    hook = init_args["runtime_env"]["worker_process_setup_hook"]
    assert "runtime_env" not in ray_options({"num_cpus": 1}, {}, None, cohort=0)[0]
    # What a Ray worker does with the hook, then what Flower's actor module imports.
    module, name = hook.rsplit(".", 1)
    script = (
        f"import importlib, sys; importlib.import_module({module!r}).{name}(); "
        "import flwr.simulation.ray_transport.ray_actor; "
        "from fedad.federated.families.registry import family_class; family_class('xgboost'); "
        "print(sys.modules['tensorflow'] is None)"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=REPO
    )
    assert done.stdout.strip() == "True", done.stderr[-2000:]


def test_flowers_engine_runs_its_workers_in_a_default_thread_pool():
    # fedad.federated.engine sizes this pool to the actors (a session needs its cohort at once).
    import inspect
    from concurrent.futures import ThreadPoolExecutor

    from flwr.server.superlink.fleet.vce import vce_api

    assert vce_api.ThreadPoolExecutor is ThreadPoolExecutor
    assert "with ThreadPoolExecutor() as executor:" in inspect.getsource(vce_api.run_api)


def test_histograms_and_bytes_follow_the_trees():
    X, y = _data(classes=2)
    params = booster.params({"max_depth": 3, "max_bin": 16}, 2, seed=0)
    trees = booster.to_bytes(booster.train(b"", X, y, params, rounds=2))
    built = pinning.histograms_built(trees, 3)
    # At most 2^(max_depth-1) per tree; at least the root's.
    assert 2 <= built <= 2 * 2 ** (3 - 1)
    assert pinning.collective_bytes(3, built, 80) == 3 * built * 80 * 16 * 2


RUN = [
    "model=xgboost",
    "strategy=fedxgb_histogram",
    "model.max_bin=32",
    "model.local_rounds=2",
    "simulation.num_clients=3",
    "simulation.local_sites=0",
    "simulation.stop.patience=0",
    "train.early_stopping_patience=0",
    "decision.rule=argmax",
    "baselines=none",
    # The plain central XGBoost (always run beside the federated one), kept small.
    "+baselines.models.xgboost.n_estimators=20",
    "explain=false",
    "eda=false",
    "detector.write=false",
]


def _run(run_dir, rounds, resume=False):
    from fedad.config import compose
    from fedad.simulate import run

    return run(compose([*RUN, f"simulation.num_rounds={rounds}"]), run_dir, resume=resume)


def _trained_rows(run_dir, sites):
    """The rows the sites trained on, pooled: their shards, scaled and split as they did."""
    from fedad.federated.task import load_site

    with np.load(run_dir / rundir.SCALING_FILE) as stats:
        config = {"scale-mean": stats["mean"].tolist(), "scale-std": stats["std"].tolist()}
    settings = {"run-dir": str(run_dir), "train.test_fraction": 0.2, "seed": 0}
    loaded = [load_site(settings, pid, config) for pid in range(sites)]
    return np.concatenate([s.X_train for s in loaded]), np.concatenate([s.y_train for s in loaded])


@pytest.mark.long
def test_a_histogram_run_equals_its_pinned_twin_counts_its_bytes_and_resumes_exactly(tmp_path):
    whole = tmp_path / "whole"
    results = _run(whole, rounds=2)
    # The comparison's twin is the pinned one: its gap is federation alone, exactly zero; the
    # plain central XGBoost is named beside it.
    models = results["models"]
    assert models["federated_xgboost"]["info"]["twin"] == twin.PINNED
    assert models[twin.PINNED]["macro_f1"] == models["federated_xgboost"]["macro_f1"]
    table = pd.read_csv(whole / rundir.COMPARISON_CSV).set_index("model")
    row = table.loc["federated_xgboost"]
    assert (row["gap_macro_f1"], row["gap_roc_auc"], row["central"]) == (0.0, 0.0, "xgboost")
    assert row["fed_trees"] == row["twin_trees"] == 4  # 2 rounds x 2 boosting rounds, binary
    assert "Against the unpinned central xgboost" in (whole / rundir.COMPARISON_MD).read_text()
    history = pd.read_csv(whole / rundir.HISTORY_FILE)
    assert (history[COLLECTIVE_BYTES].iloc[1:] > 0).all() and history["failures"].sum() == 0
    flower = history[["bytes_down_arrays", "bytes_up_arrays"]].to_numpy().sum()
    assert history["mb_cumulative"].iloc[-1] * 1e6 >= flower + history[COLLECTIVE_BYTES].sum()
    # The pooled twin: every row the sites trained on, pooled class weights, the run's edges.
    indptr, values, counts = pinning.load(whole)
    X, y = _trained_rows(whole, 3)
    assert np.array_equal(counts, np.bincount(y, minlength=2))
    # Every site's reply carries its class weight, and the server took them only byte-equal:
    # each site weighed the classes by the pooled counts, not its own.
    learner = json.loads((whole / rundir.BOOSTER_FILE).read_bytes())["learner"]
    weight = float(learner["objective"]["reg_loss_param"]["scale_pos_weight"])
    assert weight == pytest.approx(counts[0] / counts[1], rel=1e-7)
    params = booster.params({"max_depth": 6, "learning_rate": 0.1, "max_bin": 32}, 2, seed=0)
    pinned = _pooled(X, y, params, rounds=4, cuts=(indptr, values))
    saved = booster.load((whole / rundir.BOOSTER_FILE).read_bytes())
    rows = xgb.DMatrix(X)
    np.testing.assert_allclose(saved.predict(rows), pinned.predict(rows), atol=1e-6)
    # Cut after round 1 and resumed: the same booster, byte for byte.
    cut = tmp_path / "cut"
    _run(cut, rounds=1)
    _run(cut, rounds=2, resume=True)
    assert (cut / rundir.BOOSTER_FILE).read_bytes() == (whole / rundir.BOOSTER_FILE).read_bytes()


@pytest.mark.long
def test_a_site_that_fails_mid_session_ends_the_round_at_the_deadline_and_keeps_the_last(
    tmp_path, caplog
):
    from fedad.config import compose
    from fedad.simulate import run

    overrides = [
        *RUN,
        "simulation.num_rounds=2",
        "simulation.client_failure_rate=0.34",
        "simulation.failure_mode=error",
        "strategy.session_timeout=5",
    ]
    # One site fails at once; the two others wait in XGBoost until their deadline ends them.
    with pytest.raises(FedadError, match="only 0 of the 3 sampled sites") as failed:
        run(compose(overrides), tmp_path)
    assert "resume=" in str(failed.value)
    ended = " ".join(
        r.getMessage() for r in caplog.records if "did not finish within 5 s" in r.getMessage()
    )
    assert "rank 0 of 3" in ended and "rank 1 of 3" in ended  # both blocked sites, ended
    assert sum("failed (round 1 train)" in r.getMessage() for r in caplog.records) == 3
    assert (tmp_path / "checkpoint").is_dir()
