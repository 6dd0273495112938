"""A saved detector scores raw rows as its run did: artifact, score, export, bad input."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from detector_helpers import (
    assert_score_reproduces_run,
    expected_scores,
    raw_rows,
    synthetic_run,
)

from fedad import rundir, score
from fedad.config import compose
from fedad.data.preprocess import preprocessor_from_dict, preprocessor_to_dict
from fedad.detector import FORMAT_VERSION, Detector
from fedad.errors import FedadError
from fedad.evaluation.metrics import compute_metrics

MODELS = {
    "logistic_regression": {"C": 1.0, "max_iter": 1000, "class_weight": "balanced"},
    "random_forest": {"n_estimators": 20, "max_depth": None, "min_samples_leaf": 1},
    "xgboost": {"n_estimators": 30, "max_depth": 4, "learning_rate": 0.1},
    "central_logistic": {"model": "logistic"},
}


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("run")
    cfg, data, results = synthetic_run(run_dir, MODELS)
    return run_dir, data, results


def detector_dir(run_dir: Path, name: str) -> Path:
    return run_dir / rundir.DETECTOR_DIR / name


def test_the_preprocessing_round_trips_through_plain_values(small_run):
    _, data, _ = small_run
    frame = raw_rows(500)
    frame.loc[0, "service"] = "never-seen-in-training"
    pre = data.preprocessor
    loaded = preprocessor_from_dict(json.loads(json.dumps(preprocessor_to_dict(pre))))
    features = [*pre.numeric, *pre.categorical]
    assert loaded.feature_names == pre.feature_names
    np.testing.assert_array_equal(loaded.transform(frame[features]), pre.transform(frame[features]))
    assert loaded.unseen == {"service": 1}


@pytest.mark.parametrize("name", list(MODELS))
def test_every_model_kind_scores_raw_rows_as_in_its_run(small_run, name):
    run_dir, data, results = small_run
    detector = Detector.load(detector_dir(run_dir, name))
    frame = raw_rows()
    got = detector.score(frame).scores
    want = expected_scores(data, results[name], frame)
    if detector.manifest["model"]["kind"] == "keras":
        np.testing.assert_allclose(got, want, atol=1e-6)
    else:
        np.testing.assert_array_equal(got, want)
    manifest = detector.manifest
    assert manifest["format_version"] == FORMAT_VERSION
    assert manifest["test_metrics"] == results[name].metrics
    assert manifest["model"]["validation_macro_f1"] == results[name].info["validation_macro_f1"]
    assert {"fedad", "numpy", "scikit-learn"} <= set(manifest["versions"])
    assert [f["name"] for f in manifest["schema"]["features"]] == detector.features
    assert {"site", "device", "is_attack"} <= set(manifest["schema"]["dropped"])


def test_the_target_fpr_rule_flags_at_most_its_share_of_normal_validation_rows(small_run):
    run_dir, _, results = small_run
    detector = Detector.load(detector_dir(run_dir, "logistic_regression"))
    rule = detector.rules["target_fpr"]
    assert rule["target"] == 0.05 and rule["fpr"] <= 0.05
    scored = detector.score(raw_rows(), "target_fpr")
    np.testing.assert_array_equal(scored.predicted, scored.attack_score >= rule["threshold"])


def test_score_writes_one_row_per_input_row_and_prints_the_metrics(small_run, tmp_path, capsys):
    run_dir, _, _ = small_run
    frame = pd.concat([raw_rows(), raw_rows(5)], ignore_index=True)  # duplicates stay
    frame["note"] = "extra column"
    source = tmp_path / "rows.csv"
    frame.to_csv(source, index=False)
    out = tmp_path / "scores.csv"
    score.main([str(detector_dir(run_dir, "xgboost")), str(source), "-o", str(out)])
    printed = capsys.readouterr().out
    table = pd.read_csv(out)
    assert len(table) == len(frame)
    assert list(table["row"]) == list(range(1, len(frame) + 1))
    assert set(table["predicted"]) <= {"normal", "attack"}
    assert (table["threshold"] == 0.5).all()
    assert "columns ignored: note" in printed
    y = (frame["attack_type"] != "normal").astype(int).to_numpy()
    metrics = compute_metrics(y, table[["p_normal", "p_attack"]].to_numpy(), ["normal", "attack"])
    assert f"macro_f1 {metrics['macro_f1']:.4f}" in printed


def _fails(capsys, *argv: str) -> str:
    with pytest.raises(SystemExit) as exit_info:
        score.main([*argv])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("fedad: error: ") and "Traceback" not in err
    return " ".join(err.split())


@pytest.fixture()
def copy_of(small_run, tmp_path):
    run_dir, _, _ = small_run
    folder = tmp_path / "detector"
    shutil.copytree(detector_dir(run_dir, "logistic_regression"), folder)
    source = tmp_path / "rows.csv"
    raw_rows(20).to_csv(source, index=False)
    return folder, source


def test_a_detector_missing_a_file_is_refused(copy_of, capsys):
    folder, source = copy_of
    (folder / rundir.DETECTOR_PREPROCESSING).unlink()
    err = _fails(capsys, str(folder), str(source))
    assert f"{rundir.DETECTOR_PREPROCESSING} is missing" in err


def test_a_changed_model_file_is_refused(copy_of, capsys):
    folder, source = copy_of
    with open(folder / rundir.DETECTOR_SKOPS, "ab") as f:
        f.write(b"tampered")
    assert "checksum differs" in _fails(capsys, str(folder), str(source))


def test_a_detector_of_another_format_version_is_refused(copy_of, capsys):
    folder, source = copy_of
    manifest = rundir.read_json(folder / rundir.DETECTOR_MANIFEST)
    rundir.write_json(folder / rundir.DETECTOR_MANIFEST, {**manifest, "format_version": 99})
    err = _fails(capsys, str(folder), str(source))
    assert "format version 99" in err and f"reads format version {FORMAT_VERSION}" in err


def test_other_library_versions_are_warned_about(copy_of, caplog):
    folder, _ = copy_of
    manifest = rundir.read_json(folder / rundir.DETECTOR_MANIFEST)
    manifest["versions"]["scikit-learn"] = "0.1"
    rundir.write_json(folder / rundir.DETECTOR_MANIFEST, manifest)
    with caplog.at_level(logging.WARNING, logger="fedad"):
        Detector.load(folder)
    assert "scikit-learn 0.1 -> " in caplog.text


def test_a_run_folder_is_not_a_detector_but_names_its_detectors(small_run, capsys, tmp_path):
    run_dir, _, _ = small_run
    err = _fails(capsys, str(run_dir), str(tmp_path / "rows.csv"))
    assert str(detector_dir(run_dir, "xgboost")) in err


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            lambda f: f.drop(columns=["duration", "protocol"]),
            "lacks column(s) the detector needs: duration, protocol",
        ),
        (lambda f: f.assign(duration=["abc", *f["duration"][1:]]), "'duration' (row 1: 'abc'"),
        (lambda f: f.assign(fwd_bytes=[np.nan, *f["fwd_bytes"][1:]]), "'fwd_bytes' (row 1: empty"),
        (lambda f: f.head(0), "has a header but no rows"),
    ],
    ids=["missing column", "text in a number", "empty cell", "header only"],
)
def test_bad_input_files_end_with_one_paragraph_and_write_nothing(
    copy_of, capsys, tmp_path, change, message
):
    folder, source = copy_of
    frame = change(raw_rows(20))
    frame.to_csv(source, index=False)
    out = tmp_path / "scores.csv"
    assert message in _fails(capsys, str(folder), str(source), "-o", str(out))
    assert not out.exists() and not list(tmp_path.glob("*.tmp"))


def test_an_empty_file_is_refused(copy_of, capsys, tmp_path):
    folder, _ = copy_of
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    assert "is empty" in _fails(capsys, str(folder), str(empty))


def test_a_rule_the_detector_lacks_is_refused(copy_of, capsys):
    folder, source = copy_of
    assert "no decision rule 'nope'" in _fails(capsys, str(folder), str(source), "--rule", "nope")


def test_a_tree_model_is_not_exported(small_run, capsys):
    from fedad import export

    run_dir, _, _ = small_run
    with pytest.raises(SystemExit) as exit_info:
        export.main([str(detector_dir(run_dir, "xgboost")), "--format", "tflite"])
    assert exit_info.value.code == 2
    assert "only Keras models" in capsys.readouterr().err


def test_a_bad_detector_setting_is_refused_before_any_data_is_read():
    from fedad.run.validate import validate

    with pytest.raises(FedadError, match="detector.target_fpr"):
        validate(compose(["detector.target_fpr=2"]))


@pytest.fixture(scope="module")
def nsl_kdd_run(tmp_path_factory, data_dir):
    from fedad.simulate import run

    cfg = compose(
        [
            "dataset=nsl_kdd",
            f"data_dir={data_dir}",
            "simulation.num_clients=2",
            "simulation.num_rounds=1",
            "explain=false",
            "~baselines.models.random_forest",
            "~baselines.models.central_cnn",
            "~baselines.models.central_logistic",
        ]
    )
    run_dir = tmp_path_factory.mktemp("nsl_kdd")
    return cfg, run_dir, run(cfg, run_dir)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["federated", "supervised"])
def test_scoring_the_raw_test_file_reproduces_the_run_metrics(
    nsl_kdd_run, data_dir, tmp_path, kind
):
    cfg, run_dir, results = nsl_kdd_run
    (name,) = [n for n in results["detectors"] if results["models"][n]["kind"] == kind]
    assert_score_reproduces_run(
        run_dir / results["detectors"][name]["folder"],
        data_dir / cfg.dataset.test_file,
        list(cfg.dataset.columns),
        results,
        tmp_path / "scores.csv",
    )


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["tflite", "onnx"])
def test_the_federated_model_exports_with_the_same_scores(nsl_kdd_run, capsys, tmp_path, fmt):
    from fedad import export

    if fmt == "onnx":
        pytest.importorskip("tf2onnx", reason="the onnx export needs the [edge] extra")
        pytest.importorskip("onnxruntime", reason="the onnx export needs the [edge] extra")
    _, run_dir, results = nsl_kdd_run
    folder = run_dir / results["detectors"]["federated_cnn"]["folder"]
    out = tmp_path / f"model.{fmt}"
    export.main([str(folder), "--format", fmt, "-o", str(out)])
    printed = capsys.readouterr().out
    assert out.is_file() and f"{out.stat().st_size / 1024:.1f} KB" in printed
    assert "its scores match the Keras model's within 1e-05" in printed
    assert "on 22544 rows" in printed


# --- the federated autoencoder: an anomaly score, flagged at its run's threshold --------------


@pytest.fixture(scope="module")
def autoencoder_detector(autoencoder_run, kdd_dir) -> tuple[Path, dict, Path]:
    """The shared autoencoder run's detector folder, its results and its raw test file."""
    run_dir, results = autoencoder_run
    cfg = compose(["dataset=nsl_kdd"])
    folder = run_dir / results["detectors"]["federated_autoencoder"]["folder"]
    return folder, results, kdd_dir / cfg.dataset.test_file


@pytest.mark.slow
def test_the_federated_autoencoder_detector_reproduces_its_run(
    autoencoder_run, autoencoder_detector, tmp_path, capsys
):
    from fedad.data.scaling import standardize
    from fedad.federated.families.autoencoder import AutoencoderScorer

    run_dir, _ = autoencoder_run
    folder, results, test_file = autoencoder_detector
    columns = list(compose(["dataset=nsl_kdd"]).dataset.columns)
    detector, table = assert_score_reproduces_run(
        folder, test_file, columns, results, tmp_path / "scores.csv"
    )
    assert "rows scored by federated_autoencoder (rule threshold)" in capsys.readouterr().out
    # The run's own threshold and the rule that chose it are the default, and only, rule.
    saved = rundir.read_json(run_dir / rundir.THRESHOLD_FILE)
    decision = detector.manifest["decision"]
    assert decision["default"] == "threshold" and list(decision["rules"]) == ["threshold"]
    assert decision["rules"]["threshold"]["threshold"] == saved["threshold"]
    assert decision["rules"]["threshold"]["chosen_by"] == saved["rule"]
    assert detector.manifest["model"]["kind"] == "autoencoder"
    assert not any(c.startswith("p_") for c in table.columns)
    assert (table["rule"] == "threshold").all() and (table["threshold"] == saved["threshold"]).all()
    np.testing.assert_array_equal(
        table["predicted"] == "attack", table["attack_score"] >= saved["threshold"]
    )
    # The attack score is the run's reconstruction error, bit for bit.
    frame = pd.read_csv(test_file, header=None, names=columns, nrows=300)
    with np.load(run_dir / rundir.SCALING_FILE) as stats:
        X = standardize(detector.preprocessor.transform(frame), stats["mean"], stats["std"])
    np.testing.assert_array_equal(
        detector.score(frame).attack_score, AutoencoderScorer(run_dir).predict_scores(X)
    )


@pytest.mark.slow
def test_the_autoencoder_has_no_probability_rule_and_says_why(autoencoder_detector, capsys):
    folder, _, test_file = autoencoder_detector
    err = _fails(capsys, str(folder), str(test_file), "--rule", "argmax")
    assert "no decision rule 'argmax'; it has: threshold" in err
    assert "anomaly score, not class probabilities" in err


@pytest.mark.slow
def test_the_service_answers_the_autoencoder_score_and_class(autoencoder_detector):
    from fastapi.testclient import TestClient

    from fedad.serve import create_app

    folder, _, test_file = autoencoder_detector
    detector = Detector.load(folder)
    columns = list(compose(["dataset=nsl_kdd"]).dataset.columns)
    frame = pd.read_csv(test_file, header=None, names=columns, nrows=20)
    records = frame[detector.features].to_dict("records")
    with TestClient(create_app(detector)) as client:
        answer = client.post("/score", json={"records": records}).json()
        schema = client.get("/schema").json()
    want = detector.score(frame)
    threshold = detector.rules["threshold"]["threshold"]
    assert answer["rule"] == "threshold" and answer["threshold"] == threshold
    assert "probabilities" not in answer
    np.testing.assert_allclose(answer["attack_score"], want.attack_score, rtol=1e-12)
    assert answer["predicted"] == [detector.class_names[c] for c in want.predicted]
    assert "reconstruction error" in schema["attack_score"]


@pytest.mark.slow
def test_the_autoencoder_exports_with_the_same_reconstructions(
    autoencoder_detector, capsys, tmp_path
):
    from fedad import export

    folder, _, _ = autoencoder_detector
    out = tmp_path / "autoencoder.tflite"
    export.main([str(folder), "--format", "tflite", "-o", str(out)])
    printed = capsys.readouterr().out
    assert out.is_file() and f"{out.stat().st_size / 1024:.1f} KB" in printed
    assert "on 2000 rows" in printed
    assert "its reconstruction errors match the Keras model's within 1e-05 (relative" in printed
