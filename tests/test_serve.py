"""The REST service, started for real with uvicorn on a free loopback port, asked over HTTP."""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from detector_helpers import raw_rows, synthetic_run

from fedad import rundir
from fedad.detector import Detector

REPO = Path(__file__).resolve().parents[1]
MAX_BATCH = 50


@pytest.fixture(scope="module")
def detector_folder(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("run")
    synthetic_run(run_dir, {"logistic_regression": {}})
    return run_dir / rundir.DETECTOR_DIR / "logistic_regression"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(detector_folder):
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "fedad.serve",
            str(detector_folder),
            "--port",
            str(port),
            "--max-batch",
            str(MAX_BATCH),
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30)
    deadline = time.monotonic() + 120
    while True:
        try:
            if client.get("/health").status_code == 200:
                break
        except httpx.TransportError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"the server did not start: {process.communicate()[1][-3000:]}")
        time.sleep(0.5)
    yield client, process
    client.close()
    if process.poll() is None:
        process.kill()
        process.wait()


def records(n: int = 5) -> list[dict]:
    frame = raw_rows(n)
    # JSON carries no NaN: every cell of these rows is filled.
    return json.loads(frame.to_json(orient="records"))


def test_health_and_schema(server, detector_folder):
    client, _ = server
    assert client.get("/health").json()["status"] == "ok"
    schema = client.get("/schema").json()
    detector = Detector.load(detector_folder)
    assert [f["name"] for f in schema["features"]] == detector.features
    assert schema["max_batch"] == MAX_BATCH
    assert "protocol" in schema["categories"]


def test_json_and_csv_rows_score_as_the_detector_does(server, detector_folder):
    client, _ = server
    rows = records()
    answer = client.post("/score", json={"records": rows})
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["rows"] == len(rows) == len(body["predicted"]) == len(body["attack_score"])
    detector = Detector.load(detector_folder)
    want = detector.score(raw_rows(len(rows)))
    got = np.array([body["probabilities"][c] for c in detector.class_names]).T
    np.testing.assert_allclose(got, want.scores)
    np.testing.assert_allclose(body["attack_score"], want.attack_score)
    assert body["predicted"] == [detector.class_names[i] for i in want.predicted]
    csv_answer = client.post(
        "/score",
        content=raw_rows(len(rows)).to_csv(index=False),
        headers={"content-type": "text/csv"},
    )
    assert csv_answer.status_code == 200, csv_answer.text
    assert csv_answer.json() == body


def test_unseen_categories_are_scored_and_counted_and_extra_columns_listed(server):
    client, _ = server
    rows = records(3)
    rows[0]["service"] = "never-seen"
    rows[1]["service"] = "never-seen-either"
    rows[2]["comment"] = "not a feature"
    body = client.post("/score", json={"records": rows}).json()
    assert body["unseen_categories"] == {"service": 2}
    assert body["ignored_columns"] == ["comment"]
    assert len(body["predicted"]) == 3


def test_the_target_fpr_rule_is_chosen_per_request(server):
    client, _ = server
    body = client.post("/score?rule=target_fpr", json={"records": records(2)}).json()
    assert body["rule"] == "target_fpr" and 0 < body["threshold"] < 1
    answer = client.post("/score?rule=nope", json={"records": records(2)})
    assert answer.status_code == 422 and "nope" in answer.json()["detail"]


@pytest.mark.parametrize(
    ("change", "column", "problem"),
    [
        (lambda r: r.pop("duration"), "duration", "missing"),
        (lambda r: r.update(fwd_bytes="lots"), "fwd_bytes", "valid number"),
        (lambda r: r.update(iat_mean="inf"), "iat_mean", "finite number"),
        (lambda r: r.update(protocol=None), "protocol", "valid"),
    ],
    ids=["missing", "text in a number", "infinite", "null category"],
)
def test_invalid_rows_get_422_naming_the_column(server, change, column, problem):
    client, _ = server
    rows = records(3)
    change(rows[1])
    answer = client.post("/score", json={"records": rows})
    assert answer.status_code == 422
    body = answer.json()
    assert f"'{column}'" in body["detail"] and "(rows 2)" in body["detail"]
    assert {"row": 2, "column": column} == {
        k: v for k, v in body["problems"][0].items() if k != "problem"
    }
    assert problem in body["problems"][0]["problem"]


def test_non_finite_json_numbers_and_empty_csv_cells_get_422(server):
    client, _ = server
    text = json.dumps({"records": records(1)}).replace('"duration": ', '"duration": NaN, "x": ')
    answer = client.post("/score", content=text, headers={"content-type": "application/json"})
    assert answer.status_code == 422 and "'duration'" in answer.json()["detail"]
    frame = raw_rows(2)
    frame.loc[0, "syn_count"] = math.nan
    answer = client.post(
        "/score", content=frame.to_csv(index=False), headers={"content-type": "text/csv"}
    )
    assert answer.status_code == 422 and "'syn_count'" in answer.json()["detail"]


def test_malformed_bodies_are_refused(server):
    client, _ = server
    answer = client.post(
        "/score", content="{not json", headers={"content-type": "application/json"}
    )
    assert answer.status_code == 422
    answer = client.post("/score", content="x", headers={"content-type": "text/plain"})
    assert answer.status_code == 415
    assert client.post("/score", json={"records": []}).status_code == 422


def test_a_batch_over_the_limit_gets_413(server):
    client, _ = server
    rows = records(MAX_BATCH + 1)
    answer = client.post("/score", json={"records": rows})
    assert answer.status_code == 413 and str(MAX_BATCH) in answer.json()["detail"]
    answer = client.post(
        "/score",
        content=raw_rows(MAX_BATCH + 1).to_csv(index=False),
        headers={"content-type": "text/csv"},
    )
    assert answer.status_code == 413
    assert client.post("/score", json={"records": rows[:MAX_BATCH]}).status_code == 200


def test_the_server_stops_cleanly(server):
    _, process = server
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 0, err[-3000:]
    assert "Traceback" not in err


def test_a_bad_detector_folder_exits_2_before_serving(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "fedad.serve", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert done.returncode == 2
    assert "is not a detector folder" in done.stderr and "Traceback" not in done.stderr
