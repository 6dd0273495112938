"""Outputs never clobber: score, export and report refuse their inputs and keep earlier files."""

from __future__ import annotations

import os
import resource
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pandas as pd
import pytest
from detector_helpers import raw_rows, synthetic_run
from test_report import make_run

from fedad import export, rundir, score
from fedad.detector import Detector
from fedad.report.__main__ import main as report_main

MODELS = {
    "logistic_regression": {"C": 1.0, "max_iter": 1000, "class_weight": "balanced"},
    "central_logistic": {"model": "logistic"},
}
OLD = "an earlier file, to be kept\n"
# File writes beyond this many bytes fail (EFBIG), as on a full disk.
WRITE_LIMIT = 2048


@pytest.fixture(scope="module")
def detectors(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("run")
    synthetic_run(run_dir, MODELS)
    return run_dir / rundir.DETECTOR_DIR


@pytest.fixture()
def rows(tmp_path) -> Path:
    source = tmp_path / "rows.csv"
    raw_rows(200).to_csv(source, index=False)
    return source


@pytest.fixture()
def locked(tmp_path) -> Iterator[Path]:
    """A folder without write permission; skipped where this user writes there anyway (root)."""
    folder = tmp_path / "locked"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        (folder / "probe").touch()
    except PermissionError:
        yield folder
    else:
        pytest.skip(f"user {os.geteuid()} writes into read-only folders: the check needs another")
    finally:
        folder.chmod(0o700)


def _fails(main, capsys, *argv: object) -> str:
    with pytest.raises(SystemExit) as ended:
        main([str(a) for a in argv])
    assert ended.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("fedad: error: ") and "Traceback" not in err
    assert "\n\n" not in err.strip()
    return " ".join(err.split())


def _leftovers(folder: Path) -> list[str]:
    """Temporary files or folders a write left behind (their names start with a dot)."""
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


@contextmanager
def _writes_fail_beyond(limit: int) -> Iterator[None]:
    """Any file this process writes fails past ``limit`` bytes (EFBIG), as a disk that fills up.

    Python ignores SIGXFSZ, so the write raises OSError instead of ending the process.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))


# --- score -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "spelling",
    [
        lambda source: source,
        lambda source: source.parent / "." / ".." / source.parent.name / source.name,
        lambda source: _hard_link(source),
        lambda source: _symlink(source),
    ],
    ids=["same path", "another spelling", "hard link", "symbolic link"],
)
@pytest.mark.parametrize("overwrite", [[], ["--overwrite"]], ids=["", "overwrite"])
def test_score_refuses_to_write_over_its_input(detectors, rows, capsys, spelling, overwrite):
    before = rows.read_bytes()
    out = spelling(rows)
    folder = detectors / "logistic_regression"
    err = _fails(score.main, capsys, folder, rows, "-o", out, *overwrite)
    assert f"Cannot write the scores to {out}: it is the input {rows}" in err
    assert rows.read_bytes() == before
    assert _leftovers(rows.parent) == []


def _hard_link(source: Path) -> Path:
    alias = source.with_name("alias.csv")
    os.link(source, alias)
    return alias


def _symlink(source: Path) -> Path:
    alias = source.with_name("link.csv")
    alias.symlink_to(source)
    return alias


def test_score_refuses_to_write_over_a_file_of_its_detector(detectors, rows, capsys, tmp_path):
    folder = tmp_path / "detector"
    folder.symlink_to(detectors / "logistic_regression", target_is_directory=True)
    model = folder / rundir.DETECTOR_SKOPS
    before = model.read_bytes()
    err = _fails(score.main, capsys, folder, rows, "-o", model, "--overwrite")
    assert "it is the input" in err and model.read_bytes() == before
    Detector.load(folder)  # its checksums still hold


def test_score_keeps_an_existing_output_unless_told_to_overwrite(detectors, rows, capsys):
    out = rows.with_name("scores.csv")
    out.write_text(OLD)
    folder = detectors / "logistic_regression"
    err = _fails(score.main, capsys, folder, rows, "-o", out)
    assert "it already exists and was left as it is; give --overwrite" in err
    assert out.read_text() == OLD
    score.main([str(folder), str(rows), "-o", str(out), "--overwrite"])
    assert len(pd.read_csv(out)) == 200
    assert _leftovers(rows.parent) == []


def test_score_keeps_an_existing_metrics_file_and_never_shares_one_with_the_scores(
    detectors, rows, capsys
):
    out, metrics = rows.with_name("scores.csv"), rows.with_name("metrics.json")
    metrics.write_text(OLD)
    folder = detectors / "logistic_regression"
    err = _fails(score.main, capsys, folder, rows, "-o", out, "--metrics-json", metrics)
    assert "Cannot write the metrics to" in err and "already exists" in err
    # Refused before any row was scored: no scores either.
    assert metrics.read_text() == OLD and not out.exists()
    err = _fails(score.main, capsys, folder, rows, "-o", out, "--metrics-json", out)
    assert "--metrics-json and -o both name" in err and not out.exists()
    argv = [folder, rows, "-o", out, "--metrics-json", metrics, "--overwrite"]
    score.main([str(a) for a in argv])
    assert "macro_f1" in rundir.read_object(metrics) and len(pd.read_csv(out)) == 200


def test_score_names_a_missing_output_folder(detectors, rows, capsys):
    out = rows.parent / "no-such-folder" / "scores.csv"
    err = _fails(score.main, capsys, detectors / "logistic_regression", rows, "-o", out)
    assert f"there is no folder {out.parent}; create it first" in err


def test_score_names_an_unwritable_output_folder(detectors, rows, capsys, locked):
    out = locked / "scores.csv"
    err = _fails(score.main, capsys, detectors / "logistic_regression", rows, "-o", out)
    assert f"the folder {locked} is not writable" in err and not out.exists()


def test_a_write_that_fails_midway_keeps_the_earlier_scores(detectors, rows, capsys):
    out = rows.with_name("scores.csv")
    out.write_text(OLD)
    folder = detectors / "logistic_regression"
    with _writes_fail_beyond(WRITE_LIMIT):
        err = _fails(score.main, capsys, folder, rows, "-o", out, "--overwrite")
    assert f"Writing {out} failed: File too large (EFBIG)" in err
    assert f"Nothing was replaced: {out} kept its earlier content" in err
    assert out.read_text() == OLD
    assert _leftovers(rows.parent) == []


# --- export ----------------------------------------------------------------------------------


def test_export_refuses_a_name_without_the_format_suffix(detectors, rows, capsys, tmp_path):
    out = tmp_path / "model.bin"
    folder = detectors / "central_logistic"
    err = _fails(export.main, capsys, folder, "--rows", rows, "-o", out)
    assert "must end in .tflite" in err and "nothing was written" in err
    assert not out.exists() and not (tmp_path / "model.bin.tflite").exists()


def test_export_refuses_to_write_over_a_file_of_its_detector(detectors, rows, capsys, tmp_path):
    folder = detectors / "central_logistic"
    out = tmp_path / "model.tflite"
    os.link(folder / rundir.DETECTOR_KERAS, out)
    err = _fails(export.main, capsys, folder, "--rows", rows, "-o", out, "--overwrite")
    assert f"it is the input {folder / rundir.DETECTOR_KERAS}" in err
    Detector.load(folder)  # its checksums still hold


def test_export_keeps_an_existing_file_unless_told_to_overwrite(detectors, rows, capsys, tmp_path):
    out = tmp_path / "model.tflite"
    out.write_text(OLD)
    folder = detectors / "central_logistic"
    err = _fails(export.main, capsys, folder, "--rows", rows, "-o", out)
    assert "it already exists and was left as it is" in err and out.read_text() == OLD
    export.main([str(folder), "--rows", str(rows), "-o", str(out), "--overwrite"])
    assert "its scores match the Keras model's" in capsys.readouterr().out
    assert out.read_bytes() != OLD.encode() and out.stat().st_size > 0
    assert _leftovers(tmp_path) == []


def test_export_names_a_missing_output_folder(detectors, rows, capsys, tmp_path):
    out = tmp_path / "gone" / "model.tflite"
    err = _fails(export.main, capsys, detectors / "central_logistic", "--rows", rows, "-o", out)
    assert f"there is no folder {out.parent}" in err


def test_onnx_without_its_extra_names_the_pip_install(
    detectors, rows, capsys, tmp_path, monkeypatch
):
    for module in export.ONNX_MODULES:
        # Hidden where installed: Python's import system then finds no such module.
        monkeypatch.setitem(sys.modules, module, None)
    out = tmp_path / "model.onnx"
    err = _fails(export.main, capsys, detectors / "central_logistic", "--format", "onnx", "-o", out)
    assert "pip install 'fedad[edge]'" in err and "tf2onnx" in err and not out.exists()


# --- report ----------------------------------------------------------------------------------


@pytest.fixture()
def sweep(tmp_path) -> Path:
    for strategy in ("fedavg", "fedprox"):
        make_run(
            tmp_path / "sweep" / strategy,
            [f"strategy={strategy}"],
            {"strategy": strategy},
            {"federated_cnn": (0.8, "federated"), "central_cnn": (0.9, "supervised")},
        )
    return tmp_path / "sweep"


def test_report_keeps_an_earlier_report_unless_told_to_overwrite(sweep, capsys):
    report_main([str(sweep)])
    page = sweep / "report.md"
    page.write_text(OLD)
    (sweep / "summary.csv").write_text(OLD)
    err = _fails(report_main, capsys, sweep)
    assert f"{sweep} already holds a report (report.md), left as it is" in err
    assert page.read_text() == OLD and (sweep / "summary.csv").read_text() == OLD
    report_main([str(sweep), "--overwrite"])
    assert page.read_text().startswith("#") and (sweep / "summary.csv").read_text() != OLD
    assert _leftovers(sweep) == []


def test_report_refuses_to_replace_any_file_of_an_earlier_report(sweep, capsys, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "summary.csv").write_text(OLD)
    err = _fails(report_main, capsys, sweep, "--out", out)
    assert "already holds a report (summary.csv)" in err
    # Nothing of the new report was moved in beside the earlier file.
    assert sorted(p.name for p in out.iterdir()) == ["summary.csv"]


def test_report_names_an_output_that_is_a_file(sweep, capsys, tmp_path):
    out = tmp_path / "report.txt"
    out.write_text(OLD)
    err = _fails(report_main, capsys, sweep, "--out", out)
    assert f"Cannot write the report to {out}: it is a file" in err and out.read_text() == OLD


def test_report_names_an_unwritable_output_folder(sweep, capsys, locked):
    err = _fails(report_main, capsys, sweep, "--out", locked)
    assert f"Cannot write the report to {locked}: Permission denied" in err
    assert list(locked.iterdir()) == []


def test_export_names_an_unwritable_output_folder(detectors, rows, capsys, locked):
    out = locked / "model.tflite"
    err = _fails(export.main, capsys, detectors / "central_logistic", "--rows", rows, "-o", out)
    assert f"the folder {locked} is not writable" in err and not out.exists()


def test_a_report_that_fails_midway_keeps_the_earlier_one(sweep, capsys):
    report_main([str(sweep)])
    before = {p.name: p.read_bytes() for p in sweep.iterdir() if p.is_file()}
    with _writes_fail_beyond(WRITE_LIMIT):
        err = _fails(report_main, capsys, sweep, "--overwrite")
    assert f"Writing the report to {sweep} failed: File too large" in err
    assert {p.name: p.read_bytes() for p in sweep.iterdir() if p.is_file()} == before
    assert _leftovers(sweep) == []
