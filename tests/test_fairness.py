"""The fairness audit of the sites: clients.csv's columns recomputed, and the summary of them."""

from __future__ import annotations

import json
import math

import keras
import numpy as np
import pandas as pd
import pytest
from flwr.app import ConfigRecord
from generated import binary_data
from sklearn.preprocessing import StandardScaler

from fedad import rundir
from fedad.config import compose, make_settings
from fedad.data.prepared import PreparedData
from fedad.evaluation import comparison, fairness
from fedad.evaluation.metrics import compute_metrics
from fedad.federated import personalize, shards
from fedad.federated.families.classifier import local_model, train_local
from fedad.federated.families.registry import family_for
from fedad.federated.local_only import site_alone
from fedad.federated.simulation import run_federated
from fedad.federated.task import Site, load_site
from fedad.models.inference import predict

SITES = 3
AUDITED = ("macro_f1", "fpr", "recall")
# A small real run: three sites fine-tune the global model, each also trains alone, and the
# model trained on their pooled rows is the central reference.
RUN = [
    "model=logistic",
    "partition=iid",
    f"simulation.num_clients={SITES}",
    f"simulation.local_sites={SITES}",
    "simulation.num_rounds=2",
    "simulation.stop.patience=0",
    "decision.rule=argmax",
    "personalize=finetune",
    "personalize.epochs=2",
    "simulation.central_sites=true",
]


@pytest.fixture(scope="module")
def data() -> PreparedData:
    return binary_data(960, 240, 10, n_informative=5, weights=[0.7], random_state=5)


@pytest.fixture(scope="module")
def run(data, tmp_path_factory):
    """The run's folder, its settings and results (the federated model, then each site alone)."""
    run_dir = tmp_path_factory.mktemp("fair")
    cfg = compose(RUN)
    # Uneven sites, so that they are served unevenly.
    order = np.random.default_rng(1).permutation(len(data.y_train))
    parts = np.split(order, [120, 400])
    models = run_federated(cfg, data, parts, run_dir)
    settings = make_settings(cfg, data, SITES, run_dir)
    return run_dir, settings, models


def _same(value, expected) -> bool:
    if expected is None or (isinstance(expected, float) and math.isnan(expected)):
        return math.isnan(value)
    return value == pytest.approx(expected, abs=1e-12)


@pytest.mark.slow
def test_global_and_personal_columns_equal_those_recomputed_on_each_slice(run, data):
    run_dir, settings, _ = run
    clients = pd.read_csv(run_dir / rundir.CLIENTS_FILE)
    family = family_for(settings)
    family.init_runtime()
    with np.load(run_dir / rundir.SCALING_FILE) as stats:
        pooled = ConfigRecord(
            {"scale-mean": stats["mean"].tolist(), "scale-std": stats["std"].tolist()}
        )
    weights = keras.models.load_model(run_dir / rundir.MODEL_FILE, compile=False).get_weights()
    for pid in range(SITES):
        row = clients.set_index("client").loc[pid]
        site = load_site(settings, pid, pooled, family.val_fraction())
        model = local_model(settings)
        model.set_weights(weights)
        served = compute_metrics(site.y_test, predict(model, site.X_test), data.class_names)
        # The site's own fine-tuning, redone here from the kept global model and its seed.
        epochs = {**settings, "train.local_epochs": int(settings["personalize.epochs"])}
        seed = personalize.seed_for(settings, personalize.FINETUNE_STREAM, 0, pid)
        train_local(model, weights, site.X_train, site.y_train, epochs, mu=0.0, seed=seed)
        personal = compute_metrics(site.y_test, predict(model, site.X_test), data.class_names)
        for metric in AUDITED:
            assert _same(row[metric], served[metric]), (pid, metric)
            assert _same(row[f"personal_{metric}"], personal[metric]), (pid, metric)
        assert int(row["n_test"]) == len(site.y_test)


@pytest.mark.slow
def test_alone_columns_are_each_site_alone_on_its_own_slice(run, data):
    run_dir, settings, models = run
    clients = pd.read_csv(run_dir / rundir.CLIENTS_FILE).set_index("client")
    alone_settings = {**settings, "strategy.name": "local"}
    for pid in range(SITES):
        *_, own = site_alone(alone_settings, pid, data.X_test, data.y_test, list(data.class_names))
        for metric in AUDITED:
            assert _same(clients.loc[pid, f"alone_{metric}"], own[metric]), (pid, metric)
    # The lone sites' rows on the global test set are those sites too.
    assert models[1].info["fairness"] == fairness.audit(clients.reset_index())


@pytest.mark.slow
def test_central_columns_are_a_model_of_the_pooled_rows_without_any_slice(run, data):
    run_dir, settings, _ = run
    clients = pd.read_csv(run_dir / rundir.CLIENTS_FILE).set_index("client")
    settings = {**settings, "strategy.name": "local"}
    family = family_for(settings)
    family.init_runtime()
    shards_ = [
        shards.read_shard(shards.shard_path(str(run_dir), pid), "test")[0] for pid in range(SITES)
    ]
    scaler = StandardScaler().fit(np.concatenate(shards_))
    pooled = ConfigRecord(
        {"scale-mean": scaler.mean_.tolist(), "scale-std": scaler.scale_.tolist()}
    )
    sites = [load_site(settings, pid, pooled, family.val_fraction()) for pid in range(SITES)]
    rows = [np.concatenate([getattr(s, part) for s in sites]) for part in ("X_train", "y_train")]
    # Every training row of every site, and no row of any site's test slice.
    assert len(rows[1]) == sum(len(shard) for shard in shards_) - sum(len(s.y_test) for s in sites)
    empty = np.empty((0, rows[0].shape[1]))
    center = Site(*rows, empty, np.empty(0), empty, np.empty(0))
    family.seed_initial(int(settings["seed"]))
    arrays = family.initial_arrays()
    for server_round in (1, 2):
        arrays, _ = family.fit(
            arrays, center, {}, seed=int(settings["seed"]) + 1000 * server_round + SITES
        )
    for pid, site in enumerate(sites):
        scored = compute_metrics(site.y_test, family.scores(arrays, site.X_test), data.class_names)
        for metric in AUDITED:
            assert _same(clients.loc[pid, f"central_{metric}"], scored[metric]), (pid, metric)


@pytest.mark.slow
def test_the_summary_is_that_of_the_columns(run):
    run_dir, _, models = run
    clients = pd.read_csv(run_dir / rundir.CLIENTS_FILE)
    summary = fairness.audit(clients)
    assert summary["sites"] == SITES
    for model, prefix in fairness.MODELS.items():
        macro = clients[f"{prefix}macro_f1"].to_numpy(dtype=float)
        fpr = clients[f"{prefix}fpr"].dropna().to_numpy(dtype=float)
        got = summary["models"][model]
        assert got["macro_f1"]["worst"] == macro.min()
        assert got["macro_f1"]["worst_site"] == int(clients["client"][np.argmin(macro)])
        assert got["macro_f1"]["p10"] == pytest.approx(np.percentile(macro, 10))
        assert got["macro_f1"]["spread"] == pytest.approx(macro.max() - macro.min())
        assert got["fpr"]["worst"] == fpr.max()
        assert got["fpr"]["p10"] == pytest.approx(np.percentile(fpr, 90))
    alone = clients["alone_macro_f1"]
    for model in ("global", "personal"):
        worse = int((clients[f"{fairness.MODELS[model]}macro_f1"] < alone).sum())
        assert summary["worse_than_alone"][model] == worse
    assert summary["worse_than_alone"]["compared"] == SITES
    # Written for the run: sites.md, and results.json through the lone sites' rows.
    text = (run_dir / rundir.SITES_FILE).read_text()
    worst = summary["models"]["personal"]["macro_f1"]
    assert f"| personal | macro_f1 | {worst['worst']:.3f} ({worst['worst_site']}) |" in text
    assert json.loads(json.dumps(models[1].info["fairness"])) == summary


def test_a_site_without_normal_rows_has_no_fpr_and_is_left_out_of_it():
    rng = np.random.default_rng(0)
    rows = []
    for pid, normal_share in enumerate((0.5, 0.0, 0.3, 0.8)):
        y = (rng.random(40) >= normal_share).astype(int)
        scores = rng.random((40, 2))
        scores /= scores.sum(axis=1, keepdims=True)
        m = compute_metrics(y, scores, ["normal", "attack"])
        rows.append({"client": pid, **{k: m[k] for k in AUDITED}})
    clients = pd.DataFrame(rows)
    summary = fairness.audit(clients)
    fpr = summary["models"]["global"]["fpr"]
    assert fpr["sites"] == 3
    assert fpr["worst"] == clients["fpr"].max()
    assert "personal" not in summary["models"] and "worse_than_alone" not in summary


@pytest.mark.slow
def test_the_comparison_points_to_the_audit(run):
    run_dir, _, models = run
    comparison.write(comparison.table(models), run_dir)
    text = (run_dir / rundir.COMPARISON_MD).read_text()
    assert (run_dir / rundir.SITES_FILE).is_file()
    assert text.rstrip().endswith(f"{rundir.SITES_FILE}.")
