"""Scoring checks what it is given: labels, a file's fit to the schema, value ranges, damage."""

from __future__ import annotations

import bz2
import gzip
import logging
import lzma
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from detector_helpers import ROWS, raw_rows, synthetic_run

from fedad import rundir, score
from fedad.baselines.runner import run_baselines
from fedad.config import compose
from fedad.data.synthetic import generate
from fedad.detector import Detector
from fedad.detector.build import write_detector
from fedad.federated.checkpoint import data_fingerprint
from fedad.run.pipeline import prepare_run

LOGISTIC = {"logistic_regression": {"C": 1.0, "max_iter": 1000, "class_weight": "balanced"}}


@pytest.fixture(scope="module")
def binary(tmp_path_factory) -> Path:
    """A binary detector of the synthetic dataset (a header row; attacks have no recorded names)."""
    run_dir = tmp_path_factory.mktemp("binary")
    synthetic_run(run_dir, LOGISTIC)
    return run_dir / rundir.DETECTOR_DIR / "logistic_regression"


@pytest.fixture(scope="module")
def headerless(tmp_path_factory) -> Path:
    """A multiclass detector trained on a CSV file without a header row, read by position."""
    root = tmp_path_factory.mktemp("headerless")
    frame = generate(n_rows=ROWS, seed=0)
    frame.to_csv(root / "flows.csv", header=False, index=False)
    return _detector(
        root,
        [
            "dataset.header=false",
            f"dataset.columns=[{','.join(frame.columns)}]",
            "dataset.label_column=attack_type",
            "dataset.drop_columns=[site,device,is_attack]",
            "task=multiclass",
        ],
    )


@pytest.fixture(scope="module")
def flagged(tmp_path_factory) -> Path:
    """A binary detector whose label is a 0/1 flag (normal value 0), from a CSV with a header."""
    root = tmp_path_factory.mktemp("flagged")
    generate(n_rows=ROWS, seed=0).to_csv(root / "flows.csv", index=False)
    return _detector(
        root,
        [
            "dataset.label_column=is_attack",
            "dataset.normal_value=0",
            "dataset.drop_columns=[site,device,attack_type]",
            "task=binary",
        ],
    )


def _detector(root: Path, overrides: list[str]) -> Path:
    """Train a logistic regression on ``root/flows.csv`` and write its detector folder."""
    cfg = compose(
        [
            "dataset=csv",
            f"data_dir={root}",
            "dataset.path=flows.csv",
            "dataset.categorical_columns=[protocol,service]",
            "simulation.num_clients=2",
            *overrides,
        ]
    )
    run = prepare_run(cfg, root)
    (result,) = run_baselines(
        {"models": LOGISTIC},
        run.data,
        cfg.train,
        keras_epochs=1,
        seed=0,
        model_cfgs={},
        validate=False,
        target_fpr=None,
    )
    write_detector(cfg, run.data, data_fingerprint(run.data, run.parts), result, root)
    return root / rundir.DETECTOR_DIR / "logistic_regression"


def _fails(capsys, *argv: object) -> str:
    with pytest.raises(SystemExit) as ended:
        score.main([str(a) for a in argv])
    assert ended.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("fedad: error: ") and "Traceback" not in err
    return " ".join(err.split())


def _headerless_file(path: Path, frame: pd.DataFrame) -> Path:
    frame.to_csv(path, header=False, index=False)
    return path


# --- labels ----------------------------------------------------------------------------------


def test_labels_the_detector_does_not_know_are_counted_and_left_out(
    headerless, tmp_path, caplog, capsys
):
    frame = raw_rows(200)
    frame.loc[:29, "attack_type"] = "brand_new_attack"
    frame.loc[30:34, "attack_type"] = "another_one"
    source = _headerless_file(tmp_path / "rows.csv", frame)
    out = tmp_path / "scores.csv"
    with caplog.at_level(logging.WARNING, logger="fedad"):
        score.main([str(headerless), str(source), "-o", str(out)])
    assert (
        "35 labelled row(s) of " in caplog.text
        and "'brand_new_attack' (30), 'another_one' (5); they are left out of the metrics"
        in caplog.text
    )
    table = pd.read_csv(out, keep_default_na=False)
    assert (table["true_class"][:35] == "").all() and (table["true_class"][35:] != "").all()
    assert "metrics on 165 labelled rows" in capsys.readouterr().out


def test_a_file_whose_labels_the_detector_never_knew_is_refused(headerless, tmp_path, capsys):
    frame = raw_rows(200)
    frame["attack_type"] = np.where(frame["attack_type"] == "normal", "BENIGN", "DDoS")
    source = _headerless_file(tmp_path / "rows.csv", frame)
    out = tmp_path / "scores.csv"
    err = _fails(capsys, headerless, source, "-o", out)
    assert "None of the 200 labels in column 'attack_type'" in err
    assert "It knows the classes normal, " in err and "nothing was written" in err
    assert not out.exists() and list(tmp_path.iterdir()) == [source]


def test_a_flag_label_refuses_words_and_counts_other_values_as_attacks(flagged, tmp_path, capsys):
    frame = raw_rows(100)
    frame["is_attack"] = np.where(frame["is_attack"] == 1, "DDoS", "BENIGN")
    source = tmp_path / "words.csv"
    frame.to_csv(source, index=False)
    err = _fails(capsys, flagged, source, "-o", tmp_path / "scores.csv")
    assert "None of the 100 labels in column 'is_attack'" in err
    assert "the normal value '0' and, for attacks, any other number" in err
    frame["is_attack"] = raw_rows(100)["is_attack"].astype(str)
    frame.loc[:9, "is_attack"] = "yes"
    frame.to_csv(source, index=False)
    summary = score.score_file(Detector.load(flagged), source, tmp_path / "scores.csv")
    (warning,) = summary["warnings"]
    assert "10 labelled row(s)" in warning and "'yes' (10); they count as attacks" in warning
    assert summary["labelled_rows"] == 100


def test_labels_without_the_normal_value_are_warned_about(binary, tmp_path, caplog):
    frame = raw_rows(100)
    frame["attack_type"] = np.where(frame["attack_type"] == "normal", "BENIGN", "DDoS")
    source = tmp_path / "rows.csv"
    frame.to_csv(source, index=False)
    with caplog.at_level(logging.WARNING, logger="fedad"):
        summary = score.score_file(Detector.load(binary), source, tmp_path / "scores.csv")
    (warning,) = summary["warnings"]
    assert "No labelled row of" in warning and "normal value 'normal'" in warning
    assert "'DDoS' (" in warning and "'BENIGN' (" in warning
    assert summary["labelled_rows"] == 100


def test_known_labels_draw_no_warning(binary, tmp_path):
    source = tmp_path / "rows.csv"
    raw_rows(100).to_csv(source, index=False)
    summary = score.score_file(Detector.load(binary), source, tmp_path / "scores.csv")
    assert summary["warnings"] == [] and summary["labelled_rows"] == 100


# --- a file that does not fit the schema -----------------------------------------------------


def test_a_headerless_file_of_another_dataset_is_refused(headerless, tmp_path, capsys):
    width = len(raw_rows(1).columns)
    rng = np.random.default_rng(0)
    other = pd.DataFrame(rng.normal(size=(50, width)).round(3))  # as many fields, all numbers
    source = _headerless_file(tmp_path / "other.csv", other)
    out = tmp_path / "scores.csv"
    err = _fails(capsys, headerless, source, "-o", out)
    assert "has no header row, so its fields are read in the training file's order" in err
    assert "'protocol' should hold one of" in err and "'service' should hold one of" in err
    assert "another dataset" in err and not out.exists()


def test_a_headerless_file_with_columns_out_of_order_is_refused(headerless, tmp_path, capsys):
    frame = raw_rows(50)
    columns = list(frame.columns)
    # Text where numbers belong: the categories moved into the first numeric fields.
    swapped = frame[[*columns[:2], *columns[4:6], *columns[2:4], *columns[6:]]]
    err = _fails(capsys, headerless, _headerless_file(tmp_path / "rows.csv", swapped))
    assert "'duration' should hold numbers but holds" in err


def test_a_file_without_the_header_its_detector_needs_is_named_as_such(binary, tmp_path, capsys):
    source = _headerless_file(tmp_path / "rows.csv", raw_rows(20))
    err = _fails(capsys, binary, source)
    assert "has no header row (its first row looks like data" in err
    assert "add a first row naming the columns" in err


# --- values outside the training range -------------------------------------------------------


def test_values_outside_the_training_range_are_counted_and_warned_about(binary, tmp_path):
    frame = raw_rows(100)
    frame.loc[[3, 7], "duration"] = 1e300
    frame.loc[5, "fwd_bytes"] = -1e300
    source = tmp_path / "rows.csv"
    frame.to_csv(source, index=False)
    detector = Detector.load(binary)
    summary = score.score_file(detector, source, tmp_path / "scores.csv")
    assert summary["beyond_training"] == {"duration": 2, "fwd_bytes": 1}
    (warning,) = summary["warnings"]
    n_train = detector.manifest["data"]["n_train"]
    assert f"3 cell(s) lie outside the range of the detector's {n_train} training rows" in warning
    assert "'duration' (2), 'fwd_bytes' (1)" in warning
    assert len(pd.read_csv(tmp_path / "scores.csv")) == 100  # scored, not refused


def test_the_training_rows_lie_within_the_reach_the_check_uses(binary):
    detector = Detector.load(binary)
    train = generate(n_rows=ROWS, seed=0)
    scored = detector.score(train[detector.features])
    assert scored.beyond_training == {}


# --- damaged compressed files ----------------------------------------------------------------


def _csv_bytes() -> bytes:
    return raw_rows(300).to_csv(index=False).encode()


@pytest.mark.parametrize(
    ("suffix", "content", "kind"),
    [
        (".gz", lambda: gzip.compress(_csv_bytes())[:400], "gzip"),
        (".gz", lambda: b"plain text, not gzip\n" * 20, "gzip"),
        (".bz2", lambda: bz2.compress(_csv_bytes())[:400], "bzip2"),
        (".xz", lambda: b"\xfd7zXZ\x00" + b"garbage" * 40, "xz"),
        (".zip", lambda: b"PK\x03\x04" + b"garbage" * 40, "zip"),
    ],
    ids=["truncated gzip", "not gzip", "truncated bzip2", "garbage xz", "garbage zip"],
)
def test_a_damaged_compressed_file_ends_in_one_paragraph(
    binary, tmp_path, capsys, suffix, content, kind
):
    source = tmp_path / f"rows.csv{suffix}"
    source.write_bytes(content())
    out = tmp_path / "scores.csv"
    err = _fails(capsys, binary, source, "-o", out)
    assert f"Input file {source} could not be decompressed as {kind}" in err
    assert "truncated or damaged" in err and not out.exists()


def test_a_gzip_file_cut_after_its_first_rows_writes_nothing(binary, tmp_path, capsys):
    data = gzip.compress(raw_rows(2000).to_csv(index=False).encode())
    source = tmp_path / "rows.csv.gz"
    source.write_bytes(data[: len(data) // 2])
    out = tmp_path / "scores.csv"
    err = _fails(capsys, binary, source, "-o", out, "--overwrite")
    assert "could not be decompressed as gzip" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == [source.name]


def test_an_intact_gzip_file_scores_as_the_plain_one(binary, tmp_path):
    frame = raw_rows(100)
    plain, packed = tmp_path / "rows.csv", tmp_path / "rows.csv.gz"
    frame.to_csv(plain, index=False)
    packed.write_bytes(gzip.compress(plain.read_bytes()))
    detector = Detector.load(binary)
    score.score_file(detector, plain, tmp_path / "a.csv")
    score.score_file(detector, packed, tmp_path / "b.csv")
    assert (tmp_path / "a.csv").read_bytes() == (tmp_path / "b.csv").read_bytes()


def test_an_intact_xz_file_scores(binary, tmp_path):
    source = tmp_path / "rows.csv.xz"
    source.write_bytes(lzma.compress(_csv_bytes()))
    summary = score.score_file(Detector.load(binary), source, tmp_path / "scores.csv")
    assert summary["rows"] == 300
