"""The REST service, started for real with uvicorn on a free loopback port, asked over HTTP."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
from detector_helpers import raw_rows
from serve_helpers import Server, run_serve

from fedad.detector import Detector

MAX_BATCH = 50


@pytest.fixture(scope="module")
def server(detector_folder):
    running = Server(detector_folder, "--max-batch", str(MAX_BATCH))
    yield running.client, running
    running.close()


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
        (lambda r: r.update(fwd_bytes="12"), "fwd_bytes", 'valid number, not "12"'),
        (lambda r: r.update(iat_mean="inf"), "iat_mean", "valid number"),
        (lambda r: r.update(syn_count=True), "syn_count", "valid number, not true"),
        (lambda r: r.update(duration=False), "duration", "valid number, not false"),
        (lambda r: r.update(protocol=None), "protocol", "valid"),
        (lambda r: r.update(protocol=True), "protocol", "not true"),
        (lambda r: r.update(service=6.5), "service", "not 6.5"),
        (lambda r: r.update(service=["http"]), "service", "valid"),
    ],
    ids=[
        "missing",
        "text in a number",
        "numeric text in a number",
        "text inf in a number",
        "true as a number",
        "false as a number",
        "null category",
        "true as a category",
        "fraction as a category",
        "list as a category",
    ],
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
    assert len(body["problems"]) == 1


def test_categories_may_be_text_or_whole_numbers(server):
    client, _ = server
    row = records(1)[0]
    rows = [{**row, "protocol": 6}, {**row, "protocol": "6"}]
    body = client.post("/score", json={"records": rows}).json()
    assert body["rows"] == 2
    # The same category either way: matched as text, as in training.
    assert body["attack_score"][0] == body["attack_score"][1]


def test_the_service_scores_as_the_detector_does_at_the_edges(server, detector_folder):
    """Huge, negative and tiny numbers, unseen and padded categories: the detector's scores."""
    client, _ = server
    rows = records(8)
    rows[0].update(fwd_bytes=1e300, bwd_bytes=-1e300)
    rows[1].update(duration=-5.5, iat_mean=1e-300)
    rows[2].update(service="never-seen", protocol=17)
    rows[3].update(service=f"  {rows[3]['service']} ")
    body = client.post("/score", json={"records": rows}).json()
    detector = Detector.load(detector_folder)
    want = detector.score(pd.DataFrame(rows)[detector.features])
    got = np.array([body["probabilities"][c] for c in detector.class_names]).T
    np.testing.assert_array_equal(got, want.scores)
    assert body["predicted"] == [detector.class_names[i] for i in want.predicted]
    assert body["unseen_categories"] == want.unseen
    assert want.unseen.get("service") == 1
    # 1e300 and -1e300 lie beyond every training value: counted alike by both paths.
    assert body["beyond_training"] == want.beyond_training
    assert want.beyond_training.get("fwd_bytes") == 1 and want.beyond_training.get("bwd_bytes") == 1
    assert body["too_large"] == want.too_large
    for row in rows[:4]:  # one row at a time: its encoding is kept, then reused
        want = detector.score(pd.DataFrame([row])[detector.features])
        for _ in range(2):
            alone = client.post("/score", json={"records": [row]}).json()
            np.testing.assert_array_equal(alone["attack_score"], want.attack_score)
            assert alone["unseen_categories"] == want.unseen


def test_non_finite_json_numbers_and_empty_csv_cells_get_422(server):
    client, _ = server
    text = json.dumps({"records": records(1)}).replace('"duration": ', '"duration": NaN, "x": ')
    answer = client.post("/score", content=text, headers={"content-type": "application/json"})
    assert answer.status_code == 422 and "'duration'" in answer.json()["detail"]
    text = json.dumps({"records": records(1)}).replace('"duration": ', '"duration": 1e400, "x": ')
    answer = client.post("/score", content=text, headers={"content-type": "application/json"})
    assert answer.status_code == 422
    assert "finite number" in answer.json()["problems"][0]["problem"]
    frame = raw_rows(2)
    frame.loc[0, "syn_count"] = math.nan
    answer = client.post(
        "/score", content=frame.to_csv(index=False), headers={"content-type": "text/csv"}
    )
    assert answer.status_code == 422 and "'syn_count'" in answer.json()["detail"]


@pytest.mark.parametrize(
    ("content", "headers", "status", "says"),
    [
        (b"{not json", {"content-type": "application/json"}, 400, "not valid JSON"),
        (b'{"records": [{"a": "\xff\xfe"}]}', {}, 400, "not valid JSON"),
        (b"\x1f\x8b\x08\x00garbage", {"content-type": "application/json"}, 400, "JSON"),
        (b"a,b\n1,2\n1,2,3,4\n", {"content-type": "text/csv"}, 400, "CSV body cannot be read"),
        (b"\xff\xfe\x00a,b\n", {"content-type": "text/csv"}, 400, "CSV body cannot be read"),
        (b"", {"content-type": "text/csv"}, 400, "CSV body cannot be read"),
        (b"x", {"content-type": "text/plain"}, 415, "not text/plain"),
        (b"a=1", {"content-type": "application/x-www-form-urlencoded"}, 415, "not application"),
        (b"--b--", {"content-type": "multipart/form-data; boundary=b"}, 415, "not multipart"),
        (b"{}", {"content-type": ""}, 415, "not nothing"),
        (b"{}", {"content-encoding": "gzip"}, 415, "does not decode gzip"),
        (b'{"records": []}', {}, 422, "no rows"),
        (b'{"rows": []}', {}, 422, "'records' missing"),
        (b"[1, 2]", {}, 422, "records"),
    ],
    ids=[
        "broken JSON",
        "JSON not UTF-8",
        "gzip sent as JSON",
        "ragged CSV",
        "CSV not UTF-8",
        "empty CSV",
        "text",
        "form",
        "multipart",
        "empty type",
        "gzip encoding",
        "no rows",
        "no records",
        "a list",
    ],
)
def test_malformed_bodies_and_other_types_are_refused_with_a_message(
    server, content, headers, status, says
):
    client, _ = server
    answer = client.post("/score", content=content, headers=headers)
    assert answer.status_code == status, answer.text
    assert says in answer.json()["detail"]


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
    _, running = server
    assert running.interrupt() == 0, running.stderr[-3000:]
    assert "Traceback" not in running.stderr


def test_a_bad_detector_folder_exits_2_before_serving(tmp_path):
    done = run_serve(str(tmp_path))
    assert done.returncode == 2
    assert "is not a detector folder" in " ".join(done.stderr.split())
    assert "Traceback" not in done.stderr
