"""Federated early stopping: real Flower runs that stop, keep their best round and resume.

The runs are small (3 sites of unequal size, a few rounds) because a Ray start-up is what
they cost. Every stopping run sets ``simulation.stop.min_delta`` above any change its
validation loss can make: from round 1 on the metric is a plateau by the rule, so the
round that stops and the round kept are known in advance whatever the machine.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from flwr.app import ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from generated import binary_data
from messages import server_message

from fedad import rundir
from fedad.config import FLOWER_KEYS, compose, content, make_settings
from fedad.data.prepared import PreparedData
from fedad.errors import FedadError
from fedad.evaluation.metrics import macro_f1
from fedad.federated import checkpoint
from fedad.federated.families.registry import family_for
from fedad.federated.grid import PAYLOAD
from fedad.federated.rounds import pool_counts
from fedad.federated.simulation import run_federated
from fedad.federated.stopping import EarlyStopping
from fedad.federated.task import load_site, validation_counts, validation_metrics
from fedad.run.validate import validate

REPO = Path(__file__).resolve().parents[1]
# Small and fast; logistic is the cheapest Keras classifier.
BASE = ["simulation.num_clients=3", "simulation.local_sites=0", "model=logistic"]
# min_delta above any change of the loss: round 1 is best, nothing after it improves.
PLATEAU = ["simulation.stop.patience=2", "simulation.stop.min_delta=10"]
# What TensorFlow's C++ side prints on import, before Python's logging is set up.
TF_NOISE = re.compile(r"WARNING: All log messages before absl::InitializeLog\(\)|[IWE]\d{4} ")
# Differ between runs of the same settings; so does the payload of a resumed run, which asks
# every site for its scaling sums again.
TIMING = ["seconds", "started_at", *PAYLOAD, "mb_cumulative"]


@pytest.fixture(scope="module")
def data() -> PreparedData:
    return binary_data(
        2400, 600, 12, scale=(0.5, 9, 3), n_informative=6, weights=[0.3], random_state=1
    )


@pytest.fixture(scope="module")
def partitions(data) -> list[np.ndarray]:
    """Sites of 400, 800 and 1,200 rows: an average of site means is not the pooled mean."""
    order = np.random.default_rng(0).permutation(len(data.y_train))
    return [np.sort(order[:400]), np.sort(order[400:1200]), np.sort(order[1200:])]


def _run(data, partitions, run_dir: Path, *overrides: str, resume: bool = False):
    return run_federated(compose([*BASE, *overrides]), data, partitions, run_dir, resume)[0]


def _history(run_dir: Path) -> pd.DataFrame:
    return pd.read_csv(run_dir / rundir.HISTORY_FILE).drop(columns=TIMING)


@pytest.fixture(scope="module")
def stopped(data, partitions, tmp_path_factory):
    """An uninterrupted run of at most 6 rounds that stops early, after round 3."""
    run_dir = tmp_path_factory.mktemp("stopped")
    return _run(data, partitions, run_dir, *PLATEAU, "simulation.num_rounds=6"), run_dir


@pytest.fixture(scope="module")
def continued(data, partitions, tmp_path_factory):
    """The same run cut after round 2 (it ran num_rounds=2), then continued up to 6 rounds."""
    run_dir = tmp_path_factory.mktemp("continued")
    first = _run(data, partitions, run_dir, *PLATEAU, "simulation.num_rounds=2")
    meta = checkpoint.read_meta(run_dir)
    then = _run(data, partitions, run_dir, *PLATEAU, "simulation.num_rounds=6", resume=True)
    return first, meta, then, run_dir


@pytest.mark.slow
def test_a_plateau_stops_training_and_the_best_round_is_kept(stopped, data):
    result, run_dir = stopped
    history = result.history
    # Round 1 is the best; rounds 2 and 3 do not improve (patience 2): no round 4.
    assert list(history["round"]) == [0, 1, 2, 3]
    assert history["val_loss"].iloc[1:].notna().all()
    assert history["best_round"].iloc[1:].tolist() == [1, 1, 1]
    assert result.info["stopping"] == {
        "metric": "loss",
        "patience": 2,
        "min_delta": 10.0,
        "rounds_run": 3,
        "best_round": 1,
        "reason": "patience",
    }
    # The checkpoint of the last round holds the best round's arrays apart from its own.
    saved = checkpoint.load(run_dir)
    assert saved.round == 3 and saved.stopping["best_round"] == 1
    assert checkpoint.stopped_early(checkpoint.read_meta(run_dir))
    assert not all(
        np.array_equal(a, b) for a, b in zip(saved.arrays, saved.best_arrays, strict=True)
    )
    # The model written and scored is round 1's: its weights, and its test metrics.
    written = result.model.model.get_weights()
    for kept, best in zip(written, saved.best_arrays, strict=True):
        np.testing.assert_array_equal(kept, best)
    # (Each round is scored at argmax; the result keeps those metrics beside its calibrated ones.)
    best_row = history[history["round"] == 1].iloc[0]
    argmax = {**result.metrics, **result.info.get("argmax", {})}
    for key in ("macro_f1", "roc_auc", "fpr", "accuracy"):
        assert argmax[key] == pytest.approx(best_row[key], abs=1e-6), key
    # Its per-site scores (clients.csv) are of round 1's model too: the sites' test slices.
    assert result.clients["evaluated"].all()


@pytest.mark.slow
def test_the_pooled_validation_loss_is_the_loss_of_every_site_validation_row(
    stopped, data, partitions
):
    """history.csv's val_loss of round 1 against the loss recomputed here from the slices."""
    result, run_dir = stopped
    settings = make_settings(
        compose([*BASE, *PLATEAU, "simulation.num_rounds=6"]), data, len(partitions), run_dir
    )
    family = family_for(settings)
    with np.load(run_dir / rundir.SCALING_FILE) as stats:
        config = ConfigRecord(
            {"scale-mean": stats["mean"].tolist(), "scale-std": stats["std"].tolist()}
        )
    best = checkpoint.load(run_dir).best_arrays
    losses, labels, predicted, sizes = [], [], [], []
    for pid in range(len(partitions)):
        site = load_site(settings, pid, config, family.val_fraction(), reader="test")
        probabilities = family.scores(best, site.X_val)
        rows = np.arange(len(site.y_val))
        losses.append(-np.log(np.clip(probabilities[rows, site.y_val], 1e-7, 1.0)))
        labels.append(site.y_val)
        predicted.append(probabilities.argmax(axis=1))
        sizes.append(len(site.y_val))
    # Every site drew its validation slice (train.val_fraction of what its test slice leaves).
    assert sizes == [32, 64, 96]
    row = result.history[result.history["round"] == 1].iloc[0]
    assert row["val_loss"] == pytest.approx(np.concatenate(losses).mean(), rel=1e-6)
    y, y_pred = np.concatenate(labels), np.concatenate(predicted)
    assert row["val_macro_f1"] == pytest.approx(macro_f1(y, y_pred, 2), rel=1e-9)
    # No sum- count reaches the clients' averaged columns.
    assert not [c for c in result.history.columns if "sum-" in c]


@pytest.mark.slow
def test_a_run_continued_past_its_checkpoint_equals_the_uninterrupted_one(continued, stopped):
    first, meta, then, run_dir = continued
    # Cut after round 2: it ran its num_rounds, keeping round 1; the rule's state is saved.
    assert first.info["stopping"]["reason"] == "max_rounds"
    assert first.info["stopping"]["best_round"] == 1
    assert meta["round"] == 2 and meta["stopping"]["best_round"] == 1
    assert meta["stopping"]["num_best"] > 0  # round 1's arrays, apart from round 2's
    assert not checkpoint.stopped_early(meta)
    uninterrupted, stopped_dir = stopped
    pd.testing.assert_frame_equal(_history(run_dir), _history(stopped_dir), check_exact=True)
    assert then.info["stopping"] == uninterrupted.info["stopping"]
    for key in ("accuracy", "macro_f1", "roc_auc", "pr_auc", "fpr"):
        assert then.metrics[key] == uninterrupted.metrics[key], key
    weights = [then.model.model.get_weights(), uninterrupted.model.model.get_weights()]
    for a, b in zip(*weights, strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.slow
def test_resuming_a_run_that_stopped_early_trains_no_further(stopped, data, partitions):
    result, run_dir = stopped
    history = _history(run_dir)
    again = _run(data, partitions, run_dir, *PLATEAU, "simulation.num_rounds=9", resume=True)
    pd.testing.assert_frame_equal(_history(run_dir), history, check_exact=True)
    assert again.info["stopping"]["rounds_run"] == 3
    assert again.info["stopping"]["best_round"] == 1
    assert again.metrics["macro_f1"] == result.metrics["macro_f1"]
    # No site trained a round 4 (a site writes its optimizer state after each round it trains).
    assert not list((run_dir / rundir.SHARD_DIR).glob("client_*/state-round0004.npz"))


@pytest.mark.slow
def test_a_finished_run_that_stopped_early_is_done_whatever_its_round_budget(stopped, tmp_path):
    from fedad.run.resume import Decision, decide

    _, stopped_dir = stopped
    run_dir = tmp_path / "finished"
    shutil.copytree(stopped_dir / rundir.CHECKPOINT_DIR, run_dir / rundir.CHECKPOINT_DIR)
    rundir.save_results(run_dir, {"status": rundir.DONE})
    for rounds in (6, 9):
        cfg = compose([*BASE, *PLATEAU, f"simulation.num_rounds={rounds}"])
        assert decide(cfg, run_dir) == Decision.DONE
    # Other settings still refuse, whatever the stop.
    with pytest.raises(FedadError):
        decide(compose([*BASE, *PLATEAU, "simulation.num_rounds=9", "seed=5"]), run_dir)


@pytest.mark.slow
def test_a_booster_stops_and_keeps_its_best_trees(data, partitions, tmp_path):
    result = _run(
        data,
        partitions,
        tmp_path,
        "model=xgboost",
        "simulation.stop.patience=1",
        "simulation.stop.min_delta=10",
        "simulation.num_rounds=5",
    )
    assert result.info["stopping"]["rounds_run"] == 2
    assert result.info["stopping"]["best_round"] == 1
    assert result.info["stopping"]["reason"] == "patience"
    best = checkpoint.load(tmp_path).best_arrays
    assert (tmp_path / rundir.BOOSTER_FILE).read_bytes() == best[0].tobytes()
    row = result.history[result.history["round"] == 1].iloc[0]
    assert result.metrics["roc_auc"] == pytest.approx(row["roc_auc"], abs=1e-9)


@pytest.mark.slow
def test_an_autoencoder_stops_and_keeps_its_best_round_threshold(data, partitions, tmp_path):
    result = _run(
        data,
        partitions,
        tmp_path,
        "model=autoencoder",
        # A step large enough that round 2 moves the error distribution, and its threshold.
        "train.learning_rate=0.03",
        "simulation.stop.patience=1",
        "simulation.stop.min_delta=10",
        "simulation.num_rounds=5",
    )
    history = result.history
    assert list(history["round"]) == [0, 1, 2]
    assert result.info["stopping"]["best_round"] == 1
    # Its loss is the reconstruction error of normal validation rows: positive, finite.
    assert (history["val_loss"].iloc[1:] > 0).all()
    # The threshold kept is the one chosen with round 1's model, not round 2's.
    threshold = json.loads((tmp_path / rundir.THRESHOLD_FILE).read_text())["threshold"]
    assert threshold == pytest.approx(history["threshold"].iloc[1], rel=1e-12)
    assert threshold != pytest.approx(history["threshold"].iloc[2], rel=1e-12)
    assert result.metrics["macro_f1"] == pytest.approx(history["macro_f1"].iloc[1], abs=1e-6)


# --- the pieces alone -----------------------------------------------------------------------


def _reply(metrics: dict, node: int = 1) -> Message:
    """A site's evaluate reply, as the server receives it."""
    incoming = server_message([], MessageType.EVALUATE, {}, node - 1)
    return Message(RecordDict({"metrics": MetricRecord(metrics)}), reply_to=incoming)


def test_counts_are_summed_exactly_and_kept_out_of_the_average():
    replies = [
        _reply({"loss": 0.5, "num-examples": 10, "sum-rows": 3, "sum-hist": [1, 2, 0]}),
        _reply({"loss": 0.1, "num-examples": 30, "sum-rows": 4, "sum-hist": [0, 5, 7]}),
    ]
    assert pool_counts(replies) == {"sum-rows": 7, "sum-hist": [1, 7, 7]}
    for reply in replies:  # what the strategy then averages
        assert set(reply.content["metrics"]) == {"loss", "num-examples"}


def test_validation_counts_pool_to_the_metrics_of_all_rows():
    rng = np.random.default_rng(3)
    y = rng.integers(0, 3, 200)
    y_pred = np.where(rng.random(200) < 0.7, y, rng.integers(0, 3, 200))
    losses = rng.random(200)
    parts = [slice(0, 20), slice(20, 150), slice(150, 200)]
    replies = [_reply(validation_counts(y[p], y_pred[p], losses[p], 3)) for p in parts]
    pooled = validation_metrics(pool_counts(replies))
    assert pooled["val_loss"] == pytest.approx(losses.mean(), rel=1e-12)
    assert pooled["val_macro_f1"] == pytest.approx(macro_f1(y, y_pred, 3), rel=1e-12)
    assert math.isnan(validation_metrics({})["val_loss"])


def test_the_rule_counts_rounds_without_improvement():
    rule = EarlyStopping("macro_f1", patience=2, min_delta=0.01)
    arrays = [np.zeros(1)]
    improved = [rule.update(r, v, lambda: arrays) for r, v in enumerate([0.5, 0.505, 0.52], 1)]
    assert improved == [True, False, True] and rule.best_round == 3
    rule.update(4, float("nan"), lambda: arrays)  # no validation row answered: no improvement
    assert not rule.exhausted
    rule.update(5, 0.52, lambda: arrays)
    assert rule.exhausted and rule.waited == 2
    assert "early stopping after round 5 of 9" in rule.message(9)
    assert not EarlyStopping("loss", patience=0, min_delta=0.0).exhausted


def test_stop_settings_reach_the_apps_and_count_only_when_on(data, tmp_path):
    keys = {"simulation.stop.metric", "simulation.stop.patience", "simulation.stop.min_delta"}
    assert keys <= set(FLOWER_KEYS)
    assert not [k for k in FLOWER_KEYS if k.startswith("simulation.client_resources")]
    settings = make_settings(compose([*BASE, *PLATEAU]), data, 3, tmp_path)
    assert {k: settings[k] for k in keys} == {
        "simulation.stop.metric": "loss",
        "simulation.stop.patience": 2,
        "simulation.stop.min_delta": 10.0,
    }
    # Off, the block changes nothing a run computes: older runs stay comparable.
    off = compose([*BASE, "simulation.stop.patience=0"])
    assert not [k for k in content(off) if k.startswith("simulation.stop")]
    assert content(compose([*BASE, *PLATEAU]))["simulation.stop.patience"] == 2


def test_stopping_needs_validation_rows_at_the_sites():
    with pytest.raises(FedadError, match=r"simulation.stop .* train.val_fraction must be > 0"):
        validate(compose([*PLATEAU, "train.val_fraction=0"]))
    validate(compose(["simulation.stop.patience=0", "train.val_fraction=0"]))


# --- bad input: one paragraph, exit 2, before any data is read ------------------------------


@pytest.mark.parametrize(
    "override, words",
    [
        (
            "simulation.stop.patience=-1",
            ["simulation.stop.patience must be a whole number >= 0", "0 = off", "got -1"],
        ),
        ("simulation.stop.patience=1.5", ["simulation.stop.patience must be a whole number"]),
        (
            "simulation.stop.metric=auc",
            ["simulation.stop.metric must be one of loss, macro_f1", "got 'auc'"],
        ),
        ("simulation.stop.min_delta=-0.1", ["simulation.stop.min_delta must be a number >= 0"]),
    ],
    ids=["patience_negative", "patience_not_whole", "metric_unknown", "min_delta_negative"],
)
def test_bad_stop_settings_are_refused_before_any_data_is_read(tmp_path, override, words):
    run_dir = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k not in ("HYDRA_FULL_ERROR", "FEDAD_DATA_DIR")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "fedad.simulate",
            f"hydra.run.dir={run_dir}",
            # A data file that is not there: reading the data first would fail on it instead.
            "dataset=csv",
            f"dataset.path={tmp_path / 'absent.csv'}",
            override,
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 2, done.stderr[-3000:]
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    # One paragraph, bar TensorFlow's native start-up lines should it be imported.
    paragraph = "".join(
        line for line in done.stderr.splitlines(keepends=True) if not TF_NOISE.match(line)
    ).rstrip()
    assert paragraph.startswith("fedad: error:"), done.stderr[-3000:]
    lines = paragraph.splitlines()
    assert len(lines) <= 8 and all(line.strip() for line in lines), paragraph
    text = " ".join(paragraph.split())
    for word in words:
        assert word in text, text
    assert "absent.csv" not in text
    assert not (run_dir / rundir.RESULTS_FILE).exists()
    assert not (run_dir / rundir.FAILED_FILE).exists()
