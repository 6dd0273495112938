"""Bad input ends with one clear paragraph naming the problem and the fix."""

from __future__ import annotations

import gzip
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fedad.errors import FedadError
from fedad.simulate import run

REPO = Path(__file__).resolve().parents[1]


def _csv(tmp_path, text, name="data.csv"):
    path = tmp_path / name
    path.write_text(text)
    return path


def _rows(n, label=lambda i: "normal" if i % 3 else "attack"):
    return "a,b,proto,label\n" + "".join(f"{i},{i % 7},tcp,{label(i)}\n" for i in range(n))


def _run_csv(make_cfg, tmp_path, path, *extra):
    cfg = make_cfg(
        "dataset=csv", f"dataset.path={path}", "federated=false", "baselines=none", *extra
    )
    return run(cfg, tmp_path / "run")


def test_missing_file_names_path_key_and_source(make_cfg, tmp_path):
    cfg = make_cfg("dataset=nsl_kdd", f"data_dir={tmp_path}", "federated=false")
    with pytest.raises(FedadError) as err:
        run(cfg, tmp_path / "run")
    text = str(err.value)
    assert str(tmp_path / "nsl_kdd" / "KDDTrain+_20Percent.txt.gz") in text
    assert "dataset.train_file" in text and "FEDAD_DATA_DIR" in text and "unb.ca" in text


def test_missing_label_column_lists_the_columns(make_cfg, tmp_path):
    path = _csv(tmp_path, _rows(50))
    with pytest.raises(FedadError, match=r"'verdict'.*Columns found: a, b, proto, label"):
        _run_csv(make_cfg, tmp_path, path, "dataset.label_column=verdict")


def test_wrong_delimiter_is_named(make_cfg, tmp_path):
    path = _csv(tmp_path, _rows(50).replace(",", ";"))
    with pytest.raises(FedadError, match="dataset.sep"):
        _run_csv(make_cfg, tmp_path, path)


def test_empty_file(make_cfg, tmp_path):
    path = _csv(tmp_path, "")
    with pytest.raises(FedadError, match="is empty"):
        _run_csv(make_cfg, tmp_path, path)


def test_header_only_file(make_cfg, tmp_path):
    path = _csv(tmp_path, "a,b,label\n")
    with pytest.raises(FedadError, match="no data rows"):
        _run_csv(make_cfg, tmp_path, path)


def test_malformed_row_is_reported_with_its_line(make_cfg, tmp_path):
    path = _csv(tmp_path, _rows(30) + "1,2,tcp,normal,EXTRA,FIELDS\n")
    with pytest.raises(FedadError, match=r"could not be read as CSV.*line 32"):
        _run_csv(make_cfg, tmp_path, path)


def test_corrupted_gzip(make_cfg, tmp_path):
    path = tmp_path / "data.csv.gz"
    path.write_bytes(gzip.compress(_rows(200).encode())[:60])
    with pytest.raises(FedadError, match="truncated or corrupted"):
        _run_csv(make_cfg, tmp_path, path)


def test_single_class(make_cfg, tmp_path):
    path = _csv(tmp_path, _rows(50, label=lambda i: "normal"))
    with pytest.raises(FedadError, match="single class"):
        _run_csv(make_cfg, tmp_path, path)


def test_more_clients_than_rows(make_cfg, tmp_path):
    path = _csv(tmp_path, _rows(40))
    with pytest.raises(FedadError, match="num_clients=100 is more than the 32 training rows"):
        _run_csv(make_cfg, tmp_path, path, "simulation.num_clients=100")


def test_alpha_must_be_positive(make_cfg, tmp_path):
    cfg = make_cfg("dataset.n_rows=500", "partition.alpha=0", "federated=false", "baselines=none")
    with pytest.raises(FedadError, match=r"partition.alpha must be a number > 0, got 0\."):
        run(cfg, tmp_path / "run")


def test_test_file_with_other_columns(make_cfg, tmp_path):
    train = _csv(tmp_path, _rows(50), "train.csv")
    test = _csv(tmp_path, _rows(20).replace("a,b,", "a,c,"), "test.csv")
    cfg = make_cfg(
        "dataset=csv",
        f"dataset.train_file={train}",
        f"dataset.test_file={test}",
        "federated=false",
        "baselines=none",
    )
    with pytest.raises(FedadError, match=r"missing from test \['b'\], only in test \['c'\]"):
        run(cfg, tmp_path / "run")


def _cli(*args, cwd):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-m", "fedad.simulate", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.parametrize(
    "override, expected",
    [
        (
            "dataset=kdd99",
            "Unknown dataset option 'kdd99'. Available: cic_ids2017, ciciot2023, csv",
        ),
        ("partition=random", "Unknown partition option 'random'. Available: by_source, dirichlet"),
    ],
)
def test_unknown_names_list_the_valid_ones(tmp_path, override, expected):
    done = _cli(override, cwd=tmp_path)
    assert done.returncode == 2
    assert expected in done.stderr and "Traceback" not in done.stderr


def test_cli_user_error_is_one_paragraph_and_exit_2(tmp_path):
    done = _cli("dataset=nsl_kdd", f"data_dir={tmp_path}", cwd=tmp_path)
    assert done.returncode == 2
    assert done.stderr.startswith("fedad: error: Data file not found")
    assert "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) <= 6
