"""tracking=mlflow: runs, per-round metrics, final metrics and artifacts in a real MLflow store."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from omegaconf import open_dict

from fedad.config import compose
from fedad.run.tracking import MlflowTracking

mlflow = pytest.importorskip("mlflow", reason="the [mlflow] extra is not installed")
from mlflow import MlflowClient  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
# Two sites, two rounds of the logistic model on 1,500 generated rows: a federated run at
# the cost of Python, TensorFlow and Ray starting.
TINY = [
    "tracking=mlflow",
    "dataset.n_rows=1500",
    "simulation.num_clients=2",
    "simulation.num_rounds=2",
    "model=logistic",
    "partition=iid",
    "baselines=none",
    "explain=false",
    "eda=false",
]


def _simulate(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI",)}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return subprocess.run(
        [sys.executable, "-m", "fedad.simulate", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def _search(uri: str, experiment: str) -> pd.DataFrame:
    """The runs of ``experiment`` in the store at ``uri``, as ``mlflow.search_runs`` lists them."""
    before = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    try:
        return mlflow.search_runs(experiment_names=[experiment])
    finally:
        mlflow.set_tracking_uri(before)


def _artifacts(client: MlflowClient, run_id: str, path: str | None = None) -> set[str]:
    found = set()
    for item in client.list_artifacts(run_id, path):
        found |= _artifacts(client, run_id, item.path) if item.is_dir else {item.path}
    return found


def test_tracking_group_adds_the_callback_and_none_adds_nothing():
    tracked = compose(["tracking=mlflow"], hydra=True)
    assert tracked.tracking.name == "mlflow"
    assert tracked.hydra.callbacks.mlflow._target_ == "fedad.run.tracking.MlflowTracking"
    plain = compose([], hydra=True)
    assert plain.tracking.name == "none"
    assert "mlflow" not in plain.hydra.callbacks


def test_without_mlflow_the_extra_is_named_before_any_data_is_read(tmp_path):
    run_dir = tmp_path / "run"
    # An environment without MLflow: its import fails, as it does where it is not installed.
    code = (
        "import sys; sys.modules['mlflow'] = None\n"
        "from fedad.simulate import main\n"
        f"main(['tracking=mlflow', 'hydra.run.dir={run_dir}'])\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert done.returncode == 2, done.stderr
    assert 'pip install -e ".[mlflow]"' in " ".join(done.stderr.split())
    assert "Traceback" not in done.stderr
    assert not run_dir.exists()


def _job(tmp_path: Path, folder: Path, *overrides: str):
    """A job's config as Hydra hands it to the callback: run folder and launch folder set."""
    config = compose(["tracking=mlflow", *overrides], hydra=True)
    with open_dict(config):
        config.hydra.runtime.output_dir = str(folder)
        config.hydra.runtime.cwd = str(tmp_path)
    return config


def _folder(tmp_path: Path, name: str, file: str, content: dict) -> Path:
    folder = tmp_path / name
    folder.mkdir()
    (folder / file).write_text(json.dumps(content))
    return folder


def test_statuses_follow_the_run_folder_and_a_finished_job_is_logged_once(tmp_path):
    uri = f"sqlite:///{tmp_path / 'store.db'}"
    model = {"kind": "supervised", "macro_f1": 0.9, "confusion": [[3, 1], [0, 4]]}
    done = _folder(
        tmp_path, "done", "results.json", {"status": "done", "models": {"xgboost": model}}
    )
    pd.DataFrame(
        {"round": [0, 1], "macro_f1": [0.5, 0.8], "started_at": [1.7e9, 1.7e9 + 5]}
    ).to_csv(done / "history.csv", index=False)
    stopped = _folder(
        tmp_path, "stopped", "results.json", {"status": "failed", "error": "interrupted (Ctrl-C)"}
    )
    broken = _folder(tmp_path, "broken", "failed.json", {"status": "failed", "error": "bad rows"})
    callback = MlflowTracking()
    # The finished job twice, as a relaunched sweep that skips it ends it again.
    for folder in (done, stopped, broken, done):
        config = _job(tmp_path, folder, f"tracking.uri={uri}")
        callback.on_job_start(config)
        callback.on_job_end(config, job_return=_completed())

    runs = _search(uri, "fedad").set_index("tags.fedad.run_dir")
    assert len(runs) == 3
    assert runs.loc[str(done), "status"] == "FINISHED"
    assert runs.loc[str(stopped), "status"] == "KILLED"
    assert runs.loc[str(broken), "status"] == "FAILED"
    assert runs.loc[str(broken), "tags.fedad.error"] == "bad rows"
    assert runs.loc[str(done), "metrics.xgboost.macro_f1"] == 0.9
    assert "metrics.xgboost.confusion" not in runs.columns  # not a number
    history = MlflowClient(uri).get_metric_history(runs.loc[str(done), "run_id"], "round.macro_f1")
    assert sorted((m.step, m.value) for m in history) == [(0, 0.5), (1, 0.8)]
    # A SQLite store's artifacts lie beside its database file.
    assert (tmp_path / "artifacts").is_dir()


def test_a_broken_store_is_a_warning_and_the_run_stays_finished(tmp_path, caplog):
    results = {"status": "done", "models": {"xgboost": {"macro_f1": 0.9}}}
    run_dir = _folder(tmp_path, "run", "results.json", results)
    # A store MLflow cannot open: its folder would have to be made inside a file.
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    config = _job(tmp_path, run_dir, f"tracking.uri=sqlite:///{blocker}/mlflow.db")
    callback = MlflowTracking()
    callback.on_job_start(config)
    with caplog.at_level(logging.WARNING, logger="fedad"):
        callback.on_job_end(config, job_return=_completed())
    assert "MLflow tracking failed" in caplog.text
    assert json.loads((run_dir / "results.json").read_text()) == results
    assert not callback.pending  # nothing left for the exit hook to log


def _completed():
    from hydra.core.utils import JobReturn, JobStatus

    done = JobReturn()
    done.status = JobStatus.COMPLETED
    return done


def test_a_single_run_that_stops_on_an_error_is_logged_failed_and_still_exits_2(tmp_path):
    data = tmp_path / "flows.csv"
    data.write_text("a,b,label\n1,2,normal\n3,4,attack\n5,6,normal\n")
    done = _simulate(
        "tracking=mlflow",
        "dataset=csv",
        f"dataset.path={data}",
        "dataset.label_column=lable",
        "federated=false",
        "baselines=none",
        f"hydra.run.dir={tmp_path / 'run'}",
        cwd=tmp_path,
    )
    assert done.returncode == 2, done.stderr[-3000:]
    runs = _search(f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}", "fedad")
    assert runs["status"].tolist() == ["FAILED"]
    assert "dataset.label_column" in runs["tags.fedad.error"].iloc[0]


@pytest.mark.slow
def test_single_run_is_logged_with_params_rounds_metrics_and_artifacts(tmp_path):
    run_dir = tmp_path / "outputs" / "one"
    # A detector folder (written by the run where the detector artifact exists) travels too.
    (run_dir / "detector").mkdir(parents=True)
    (run_dir / "detector" / "threshold.json").write_text('{"threshold": 0.5}')
    done = _simulate(*TINY, f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]

    # The default store: SQLite under mlruns/ in the folder the command ran from.
    store = tmp_path / "mlruns" / "mlflow.db"
    assert store.is_file()
    uri = f"sqlite:///{store}"
    runs = _search(uri, "fedad")
    assert len(runs) == 1
    run = runs.iloc[0]
    assert run["status"] == "FINISHED"
    assert run["tags.fedad.run_dir"] == str(run_dir.resolve())
    assert run["params.simulation.num_rounds"] == "2"
    assert run["params.model.name"] == "logistic"
    assert run["params.tracking.name"] == "mlflow"

    results = json.loads((run_dir / "results.json").read_text())
    federated = results["models"]["federated_logistic"]
    assert run["metrics.federated_logistic.macro_f1"] == pytest.approx(federated["macro_f1"])
    assert run["metrics.federated_logistic.roc_auc"] == pytest.approx(federated["roc_auc"])
    assert run["metrics.wall_seconds"] == pytest.approx(results["wall_seconds"])

    client = MlflowClient(uri)
    history = pd.read_csv(run_dir / "history.csv")
    logged = client.get_metric_history(run["run_id"], "round.macro_f1")
    assert sorted(m.step for m in logged) == history["round"].tolist() == [0, 1, 2]
    by_step = {m.step: m.value for m in logged}
    assert [by_step[r] for r in history["round"]] == pytest.approx(history["macro_f1"].tolist())

    artifacts = _artifacts(client, run["run_id"])
    assert {
        "results.json",
        "history.csv",
        "clients.csv",
        "comparison.csv",
        "comparison.md",
        "config.yaml",
        "partition.png",
        "roc.png",
        "detector/threshold.json",
    } <= artifacts
    assert not any(a.startswith(("shards", "checkpoint")) for a in artifacts)


@pytest.mark.slow
def test_multirun_is_one_experiment_with_a_run_per_job_and_the_failed_one_marked(tmp_path):
    sweep = tmp_path / "sweep"
    uri = f"sqlite:///{tmp_path / 'store.db'}"
    # The second job loses one of its two sites in round 1, below min_clients=2: it fails.
    done = _simulate(
        "-m",
        *TINY,
        f"tracking.uri={uri}",
        f"hydra.sweep.dir={sweep}",
        "simulation.min_clients=2",
        "simulation.client_failure_rate=0.0,0.5",
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads((sweep / "1" / "results.json").read_text())["status"] == "failed"

    runs = _search(uri, str(sweep))
    assert len(runs) == 2
    by_rate = {float(r["params.simulation.client_failure_rate"]): r for _, r in runs.iterrows()}
    finished, failed = by_rate[0.0], by_rate[0.5]
    assert finished["status"] == "FINISHED"
    assert failed["status"] == "FAILED"
    assert "min_clients" in failed["tags.fedad.error"]
    assert "simulation.client_failure_rate=0.0" in finished["tags.mlflow.runName"]
    client = MlflowClient(uri)
    steps = [m.step for m in client.get_metric_history(finished["run_id"], "round.loss")]
    assert sorted(steps) == [0, 1, 2]
    assert "results.json" in _artifacts(client, failed["run_id"])
