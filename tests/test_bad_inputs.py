"""Bad inputs through the public entry points: a clear paragraph, exit 2, nothing earlier lost.

Most cases run ``python -m fedad.simulate`` (or ``python -m fedad.report``) as a subprocess
in ``tmp_path``, as a user would, and check, for a user error:

* the exit status is 2 (Hydra's own config errors: non-zero, with the valid options listed);
* stderr holds one short paragraph starting ``fedad: error:`` that names the offending key,
  value or path and the fix, and no ``Traceback`` (TensorFlow's native start-up lines, printed
  when a run gets as far as importing it, are tolerated);
* nothing written before is lost: a sibling run directory, and a file the user left in the
  failing run's own directory, are byte-identical afterwards;
* the failing run records the same message in its own ``failed.json``.

Some bad inputs are recovered from by design, not refused: NaN, ±inf and text in numeric
cells become the training median, rows with an empty label (the cut-off last line of a
truncated file) are dropped, categories unseen in training encode as zeros, and the report
lists a job with an unreadable ``results.json`` as failed. For those the command must
succeed and count the recovery (``results.json`` under ``data``, or ``report.md``). Input
that is read, but may not mean what the user thinks (labels spelt almost like the normal
value, numbers written as text, a header that looks like data), is read as documented, and
the run logs a warning naming what it noticed and keeps it in ``results.json``
(``data.warnings``).

A last group checks more data-layer messages in process through :func:`fedad.simulate.run`,
which saves a process start each. The in-process twins of a few cases live in
``tests/test_errors.py``.
"""

from __future__ import annotations

import gzip
import json
import os
import re
import subprocess
import sys
import threading
import zlib
from pathlib import Path

import pytest

from fedad.config import available_options
from fedad.data.prepare import prepare
from fedad.errors import FedadError, exit_with
from fedad.simulate import run

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"
HEADER = "a,b,proto,label"
# What TensorFlow's C++ side prints on import, before Python's logging is set up (absl and
# glog-style lines such as "I0000 00:00:1795874151.94 27510 port.cc:153] oneDNN ...").
TF_NOISE = re.compile(r"WARNING: All log messages before absl::InitializeLog\(\)|[IWE]\d{4} ")
# A small CSV run: no federated training and no baselines, so a case costs one process start.
LIGHT = ("federated=false", "baselines=none", "partition=iid", "simulation.num_clients=2")
# One quick model, for the cases that check what the comparison table says.
ONE_MODEL = ("+baselines.models.logistic_regression={C:1.0}",)


# --- helpers -------------------------------------------------------------------------------


def _rows(n: int, start: int = 0, label=None, proto=None) -> str:
    """``n`` distinct data lines of the 4-column toy schema, one attack in three."""
    label = label or (lambda i: "normal" if i % 3 else "attack")
    proto = proto or (lambda i: "tcp" if i % 2 else "udp")
    return "".join(f"{i},{i % 7},{proto(i)},{label(i)}\n" for i in range(start, start + n))


def _write(tmp_path: Path, text: str, name: str = "data.csv") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def _good_csv(tmp_path: Path, n: int = 150, name: str = "data.csv") -> Path:
    return _write(tmp_path, HEADER + "\n" + _rows(n), name)


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("HYDRA_FULL_ERROR", "FEDAD_DATA_DIR")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


def _module(module: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=cwd,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )


def _run_dir(tmp_path: Path) -> Path:
    return tmp_path / "outputs" / "bad"


def _simulate(tmp_path: Path, *overrides: str, run_dir: Path | None = None):
    run_dir = run_dir or _run_dir(tmp_path)
    return _module("fedad.simulate", f"hydra.run.dir={run_dir}", *overrides, cwd=tmp_path)


def _csv_run(tmp_path: Path, path: Path, *overrides: str, run_dir: Path | None = None):
    return _simulate(
        tmp_path, "dataset=csv", f"dataset.path={path}", *LIGHT, *overrides, run_dir=run_dir
    )


@pytest.fixture()
def earlier(tmp_path: Path) -> dict[Path, bytes]:
    """Outputs that exist before the bad run: a finished sibling run and a user's note.

    Returns their bytes by path, for :func:`_assert_untouched`.
    """
    sibling = tmp_path / "outputs" / "earlier"
    sibling.mkdir(parents=True)
    (sibling / "results.json").write_text(
        json.dumps({"status": "done", "settings": {"dataset": "synthetic"}, "models": {}})
    )
    (sibling / "comparison.csv").write_text("model,macro_f1\nxgboost,0.97\n")
    own = _run_dir(tmp_path)
    own.mkdir(parents=True)
    (own / "NOTES.txt").write_text("the user's own file; a failing run must not delete it\n")
    return {p: p.read_bytes() for p in [*sibling.iterdir(), own / "NOTES.txt"]}


def _assert_untouched(before: dict[Path, bytes]) -> None:
    for path, content in before.items():
        assert path.is_file(), f"{path} was deleted"
        assert path.read_bytes() == content, f"{path} was overwritten"


def _without_tf_startup(stderr: str) -> str:
    """``stderr`` less TensorFlow's native start-up lines, printed whenever it is imported."""
    return "".join(line for line in stderr.splitlines(keepends=True) if not TF_NOISE.match(line))


def _error_paragraph(done: subprocess.CompletedProcess) -> str:
    """The ``fedad: error:`` paragraph, after checking it is all stderr says, bar TF's lines."""
    assert done.returncode == 2, (done.returncode, done.stderr[-3000:])
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    paragraph = _without_tf_startup(done.stderr).rstrip()
    assert paragraph.startswith("fedad: error:"), done.stderr[-3000:]
    lines = paragraph.splitlines()
    assert len(lines) <= 8 and all(line.strip() for line in lines), paragraph
    return " ".join(paragraph.split())


def _squeeze(text: str) -> str:
    """``text`` without any whitespace: the wrapping of stderr may split a path at a hyphen."""
    return "".join(text.split())


def _assert_names(text: str, words: tuple[str, ...]) -> None:
    for word in words:
        assert _squeeze(word) in _squeeze(text), f"{word!r} missing from: {text}"


def _assert_user_error(
    done: subprocess.CompletedProcess,
    words: tuple[str, ...],
    earlier: dict[Path, bytes],
    run_dir: Path,
) -> str:
    """Exit 2, one paragraph naming ``words``, the error recorded, nothing earlier lost."""
    text = _error_paragraph(done)
    _assert_names(text, words)
    failed = json.loads((run_dir / "failed.json").read_text())
    assert failed["status"] == "failed"
    assert _squeeze(failed["error"]) == _squeeze(text.removeprefix("fedad: error: "))
    _assert_untouched(earlier)
    return text


def _assert_refused_before_start(
    done: subprocess.CompletedProcess,
    words: tuple[str, ...],
    earlier: dict[Path, bytes],
    run_dir: Path,
) -> str:
    """Exit 2, one paragraph naming ``words``, refused before the run began: nothing written."""
    text = _error_paragraph(done)
    _assert_names(text, words)
    assert not (run_dir / "results.json").exists() and not (run_dir / "failed.json").exists()
    _assert_untouched(earlier)
    return text


def _assert_unknown_option(done, group: str, bad: str, earlier: dict[Path, bytes]) -> None:
    """An unknown config group option: one paragraph listing every valid option."""
    text = _error_paragraph(done)
    _assert_names(text, (f"Unknown {group} option '{bad}'", "Available:"))
    for option in available_options(group):
        assert option in text, f"option {option} not listed"
    _assert_untouched(earlier)


def _results(run_dir: Path) -> dict:
    return json.loads((run_dir / "results.json").read_text())


def _assert_recovered(done: subprocess.CompletedProcess, earlier, run_dir: Path) -> dict:
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    results = _results(run_dir)
    assert results["status"] == "done"
    _assert_untouched(earlier)
    return results["data"]


def _assert_warned(done, earlier, run_dir: Path, words: tuple[str, ...]) -> dict:
    """The run succeeded, and logged and kept a warning naming each of ``words``."""
    data = _assert_recovered(done, earlier, run_dir)
    _assert_names(done.stdout, words)
    _assert_names(" ".join(data["warnings"]), words)
    return data


def _unwritable_dir(tmp_path: Path) -> Path:
    """A folder no process can create: under a read-only folder, or, as root, under a file."""
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        (locked / "probe").mkdir()
    except OSError:
        return locked / "run"
    # root ignores the mode bits; a path under a regular file fails for everyone.
    (locked / "probe").rmdir()
    locked.chmod(0o700)
    blocker = tmp_path / "a_file.txt"
    blocker.write_text("not a folder\n")
    return blocker / "run"


# --- the data file -------------------------------------------------------------------------


def test_malformed_row_with_extra_fields(tmp_path, earlier):
    path = _write(tmp_path, HEADER + "\n" + _rows(40) + "1,2,tcp,normal,EXTRA,FIELDS\n")
    done = _csv_run(tmp_path, path)
    _assert_user_error(
        done, (str(path), "line 42", "dataset.sep", "truncated"), earlier, _run_dir(tmp_path)
    )


def test_truncated_gzip(tmp_path, earlier):
    path = tmp_path / "data.csv.gz"
    path.write_bytes(gzip.compress((HEADER + "\n" + _rows(300)).encode())[:200])
    done = _csv_run(tmp_path, path)
    _assert_user_error(done, (str(path), "truncated or corrupted"), earlier, _run_dir(tmp_path))


def test_truncated_csv_drops_the_cut_row_and_counts_it(tmp_path, earlier):
    """A plain CSV cut mid-row: the short last row has no label, so it is dropped, counted."""
    path = _write(tmp_path, HEADER + "\n" + _rows(150) + "150,3")
    data = _assert_recovered(_csv_run(tmp_path, path), earlier, _run_dir(tmp_path))
    assert data["rows_without_label"] == 1
    assert data["n_train"] + data["n_test"] == 150


def test_wrong_delimiter(tmp_path, earlier):
    path = _write(tmp_path, (HEADER + "\n" + _rows(150)).replace(",", ";"))
    done = _csv_run(tmp_path, path)
    _assert_user_error(
        done, ("'label'", "Only one column", "dataset.sep"), earlier, _run_dir(tmp_path)
    )


def test_file_without_the_label_column(tmp_path, earlier):
    path = _write(tmp_path, "a,b,proto\n" + "".join(f"{i},{i % 7},tcp\n" for i in range(150)))
    done = _csv_run(tmp_path, path)
    _assert_user_error(
        done,
        ("'label'", "dataset.label_column", "Columns found: a, b, proto"),
        earlier,
        _run_dir(tmp_path),
    )


def test_a_preparation_error_ends_the_engine_started_beside_it(make_cfg, tmp_path):
    """With federated training on, Ray and the actors start while the data is read: the
    reader's error is the one raised, and neither Ray nor the thread that started it is left."""
    import ray

    path = _write(tmp_path, "a,b,proto\n" + "".join(f"{i},{i % 7},tcp\n" for i in range(150)))
    cfg = make_cfg(*_csv_cfg(path, "federated=true"))
    with pytest.raises(FedadError, match="dataset.label_column"):
        run(cfg, tmp_path / "run")
    assert not ray.is_initialized()
    assert not [t for t in threading.enumerate() if t.name == "fedad-engine-start"]


def test_label_with_one_class(tmp_path, earlier):
    path = _write(tmp_path, HEADER + "\n" + _rows(150, label=lambda i: "normal"))
    done = _csv_run(tmp_path, path)
    _assert_user_error(
        done,
        ("single class", "dataset.label_column='label'", "dataset.normal_value='normal'"),
        earlier,
        _run_dir(tmp_path),
    )


@pytest.mark.parametrize(
    "cells, counter, expected",
    [
        ({5: "", 8: "NaN", 11: "nan"}, "missing", 3),
        ({5: "inf", 8: "-inf"}, "infinite", 2),
        ({5: "abc", 8: "n/a?", 11: "0x1F!"}, "junk_text", 3),
    ],
    ids=["nan", "inf", "junk_text"],
)
def test_bad_numeric_cells_are_cleaned_and_counted(tmp_path, earlier, cells, counter, expected):
    lines = _rows(150).splitlines()
    for i, cell in cells.items():
        a, _, proto, label = lines[i].split(",")
        lines[i] = ",".join([a, cell, proto, label])
    path = _write(tmp_path, HEADER + "\n" + "\n".join(lines) + "\n")
    data = _assert_recovered(_csv_run(tmp_path, path), earlier, _run_dir(tmp_path))
    assert data["cleaned_cells"][counter] == expected
    assert sum(data["cleaned_cells"].values()) == expected


def test_empty_file(tmp_path, earlier):
    path = _write(tmp_path, "")
    done = _csv_run(tmp_path, path)
    _assert_user_error(done, (str(path), "is empty", "download"), earlier, _run_dir(tmp_path))


def test_header_only_file(tmp_path, earlier):
    path = _write(tmp_path, HEADER + "\n")
    done = _csv_run(tmp_path, path)
    _assert_user_error(done, (str(path), "no data rows"), earlier, _run_dir(tmp_path))


def test_all_duplicate_rows(tmp_path, earlier):
    text = HEADER + "\n" + "1,2,tcp,normal\n" * 100 + "3,4,udp,attack\n" * 50
    path = _write(tmp_path, text)
    done = _csv_run(tmp_path, path)
    _assert_user_error(
        done,
        ("2 usable rows", "148 exact duplicate rows", "preprocess.drop_duplicates=false"),
        earlier,
        _run_dir(tmp_path),
    )


def test_data_dir_that_does_not_exist(tmp_path, earlier):
    missing = tmp_path / "no_such_folder"
    done = _simulate(tmp_path, "dataset=nsl_kdd", f"data_dir={missing}", *LIGHT)
    _assert_user_error(
        done,
        (f"data_dir='{missing}'", "not an existing folder", "FEDAD_DATA_DIR", "unb.ca"),
        earlier,
        _run_dir(tmp_path),
    )


def test_a_data_error_is_all_that_stderr_says(tmp_path, earlier):
    done = _csv_run(tmp_path, _write(tmp_path, ""))
    _error_paragraph(done)
    assert done.stderr.startswith("fedad: error:"), done.stderr[:2000]


# --- train and test files ------------------------------------------------------------------


def _two_files(tmp_path: Path, test_text: str) -> tuple[str, ...]:
    train = _write(tmp_path, HEADER + "\n" + _rows(150), "train.csv")
    test = _write(tmp_path, test_text, "test.csv")
    return ("dataset=csv", f"dataset.train_file={train}", f"dataset.test_file={test}", *LIGHT)


def test_unseen_test_categories_encode_as_zeros_and_are_counted(tmp_path, earlier):
    sctp = _rows(40, start=1000, proto=lambda i: "sctp" if i % 8 == 0 else "tcp")
    done = _simulate(tmp_path, *_two_files(tmp_path, HEADER + "\n" + sctp))
    data = _assert_recovered(done, earlier, _run_dir(tmp_path))
    assert data["unseen_categories"] == {"proto": 5}
    assert data["n_test"] == 40


def test_test_file_with_other_columns(tmp_path, earlier):
    other = "a,c,proto,label\n" + _rows(40, start=1000)
    done = _simulate(tmp_path, *_two_files(tmp_path, other))
    _assert_user_error(
        done,
        ("test.csv", "train.csv", "missing from test ['b']", "only in test ['c']"),
        earlier,
        _run_dir(tmp_path),
    )


# --- labels and task -----------------------------------------------------------------------


def test_label_column_typo_suggests_the_right_name(tmp_path, earlier):
    done = _csv_run(tmp_path, _good_csv(tmp_path), "dataset.label_column=lable")
    _assert_user_error(
        done,
        ("'lable'", "dataset.label_column", "Did you mean 'label'?"),
        earlier,
        _run_dir(tmp_path),
    )


def test_multiclass_without_a_class_column(tmp_path, earlier):
    done = _csv_run(
        tmp_path, _good_csv(tmp_path), "task=multiclass", "dataset.class_column=attack_type"
    )
    text = _assert_user_error(
        done,
        ("task=multiclass", "dataset.class_column='attack_type'", "task=binary"),
        earlier,
        _run_dir(tmp_path),
    )
    assert "_attack" not in text, "internal columns leak into the message"


# --- partition and clients -----------------------------------------------------------------


def test_more_clients_than_rows(tmp_path, earlier):
    done = _csv_run(tmp_path, _good_csv(tmp_path), "simulation.num_clients=500")
    _assert_user_error(
        done,
        ("simulation.num_clients=500", "120 training rows", "fewer clients"),
        earlier,
        _run_dir(tmp_path),
    )


@pytest.mark.parametrize("clients", [0, -3])
def test_num_clients_below_one(tmp_path, earlier, clients):
    done = _csv_run(tmp_path, _good_csv(tmp_path), f"simulation.num_clients={clients}")
    _assert_refused_before_start(
        done,
        (f"simulation.num_clients must be a whole number >= 1, got {clients}",),
        earlier,
        _run_dir(tmp_path),
    )


@pytest.mark.parametrize("alpha", ["0", "-0.5"])
def test_dirichlet_alpha_not_positive(tmp_path, earlier, alpha):
    done = _csv_run(
        tmp_path, _good_csv(tmp_path), "partition=dirichlet", f"partition.alpha={alpha}"
    )
    _assert_refused_before_start(
        done,
        (f"partition.alpha must be a number > 0, got {alpha}",),
        earlier,
        _run_dir(tmp_path),
    )


def test_unknown_partition_name(tmp_path, earlier):
    """``partition.name`` set directly bypasses Hydra's group check; fedad names the choices."""
    done = _csv_run(tmp_path, _good_csv(tmp_path), "partition.name=random")
    _assert_refused_before_start(
        done,
        ("partition must be one of iid, dirichlet, pathological, quantity, natural", "'random'"),
        earlier,
        _run_dir(tmp_path),
    )


# --- federated settings (checked before Ray starts) ----------------------------------------


@pytest.mark.parametrize(
    "override, words",
    [
        (
            "simulation.fraction_train=0",
            ("simulation.fraction_train must be a number in (0, 1]", "got 0"),
        ),
        ("simulation.fraction_train=1.5", ("simulation.fraction_train", "got 1.5")),
        ("simulation.fraction_evaluate=-0.2", ("simulation.fraction_evaluate", "got -0.2")),
        ("simulation.num_rounds=0", ("simulation.num_rounds must be a whole number >= 1", "got 0")),
        ("simulation.client_failure_rate=1.0", ("client_failure_rate must be a number in [0, 1)",)),
    ],
    ids=["fraction_train_0", "fraction_train_1.5", "fraction_evaluate", "rounds_0", "failure_1"],
)
def test_federated_setting_out_of_range(tmp_path, earlier, override, words):
    path = _good_csv(tmp_path)
    done = _simulate(
        tmp_path,
        "dataset=csv",
        f"dataset.path={path}",
        "baselines=none",
        "partition=iid",
        "simulation.num_clients=2",
        override,
    )
    _assert_refused_before_start(done, words, earlier, _run_dir(tmp_path))


# --- every setting checked before any data is read (typed schema, option parameters) --------


@pytest.mark.parametrize(
    "overrides, words",
    [
        (
            ["simulation.num_rounds=ten"],
            ["simulation.num_rounds must be a whole number, got 'ten'"],
        ),
        (["simulation.num_round=5"], ["Unknown setting simulation.num_round", "'num_rounds'"]),
        (["seed=-1"], ["seed must be a whole number in [0, 4294967295], got -1"]),
        (["seed=abc"], ["seed must be a whole number, got 'abc'"]),
        (["preprocess.audit_threshold=abc"], ["preprocess.audit_threshold must be a number"]),
        (["model.kernel_size=abc"], ["model.kernel_size must be a whole number >= 1, got 'abc'"]),
        (["strategy=fedadam", "strategy.eta=abc"], ["strategy.eta must be a number > 0"]),
        (["strategy=fedprox", "strategy.proximal_mu=abc"], ["strategy.proximal_mu must be"]),
        (["train.local_epochs=0"], ["train.local_epochs must be a whole number >= 1, got 0"]),
        (["train.batch_size=0"], ["train.batch_size must be a whole number >= 1, got 0"]),
        (["simulation.num_clients=2.5"], ["simulation.num_clients must be a whole number"]),
        (["simulation.client_resources.num_cpus=64"], ["num_cpus=64 is more than the"]),
        (["strategy=krum", "strategy.num_malicious_nodes=4"], ["krum tolerates f attackers"]),
        (
            ["model=autoencoder", "task=multiclass"],
            ["model=autoencoder detects anomalies", "needs task=binary"],
        ),
        (
            ["model=xgboost", "strategy=fedprox"],
            ["strategy=fedprox does not fit model=xgboost", "fedxgb_bagging or fedxgb_cyclic"],
        ),
        (
            ["model=xgboost", "model.local_rounds=0"],
            ["model.local_rounds must be a whole number >= 1"],
        ),
        (["model=xgboost", "model.max_depth=-2"], ["model.max_depth must be a whole number >= 1"]),
        (["model=cnn", "strategy=fedxgb_bagging"], ["FedXgb strategies merge boosters"]),
        (
            ["dataset=csv", "dataset.label_case=loose"],
            ["dataset.label_case must be one of exact, insensitive, got 'loose'"],
        ),
        (
            ["dataset=csv", "dataset.thousands=','", "dataset.decimal=','"],
            ["dataset.thousands and dataset.decimal must differ"],
        ),
        (["dataset=csv", "dataset.decimal=''"], ["dataset.decimal must be one character"]),
    ],
    ids=lambda v: "_".join(v) if isinstance(v, list) and "=" in v[0] else None,
)
def test_setting_refused_before_any_data_is_read(tmp_path, earlier, overrides, words):
    done = _simulate(tmp_path, *overrides)
    _assert_refused_before_start(done, tuple(words), earlier, _run_dir(tmp_path))


def test_every_job_of_a_multirun_is_checked_before_the_first_starts(tmp_path, earlier):
    sweep = tmp_path / "sweep"
    done = _module(
        "fedad.simulate",
        "-m",
        f"hydra.sweep.dir={sweep}",
        "seed=0,1",
        "train.batch_size=32,0",
        cwd=tmp_path,
    )
    text = _error_paragraph(done)
    _assert_names(text, ("of the 4 in this multirun", "train.batch_size=0", "No job was started"))
    assert not sweep.exists()
    _assert_untouched(earlier)


# --- unknown names -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "group, bad", [("strategy", "fedsgd"), ("model", "lstm"), ("dataset", "cicids2017")]
)
def test_unknown_config_group_option_lists_the_valid_ones(tmp_path, earlier, group, bad):
    done = _simulate(tmp_path, f"{group}={bad}")
    _assert_unknown_option(done, group, bad, earlier)


# --- output directories and earlier results ------------------------------------------------


def test_output_directory_not_writable(tmp_path, earlier):
    target = _unwritable_dir(tmp_path)
    done = _simulate(tmp_path, *LIGHT, "dataset.n_rows=300", run_dir=target)
    text = _error_paragraph(done)
    _assert_names(text, (str(target), "hydra.run.dir"))
    _assert_untouched(earlier)


def test_failed_rerun_keeps_the_finished_results_in_its_directory(tmp_path, earlier):
    finished = tmp_path / "outputs" / "earlier"
    done = _csv_run(tmp_path, _good_csv(tmp_path), "dataset.label_column=lable", run_dir=finished)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    _assert_untouched(earlier)


@pytest.mark.parametrize(
    "meta",
    [b'{"round": 3, "state_file": "state-00003.n', b'{"round": 3}'],
    ids=["truncated_meta", "meta_without_fields"],
)
def test_corrupted_checkpoint_is_refused_and_kept(tmp_path, earlier, meta):
    previous = tmp_path / "outputs" / "earlier"
    (previous / "checkpoint").mkdir()
    (previous / "checkpoint" / "meta.json").write_bytes(meta)
    (previous / "checkpoint" / "state-00003.npz").write_bytes(b"PK\x03\x04 cut short")
    before = {**earlier, **{p: p.read_bytes() for p in (previous / "checkpoint").iterdir()}}
    path = _good_csv(tmp_path)
    done = _simulate(
        tmp_path,
        "dataset=csv",
        f"dataset.path={path}",
        "baselines=none",
        "partition=iid",
        "simulation.num_clients=2",
        f"resume={previous}",
    )
    text = _error_paragraph(done)
    _assert_names(text, ("checkpoint", str(previous)))
    _assert_untouched(before)


# --- how labels, numbers and headers are read ----------------------------------------------

# Labels spelt like the normal value but for case or spaces, and an attack in two spellings.
SPELLINGS = ("normal", "Normal ", "NORMAL", " normal", "DoS", "dos")


@pytest.mark.parametrize(
    "case, task, classes, normal_rows, words",
    [
        (
            "exact",
            "binary",
            ["normal", "attack"],
            100,
            ("'NORMAL' (50 rows)", "'Normal' (50 rows)", "dataset.label_case=insensitive"),
        ),
        (
            "exact",
            "multiclass",
            ["normal", "DoS", "NORMAL", "Normal", "dos"],
            100,
            ("'NORMAL' (50 rows)", "'DoS' (50 rows), 'dos' (50 rows)", "class of its own"),
        ),
        ("insensitive", "multiclass", ["normal", "dos"], 200, ()),
    ],
    ids=["exact_binary", "exact_multiclass", "insensitive_multiclass"],
)
def test_label_spellings(tmp_path, earlier, case, task, classes, normal_rows, words):
    """Exact matching by default, with the near misses named; label_case=insensitive folds case."""
    path = _write(tmp_path, HEADER + "\n" + _rows(300, label=lambda i: SPELLINGS[i % 6]))
    done = _csv_run(tmp_path, path, f"task={task}", f"dataset.label_case={case}")
    data = _assert_warned(done, earlier, _run_dir(tmp_path), words)
    assert data["classes"] == classes
    assert data["train_class_counts"][0] + data["test_class_counts"][0] == normal_rows
    assert bool(data["warnings"]) == bool(words)
    if case == "insensitive":
        assert data["label_variants"] == data["class_variants"] == {}


def _written(i: int) -> str:
    return f'{i},"{1000 + 37 * i:,}",{"tcp" if i % 2 else "udp"},{"normal" if i % 3 else "attack"}'


@pytest.mark.parametrize(
    "text, overrides, setting",
    [
        (
            HEADER + "\n" + "\n".join(_written(i) for i in range(150)) + "\n",
            (),
            "dataset.thousands=','",
        ),
        (
            HEADER.replace(",", ";")
            + "\n"
            + "".join(
                f"{i};{i % 7},5;{'tcp' if i % 2 else 'udp'};{'normal' if i % 3 else 'attack'}\n"
                for i in range(150)
            ),
            ("dataset.sep=';'",),
            "dataset.decimal=','",
        ),
    ],
    ids=["quoted_thousands", "decimal_comma"],
)
def test_numbers_written_as_text(make_cfg, tmp_path, earlier, text, overrides, setting):
    """Read as text they become categories, with a warning; the named setting reads numbers."""
    path = _write(tmp_path, text)
    done = _csv_run(tmp_path, path, *overrides)
    words = ("Column 'b'", "one-hot encoded as categorical", setting)
    data = _assert_warned(done, earlier, _run_dir(tmp_path), words)
    assert data["written_numbers"] == {"b": 120}  # counted on the training rows
    assert data["n_features"] > 4
    # With the setting the warning names, in process (the reader is the same).
    cfg = make_cfg(*_csv_cfg(path, *overrides, setting))
    fixed = prepare(cfg.dataset, cfg.preprocess, cfg.task, cfg.data_dir, 0)
    assert fixed.notes["written_numbers"] == {} and fixed.notes["warnings"] == []
    assert fixed.feature_names == ["a", "b", "proto=tcp", "proto=udp"]
    assert fixed.notes["cleaned_cells"]["junk_text"] == 0


def test_header_read_as_a_data_row_is_warned(tmp_path, earlier):
    overrides = ("dataset.header=false", "dataset.columns=[a,b,proto,label]")
    done = _csv_run(tmp_path, _good_csv(tmp_path), *overrides)
    words = ("first row", "looks like column names", "a, b, proto, label", "dataset.header=true")
    data = _assert_warned(done, earlier, _run_dir(tmp_path), words)
    assert data["n_train"] + data["n_test"] == 151


def test_data_row_read_as_a_header_is_warned(tmp_path, earlier):
    path = _write(tmp_path, _rows(150, start=1))
    done = _csv_run(tmp_path, path, "dataset.columns=[a,b,proto,label]")
    words = ("header row", "looks like data", "dataset.header=false")
    data = _assert_warned(done, earlier, _run_dir(tmp_path), words)
    assert data["n_train"] + data["n_test"] == 149


# --- test sets that cannot measure ---------------------------------------------------------


def test_test_file_of_one_class_is_refused(tmp_path, earlier):
    attacks = _rows(40, start=1000, label=lambda i: "attack")
    done = _simulate(tmp_path, *_two_files(tmp_path, HEADER + "\n" + attacks))
    _assert_user_error(
        done,
        ("holds 40 row(s) of a single class ('attack')", "dataset.test_file=", "ROC-AUC"),
        earlier,
        _run_dir(tmp_path),
    )


def test_small_test_class_is_flagged(tmp_path, earlier):
    few = _rows(40, start=1000, label=lambda i: "attack" if i % 10 == 0 else "normal")
    done = _simulate(tmp_path, *_two_files(tmp_path, HEADER + "\n" + few), *ONE_MODEL)
    data = _assert_warned(done, earlier, _run_dir(tmp_path), ("fewer than 10 rows", "'attack' (4)"))
    assert data["small_test_classes"] == {"attack": 4}
    table = (_run_dir(tmp_path) / "comparison.md").read_text()
    assert "logistic_regression" in table
    assert "⚠ few test rows: attack (4), below 10" in table


# --- damaged files and impossible values -----------------------------------------------------


def test_corrupted_deflate_block_in_gzip(tmp_path, earlier):
    whole = bytearray(gzip.compress((HEADER + "\n" + _rows(3000)).encode()))
    whole[30:38] = bytes(b ^ 0xFF for b in whole[30:38])
    with pytest.raises(zlib.error):
        gzip.decompress(bytes(whole))
    path = tmp_path / "data.csv.gz"
    path.write_bytes(bytes(whole))
    done = _csv_run(tmp_path, path)
    _assert_user_error(
        done,
        (str(path), "could not be read", "truncated or corrupted"),
        earlier,
        _run_dir(tmp_path),
    )


def test_values_beyond_float32_are_cleaned_and_counted(tmp_path, earlier):
    """1e308 overflowed float32 inside the scaler; now it is cleaned like ±inf, and named."""
    lines = _rows(150).splitlines()
    for i in (5, 8):
        a, _, proto, label = lines[i].split(",")
        lines[i] = ",".join([a, "1e308", proto, label])
    path = _write(tmp_path, HEADER + "\n" + "\n".join(lines) + "\n")
    done = _csv_run(tmp_path, path, "preprocess.log_transform=false", *ONE_MODEL)
    words = ("too large for float32", "'b' (2 cells)", "cleaned_cells.out_of_range")
    data = _assert_warned(done, earlier, _run_dir(tmp_path), words)
    assert data["cleaned_cells"]["out_of_range"] == 2
    assert _results(_run_dir(tmp_path))["models"]["logistic_regression"]["macro_f1"] is not None


def test_natural_column_not_in_the_file(tmp_path, earlier):
    done = _csv_run(
        tmp_path, _good_csv(tmp_path), "partition=natural", "dataset.natural_column=site"
    )
    _assert_user_error(
        done,
        ("Column 'site' (dataset.natural_column)", "Columns found: a, b, proto, label"),
        earlier,
        _run_dir(tmp_path),
    )


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux's /proc and /sys")
@pytest.mark.parametrize("target", ["/proc/fedad_run", "/sys/fedad_run/inner"])
def test_run_folder_on_a_virtual_file_system(tmp_path, earlier, target):
    """Root passes every permission check there; only trying to make a folder tells."""
    done = _simulate(tmp_path, *LIGHT, "dataset.n_rows=300", run_dir=Path(target))
    text = _error_paragraph(done)
    _assert_names(text, (target, "hydra.run.dir", "does not accept new folders"))
    assert not Path(target).exists()
    _assert_untouched(earlier)


# --- python -m fedad.report ----------------------------------------------------------------


def test_report_on_a_missing_directory(tmp_path, earlier):
    done = _module("fedad.report", str(tmp_path / "outputs" / "nope"), cwd=tmp_path)
    text = _error_paragraph(done)
    assert done.stderr.startswith("fedad: error:")
    _assert_names(text, ("does not exist", "outputs/<date>/<time>"))
    _assert_untouched(earlier)


def test_report_on_a_directory_without_runs(tmp_path, earlier):
    empty = tmp_path / "empty"
    empty.mkdir()
    done = _module("fedad.report", str(empty), cwd=tmp_path)
    text = _error_paragraph(done)
    _assert_names(text, ("holds no run", "results.json"))
    assert list(empty.iterdir()) == []
    _assert_untouched(earlier)


def test_report_lists_a_corrupted_results_file_as_failed(tmp_path, earlier):
    """Documented recovery: an unreadable results.json makes its job 'failed', not a crash."""
    job = tmp_path / "sweep" / "0"
    job.mkdir(parents=True)
    (job / "results.json").write_text('{"status": "do')
    before = {**earlier, job / "results.json": (job / "results.json").read_bytes()}
    done = _module("fedad.report", str(tmp_path / "sweep"), cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    report = (tmp_path / "sweep" / "report.md").read_text()
    assert "results.json is unreadable" in report
    _assert_untouched(before)


def test_report_of_a_baselines_only_sweep_with_damaged_jobs(tmp_path, earlier):
    """The README's `-m federated=false` sweep reports; each unreadable job is listed as failed."""
    sweep = tmp_path / "sweep"
    path = _good_csv(tmp_path)
    done = _module(
        "fedad.simulate",
        "-m",
        f"hydra.sweep.dir={sweep}",
        "dataset=csv",
        f"dataset.path={path}",
        *LIGHT,
        *ONE_MODEL,
        "seed=0,1",
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    damaged = {
        "2/results.json": (b"[1, 2]", "results.json is unreadable: it holds a JSON list"),
        "3/results.json": (b'{"status": "\xff"}', "results.json is unreadable: 'utf-8' codec"),
        "4/failed.json": (b"[]", "failed.json is unreadable: it holds a JSON list"),
        "5/.hydra/overrides.yaml": (b"- seed=0\n  x: [\n", ".hydra/overrides.yaml is unreadable"),
    }
    for name, (content, _) in damaged.items():
        job = sweep / name.split("/")[0]
        (job / ".hydra").mkdir(parents=True, exist_ok=True)
        (job / name.split("/", 1)[1]).write_bytes(content)
    (sweep / "5" / "results.json").write_text(
        json.dumps({"status": "done", "models": {"logistic_regression": [0.5]}})
    )
    before = {**earlier, **{p: p.read_bytes() for p in sweep.rglob("*") if p.is_file()}}
    done = _module("fedad.report", str(sweep), cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    report = (sweep / "report.md").read_text()
    failed = report.split("## Failed or incomplete jobs")[1]
    for name, (_, reason) in damaged.items():
        line = next(x for x in failed.splitlines() if x.startswith(f"- `{name.split('/')[0]}`"))
        assert "**failed**" in line and reason in line, line
    assert "model 'logistic_regression' is a list" in failed
    assert "6 job(s): 2 done, 4 failed" in report
    assert "No finished federated model" in report
    assert "| logistic_regression | supervised | 2 |" in report
    _assert_untouched(before)


def test_report_to_an_unwritable_folder(tmp_path, earlier):
    target = _unwritable_dir(tmp_path)
    done = _module("fedad.report", str(tmp_path / "outputs"), "--out", str(target), cwd=tmp_path)
    text = _error_paragraph(done)
    _assert_names(text, (str(target), "--out"))
    _assert_untouched(earlier)


# --- more bad data, in process: the same checks on the message, without a process start -----


def _refused(make_cfg, tmp_path: Path, earlier, *overrides: str) -> str:
    """Run :func:`fedad.simulate.run` on ``overrides``; return its one-paragraph FedadError."""
    cfg = make_cfg(*overrides)
    with pytest.raises(FedadError) as err:
        run(cfg, _run_dir(tmp_path))
    text = str(err.value)
    assert "\n\n" not in text and len(text) < 800, text
    _assert_untouched(earlier)
    return " ".join(text.split())


def _csv_cfg(path: Path, *overrides: str) -> tuple[str, ...]:
    return ("dataset=csv", f"dataset.path={path}", *LIGHT, *overrides)


def test_few_distinct_rows_cannot_be_split_by_class(make_cfg, tmp_path, earlier):
    """4 distinct rows survive de-duplication: too few to put both classes on both sides."""
    text = HEADER + "\n" + "1,2,tcp,normal\n" * 60 + "3,4,udp,attack\n" * 60
    path = _write(tmp_path, text + "5,4,udp,attack\n1,9,tcp,normal\n")
    message = _refused(make_cfg, tmp_path, earlier, *_csv_cfg(path))
    _assert_names(
        message, ("4 usable rows", "preprocess.test_size=0.2", "preprocess.drop_duplicates=false")
    )


def test_every_label_empty(make_cfg, tmp_path, earlier):
    path = _write(tmp_path, HEADER + "\n" + "".join(f"{i},{i % 7},tcp,\n" for i in range(50)))
    message = _refused(make_cfg, tmp_path, earlier, *_csv_cfg(path))
    _assert_names(message, ("empty label column 'label'", "dataset.label_column"))


def test_column_names_fewer_than_fields(make_cfg, tmp_path, earlier):
    """Without the check, pandas silently turned the extra leading field into an index."""
    path = _write(tmp_path, _rows(150))
    overrides = _csv_cfg(path, "dataset.header=false", "dataset.columns=[b,proto,label]")
    message = _refused(make_cfg, tmp_path, earlier, *overrides)
    _assert_names(message, (str(path), "4 fields per row", "dataset.columns names 3"))


def test_headerless_file_read_with_a_header(make_cfg, tmp_path, earlier):
    path = _write(tmp_path, _rows(150, start=1))
    message = _refused(make_cfg, tmp_path, earlier, *_csv_cfg(path))
    _assert_names(
        message,
        ("Column 'label' (dataset.label_column)", "look like data", "(dataset.header)"),
    )


def test_test_file_of_one_row_is_refused(make_cfg, tmp_path, earlier):
    one = _rows(1, start=1000, label=lambda i: "normal")
    message = _refused(make_cfg, tmp_path, earlier, *_two_files(tmp_path, HEADER + "\n" + one))
    _assert_names(message, ("holds 1 row(s) of a single class ('normal')",))


def test_binary_file_given_as_csv(make_cfg, tmp_path, earlier):
    path = tmp_path / "data.csv"
    path.write_bytes(bytes(range(128, 256)) * 40)
    message = _refused(make_cfg, tmp_path, earlier, *_csv_cfg(path))
    _assert_names(message, (str(path), "could not be read as CSV", "dataset.sep"))


def test_folder_given_as_data_file(make_cfg, tmp_path, earlier):
    folder = tmp_path / "downloads"
    folder.mkdir()
    message = _refused(make_cfg, tmp_path, earlier, *_csv_cfg(folder))
    _assert_names(message, (str(folder), "is a folder", "dataset.path"))


def test_unknown_task(make_cfg, tmp_path, earlier):
    message = _refused(make_cfg, tmp_path, earlier, *_csv_cfg(_good_csv(tmp_path), "task=ternary"))
    _assert_names(message, ("'ternary'", "binary, multiclass"))


def test_test_size_out_of_range(make_cfg, tmp_path, earlier):
    overrides = _csv_cfg(_good_csv(tmp_path), "preprocess.test_size=1.5")
    message = _refused(make_cfg, tmp_path, earlier, *overrides)
    _assert_names(message, ("preprocess.test_size must be a number in (0, 1)", "got 1.5"))


def test_dirichlet_alpha_not_a_number(make_cfg, tmp_path, earlier):
    overrides = _csv_cfg(_good_csv(tmp_path), "partition=dirichlet", "partition.alpha=abc")
    message = _refused(make_cfg, tmp_path, earlier, *overrides)
    _assert_names(message, ("partition.alpha must be a number > 0, got 'abc'",))


def test_long_path_in_the_message_is_printed_whole(capsys):
    path = "/data/downloads-2024-11-28-iot-captures-from-site-a/gateway-07/capture-part-0001.csv"
    with pytest.raises(SystemExit) as stop:
        exit_with(FedadError(f"Data file not found: {path} (from dataset.path). Download it."))
    assert stop.value.code == 2
    assert path in capsys.readouterr().err
