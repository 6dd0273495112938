"""Federation across sources: each site one organisation's data, and the cross-source matrix.

Generated NetFlow v2 files (the real layout's columns, two organisations with different attacks)
keep the default tests fast; the shared NetFlow v2 samples are read where ``$FEDAD_DATA_DIR``
holds them, and a whole run on them is a long test.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import f1_score

from fedad import rundir
from fedad.baselines.runner import run_baselines, with_twin
from fedad.config import compose, to_dict
from fedad.data.federation import check_files
from fedad.data.partition import partition
from fedad.data.prepare import prepare
from fedad.errors import FedadError, exit_with
from fedad.evaluation import cross_source
from fedad.evaluation.decision import Rule
from fedad.report.__main__ import write_report
from fedad.run.commandline import check
from fedad.run.cross_source import cross_source_matrix
from fedad.simulate import run

REPO = Path(__file__).resolve().parents[1]
DATA_DIR = Path(os.environ.get("FEDAD_DATA_DIR", REPO.parent / "shared" / "data"))
# Every NetFlow v2 column the nf_v2 releases look for, the label pair last.
MARKS = [
    "IN_BYTES",
    "OUT_BYTES",
    "FLOW_DURATION_MILLISECONDS",
    "L7_PROTO",
    "TCP_FLAGS",
    "MIN_TTL",
    "SRC_TO_DST_SECOND_BYTES",
    "DNS_QUERY_ID",
    "FTP_COMMAND_RET_CODE",
]
# Two organisations: the same features, attacks of their own (one shared), few normal rows at A.
ORGS = {
    "org_a": {"Benign": 60, "DDoS": 90, "DoS": 90, "scanning": 60},
    "org_b": {"Benign": 150, "xss": 70, "password": 70, "scanning": 40},
}


def _netflow(path: Path, classes: dict[str, int], seed: int, extra: tuple[str, ...] = ()) -> Path:
    """A NetFlow v2 file: each class its own flow sizes and flags; ``extra`` columns added."""
    rng = np.random.default_rng(seed)
    frames = []
    for name, n in classes.items():
        # Overlapping classes: no detector is perfect, so the matrix's numbers differ.
        centre = 0.0 if name == "Benign" else 0.3 + 0.2 * (sum(map(ord, name)) % 5)
        frame = pd.DataFrame(
            {
                col: np.round(np.exp(rng.normal(3 + centre + i % 3, 2.0, n)))
                for i, col in enumerate(MARKS)
            }
        )
        frame["TCP_FLAGS"] = rng.choice([2, 18, 24, 27], n)
        for col in extra:
            frame[col] = rng.integers(0, 100, n)
        frame["Label"] = int(name != "Benign")
        frame["Attack"] = name
        frames.append(frame)
    pd.concat(frames, ignore_index=True).to_csv(path, index=False)
    return path


@pytest.fixture(scope="module")
def orgs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data folder with both organisations' files: ``org_a.csv``, ``org_b.csv``."""
    folder = tmp_path_factory.mktemp("orgs")
    for seed, (name, classes) in enumerate(ORGS.items()):
        _netflow(folder / f"{name}.csv", classes, seed)
    return folder


def _cfg(folder: Path, *overrides: str):
    """The federation dataset over ``org_a`` and ``org_b`` of ``folder``, one site each."""
    return compose(
        [
            "dataset=federation",
            "partition=by_source",
            f"data_dir={folder}",
            "+dataset.sources.org_a={path: org_a.csv}",
            "+dataset.sources.org_b={path: org_b.csv}",
            "dataset.federate=[org_a,org_b]",
            *overrides,
        ]
    )


def _prepare(cfg):
    return prepare(cfg.dataset, cfg.preprocess, cfg.task, cfg.data_dir, int(cfg.seed))


def _recomputed(predictions: pd.DataFrame, source: str, model: str) -> dict[str, float]:
    """Macro-F1, FPR and each attack class's recall, straight from the saved predictions."""
    own = predictions[predictions["source"] == source]
    normal = own["attack"] == 0
    scores = {
        "macro_f1": f1_score(own["attack"], own[model], average="macro"),
        "fpr": own.loc[normal, model].mean(),
    }
    for name, rows in own[~normal].groupby("class"):
        scores[f"recall_{name}"] = rows[model].mean()
    return scores


def _assert_matrix_from_predictions(run_dir: Path) -> pd.DataFrame:
    """``cross_source.csv`` holds exactly what ``cross_source_predictions.csv`` gives."""
    predictions = pd.read_csv(run_dir / rundir.CROSS_SOURCE_PREDICTIONS)
    table = pd.read_csv(run_dir / rundir.CROSS_SOURCE_CSV)
    models = [c for c in predictions.columns if c not in cross_source.ROW]
    assert len(table) == predictions["source"].nunique() * len(models)
    for row in table.itertuples(index=False):
        expected = _recomputed(predictions, row.test_source, row.model)
        got = row._asdict()
        for key, value in expected.items():
            assert got[key] == pytest.approx(value, abs=1e-12), (row.test_source, row.model, key)
        absent = [c for c in table.columns if c.startswith("recall_") and c not in expected]
        assert all(pd.isna(got[c]) for c in absent), (row.test_source, absent)
        assert row.rows == (predictions["source"] == row.test_source).sum()
    return table


def test_matrix_equals_metrics_recomputed_from_saved_predictions(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    n = 400
    sources = np.where(np.arange(n) < 150, "org_a", "org_b")
    classes = np.where(
        sources == "org_a",
        rng.choice(["normal", "DDoS", "DoS"], n),
        rng.choice(["normal", "xss", "password", "DDoS"], n),
    )
    attack = (classes != "normal").astype(int)
    flags = {
        "alone_org_a": np.where(rng.random(n) < 0.8, attack, 1 - attack),
        "alone_org_b": rng.integers(0, 2, n),
        "federated_cnn": np.where(rng.random(n) < 0.9, attack, 1 - attack),
        "central_cnn": np.where(rng.random(n) < 0.95, attack, 1 - attack),
    }
    trained_on = {
        "alone_org_a": "org_a",
        "alone_org_b": "org_b",
        "federated_cnn": cross_source.FEDERATED,
        "central_cnn": cross_source.POOLED,
    }
    frame = cross_source.predictions(sources, classes, attack, flags)
    facts = cross_source.write(tmp_path, frame, trained_on)
    assert facts["models"] == trained_on
    table = _assert_matrix_from_predictions(tmp_path)
    # Attacks org_a's network never showed it: one row of the matrix, with org_b's classes.
    unseen = table[(table["test_source"] == "org_b") & (table["model"] == "alone_org_a")]
    assert len(unseen) == 1 and not unseen["own"].iat[0]
    assert unseen[["recall_xss", "recall_password"]].notna().all(axis=None)
    assert pd.isna(table.loc[table["test_source"] == "org_b", "recall_DoS"]).all()
    text = cross_source.section(tmp_path)
    assert "### Test rows of org_b" in text and "org_a (never saw this source)" in text


def test_each_source_is_deduplicated_and_split_on_its_own_rows(orgs: Path) -> None:
    data = _prepare(_cfg(orgs))
    facts = data.notes["sources"]
    assert list(facts) == ["org_a", "org_b"]
    for name, classes in ORGS.items():
        assert facts[name]["n_train"] + facts[name]["n_test"] == sum(classes.values())
        assert (data.sources_test == name).sum() == facts[name]["n_test"]
        # Stratified within the source: about test_size of its rows, both classes present.
        assert facts[name]["n_test"] == pytest.approx(0.2 * sum(classes.values()), abs=2)
        assert set(facts[name]["test_classes"]) == {"normal", "attack"}
        # A source's test rows hold only its own attack types.
        own = set(data.types_test[data.sources_test == name]) - {"normal"}
        assert own <= set(classes) - {"Benign"}
    assert len(data.y_test) == sum(f["n_test"] for f in facts.values())
    assert "_source" not in " ".join(data.feature_names)
    assert data.groups_train is None and len(data.sources_train) == len(data.y_train)


def test_a_flow_in_two_sources_stays_in_both(tmp_path: Path) -> None:
    a = pd.read_csv(_netflow(tmp_path / "org_a.csv", ORGS["org_a"], 0))
    b = pd.read_csv(_netflow(tmp_path / "org_b.csv", ORGS["org_b"], 1))
    # org_b holds org_a's first attack flow once, and one of its own flows twice.
    b = pd.concat([b, a[a["Label"] == 1].head(1), b.tail(1)], ignore_index=True)
    b.to_csv(tmp_path / "org_b.csv", index=False)
    data = _prepare(_cfg(tmp_path))
    assert data.notes["sources"]["org_a"]["duplicates_dropped"] == 0
    assert data.notes["sources"]["org_b"]["duplicates_dropped"] == 1
    assert data.notes["duplicates_dropped_train"] == 1


def test_by_source_gives_each_site_one_source() -> None:
    rng = np.random.default_rng(1)
    sources = np.repeat(["org_a", "org_b", "org_c"], [120, 200, 80])
    y = rng.integers(0, 2, len(sources))
    cfg = {"name": "by_source", "clients_per_source": 1, "alpha": None, "min_size": 10}
    parts = partition(cfg, y, 99, 0, groups=sources)
    assert [sorted(set(sources[p])) for p in parts] == [["org_a"], ["org_b"], ["org_c"]]
    split = partition({**cfg, "clients_per_source": 2, "alpha": 0.5}, y, 99, 0, groups=sources)
    assert len(split) == 6 and all(len(set(sources[p])) == 1 for p in split)
    assert np.array_equal(np.sort(np.concatenate(split)), np.arange(len(y)))
    with pytest.raises(FedadError, match="names no source per row"):
        partition(cfg, y, 2, 0, groups=None)


def test_cross_source_matrix_of_real_components(orgs: Path, tmp_path: Path) -> None:
    """Each source's detector trained alone, the central twin on pooled rows, all scored."""
    # A small forest keeps it a unit test; the family and code are the run's own.
    cfg = _cfg(
        orgs, "model=xgboost", "strategy=fedxgb_bagging", "baselines.models.xgboost.n_estimators=20"
    )
    data = _prepare(cfg)
    baselines = with_twin(to_dict(cfg.baselines), "xgboost")
    pooled = run_baselines(
        {**baselines, "models": {"xgboost": baselines["models"]["xgboost"]}},
        data,
        cfg.train,
        keras_epochs=1,
        seed=0,
        decision=Rule("max_macro_f1"),
    )
    facts = cross_source_matrix(cfg, data, pooled, tmp_path)
    assert facts["models"] == {
        "alone_org_a": "org_a",
        "alone_org_b": "org_b",
        "xgboost": cross_source.POOLED,
    }
    table = _assert_matrix_from_predictions(tmp_path)
    predictions = pd.read_csv(tmp_path / rundir.CROSS_SOURCE_PREDICTIONS)
    # The pooled row on the union of the sources' test sets is the comparison's own number.
    union = f1_score(predictions["attack"], predictions["xgboost"], average="macro")
    assert union == pytest.approx(pooled[0].metrics["macro_f1"], abs=1e-12)
    assert set(table["test_source"]) == {"org_a", "org_b"}


def test_sources_whose_features_differ_are_refused_before_anything_starts(
    tmp_path: Path,
) -> None:
    _netflow(tmp_path / "org_a.csv", ORGS["org_a"], 0, extra=("IN_PKTS", "OUT_PKTS"))
    _netflow(tmp_path / "org_b.csv", ORGS["org_b"], 1, extra=("IN_PKTS", "PROTOCOL"))
    cfg = _cfg(tmp_path, "baselines=none", "simulation.local_sites=0")
    run_dir = tmp_path / "run"
    with pytest.raises(FedadError) as err:
        run(cfg, run_dir)
    text = " ".join(str(err.value).split())
    assert "'org_b' lacks OUT_PKTS" in text and "'org_b' has PROTOCOL, which 'org_a' lacks" in text
    assert "dataset.drop_columns" in text and "\n\n" not in str(err.value)
    # Refused before the data was prepared (and so before Ray, which starts after this check).
    assert "data" not in rundir.read_results(run_dir)


def test_a_source_with_one_class_is_refused_before_anything_starts(tmp_path: Path) -> None:
    _netflow(tmp_path / "org_a.csv", ORGS["org_a"], 0)
    _netflow(tmp_path / "org_b.csv", {"xss": 50, "password": 50}, 1)
    cfg = _cfg(tmp_path, "baselines=none", "simulation.local_sites=0")
    with pytest.raises(FedadError) as err:
        run(cfg, tmp_path / "run")
    text = " ".join(str(err.value).split())
    assert "Source 'org_b' of dataset.federate" in text and "single class" in text
    assert "dataset.sources.org_b.path" in text
    assert "data" not in rundir.read_results(tmp_path / "run")


def test_a_source_name_that_does_not_exist_is_refused_with_exit_2(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(FedadError) as err:
        check(
            ["dataset=federation", "partition=by_source", "dataset.federate=[nf_bot_iot_v2,nf_x]"]
        )
    text = " ".join(str(err.value).split())
    assert "dataset.federate names 'nf_x'" in text and "nf_ton_iot_v2" in text
    with pytest.raises(SystemExit) as done:
        exit_with(err.value)
    assert done.value.code == 2
    assert capsys.readouterr().err.startswith("fedad: error: Cannot start the run:")
    with pytest.raises(FedadError, match="partition=by_source gives each site one source"):
        check(["dataset=synthetic", "partition=by_source"])


def test_the_shared_netflow_sources_share_one_feature_set() -> None:
    if not all((DATA_DIR / name).is_dir() for name in ("nf_bot_iot_v2", "nf_ton_iot_v2")):
        pytest.skip(f"{DATA_DIR} lacks nf_bot_iot_v2/ or nf_ton_iot_v2/: set FEDAD_DATA_DIR")
    cfg = compose(["dataset=federation", f"data_dir={DATA_DIR}"])
    check_files(cfg.dataset, DATA_DIR)


@pytest.mark.long
def test_a_federated_run_over_two_organisations_writes_the_matrix(
    orgs: Path, tmp_path: Path
) -> None:
    run_dir = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k != "FEDAD_DATA_DIR"}
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "fedad.simulate",
            f"hydra.run.dir={run_dir}",
            "dataset=federation",
            "partition=by_source",
            f"data_dir={orgs}",
            "+dataset.sources.org_a={path: org_a.csv}",
            "+dataset.sources.org_b={path: org_b.csv}",
            "dataset.federate=[org_a,org_b]",
            "model=logistic",
            "simulation.num_rounds=3",
            "simulation.local_sites=0",
            "baselines=none",
            "explain=false",
            "eda=false",
            "detector.write=false",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    table = _assert_matrix_from_predictions(run_dir)
    assert list(table["model"].unique()) == [
        "alone_org_a",
        "alone_org_b",
        "federated_logistic",
        "central_logistic",
    ]
    results = json.loads((run_dir / rundir.RESULTS_FILE).read_text())
    assert results["cross_source"]["file"] == rundir.CROSS_SOURCE_CSV
    assert set(results["data"]["sources"]) == {"org_a", "org_b"}
    predictions = pd.read_csv(run_dir / rundir.CROSS_SOURCE_PREDICTIONS)
    for model in ("federated_logistic", "central_logistic"):
        union = f1_score(predictions["attack"], predictions[model], average="macro")
        assert union == pytest.approx(results["models"][model]["macro_f1"], abs=1e-9)
    assert "## Across sources" in (run_dir / rundir.COMPARISON_MD).read_text()
    partition_csv = pd.read_csv(run_dir / rundir.PARTITION_CSV)
    assert list(partition_csv["source"]) == ["org_a", "org_b"]
    report = write_report(run_dir, tmp_path / "report")
    assert "## Across sources" in report.read_text()
