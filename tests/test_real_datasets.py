"""The loaders of the real samples in FEDAD_DATA_DIR: what each reads, drops and refuses."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from fedad.data import sources
from fedad.data.audit import single_feature_auc
from fedad.data.prepare import prepare
from fedad.errors import FedadError
from fedad.run.validate import validate

REPO = Path(__file__).resolve().parents[1]
DATA_DIR = Path(os.environ.get("FEDAD_DATA_DIR", REPO.parent / "shared" / "data"))
CIC_SAMPLE = "cic_ids2017/cic_ids2017_multiclass.csv.gz"
NETFLOW_IDENTIFIERS = {"IPV4_SRC_ADDR", "L4_SRC_PORT", "IPV4_DST_ADDR", "L4_DST_PORT", "Dataset"}
CIC_IDENTIFIERS = {"Flow ID", "Source IP", "Source Port", "Destination IP", "Timestamp"}
EDGE_FILES = {"MITM_attack.csv.gz": 1229, "OS_Fingerprinting_attack.csv.gz": 1001}


def _folder(name: str) -> Path:
    """The data folder holding ``name/``; skip, saying so, when it is not there."""
    if not (DATA_DIR / name).is_dir():
        pytest.skip(
            f"{DATA_DIR / name} not found: set FEDAD_DATA_DIR to the folder holding {name}/ "
            "(see its SOURCE.md)"
        )
    return DATA_DIR


def _prepare(cfg, task="binary"):
    return prepare(cfg.dataset, cfg.preprocess, task, cfg.data_dir, int(cfg.seed))


def _audited(data, features: int) -> None:
    """The leakage audit scored every kept feature, and flagged what reached its threshold."""
    table = pd.DataFrame(data.notes["audit"])
    assert len(table) == features and table["auc"].notna().all()
    assert data.notes["audit_flagged"] == table.loc[table["auc"] >= 0.98, "feature"].tolist()


# --- CICIoT2023 ----------------------------------------------------------------------------


def test_ciciot2023_sample_is_read_as_the_per_class_release(make_cfg):
    cfg = make_cfg("dataset=ciciot2023", f"data_dir={_folder('ciciot2023')}")
    raw = pd.read_csv(DATA_DIR / cfg.dataset.path)
    data = _prepare(cfg, task="multiclass")
    assert "per-class CSV release" in data.notes["origin"]
    assert data.n_features == 39 and "Label" not in data.feature_names
    attacks = sorted(set(raw["Label"]) - {"Benign_Final"})
    assert data.class_names == ["normal", *attacks] and len(attacks) == 26
    # Benign_Final is the normal value: its distinct rows are the normal class, train and test.
    benign = raw[raw["Label"] == "Benign_Final"].drop_duplicates()
    assert (data.y_train == 0).sum() + (data.y_test == 0).sum() == len(benign)
    _audited(data, 39)


def test_ciciot2023_merged_release_is_recognised_by_its_header(make_cfg, tmp_path):
    merged = [
        "flow_duration",
        "Header_Length",
        "Protocol Type",
        "Duration",
        "Rate",
        "Srate",
        "Drate",
        "fin_flag_number",
        "syn_flag_number",
        "rst_flag_number",
        "psh_flag_number",
        "ack_flag_number",
        "ece_flag_number",
        "cwr_flag_number",
        "ack_count",
        "syn_count",
        "fin_count",
        "urg_count",
        "rst_count",
        "HTTP",
        "HTTPS",
        "DNS",
        "Telnet",
        "SMTP",
        "SSH",
        "IRC",
        "TCP",
        "UDP",
        "DHCP",
        "ARP",
        "ICMP",
        "IPv",
        "LLC",
        "Tot sum",
        "Min",
        "Max",
        "AVG",
        "Std",
        "Tot size",
        "IAT",
        "Number",
        "Magnitue",
        "Radius",
        "Covariance",
        "Variance",
        "Weight",
        "label",
    ]
    rows = [[i % 5, *range(45), "BenignTraffic" if i % 3 else "DDoS-ICMP_Flood"] for i in range(9)]
    pd.DataFrame(rows, columns=merged).to_csv(tmp_path / "part-00000.csv", index=False)
    cfg = make_cfg("dataset=ciciot2023", "dataset.path=part-00000.csv", f"data_dir={tmp_path}")
    raw = sources.load(cfg.dataset, tmp_path, 0)
    assert raw.origin == "part-00000.csv, read as the " + cfg.dataset.releases[0].name
    assert (raw.train["label"] == "BenignTraffic").sum() == 6

    pd.DataFrame(rows, columns=[*merged[:-2], "Magnitude", "label"]).to_csv(
        tmp_path / "other.csv", index=False
    )
    cfg = make_cfg("dataset=ciciot2023", "dataset.path=other.csv", f"data_dir={tmp_path}")
    with pytest.raises(FedadError, match="fits none of them") as caught:
        sources.load(cfg.dataset, tmp_path, 0)
    # Each release's missing columns are named: the merged one lacks Weight, the other Label.
    assert "needs Weight;" in str(caught.value) and "needs Time_To_Live, IGMP" in str(caught.value)


# --- CIC-IDS2017 ---------------------------------------------------------------------------


def test_cic_ids2017_strips_names_and_counts_infinity(make_cfg):
    cfg = make_cfg("dataset=cic_ids2017", f"data_dir={_folder('cic_ids2017')}")
    data = _prepare(cfg)
    assert "MachineLearningCVE" in data.notes["origin"]
    assert all(name == name.strip() for name in data.feature_names)
    assert (
        "Destination Port" in data.feature_names and "Fwd Header Length.1" not in data.feature_names
    )
    # Infinity and NaN cells, counted as the distinct rows a run keeps hold them.
    raw = pd.read_csv(DATA_DIR / CIC_SAMPLE)
    raw.columns = [c.strip() for c in raw.columns]
    features = [c for c in raw.columns if c not in ("Label", "Fwd Header Length.1")]
    kept = raw.assign(attack=raw["Label"] != "BENIGN").drop_duplicates([*features, "attack"])
    cells = kept[["Flow Bytes/s", "Flow Packets/s"]].to_numpy(float)
    assert data.notes["cleaned_cells"]["infinite"] == np.isinf(cells).sum() > 0
    assert data.notes["cleaned_cells"]["missing"] == np.isnan(cells).sum()
    assert len(data.y_train) + len(data.y_test) == len(kept)
    _audited(data, 77)


def test_cic_ids2017_original_files_with_identifiers_and_the_en_dash_byte(make_cfg, tmp_path):
    """A GeneratedLabelledFlows file: flow identifiers dropped, the cp1252 en dash read."""
    _folder("cic_ids2017")
    sample = pd.read_csv(DATA_DIR / CIC_SAMPLE)
    label = sample.columns[-1]
    web = sample[label].str.startswith("Web Attack")
    rows = pd.concat([sample[sample[label] == "BENIGN"].head(60), sample[web].head(60)])
    rows[label] = rows[label].str.replace("\ufffd", "\u2013")  # 0x96 in cp1252
    for i, name in enumerate(sorted(CIC_IDENTIFIERS)):
        rows.insert(i, name, [f"{name}-{n}" for n in range(len(rows))])
    (tmp_path / "Thursday.csv").write_bytes(rows.to_csv(index=False).encode("cp1252"))
    cfg = make_cfg("dataset=cic_ids2017", "dataset.path=Thursday.csv", f"data_dir={tmp_path}")
    data = _prepare(cfg, task="multiclass")
    assert "GeneratedLabelledFlows" in data.notes["origin"]
    assert not CIC_IDENTIFIERS & set(data.feature_names)
    assert data.class_names[0] == "normal"
    assert set(data.class_names[1:]) <= {
        "Web Attack - Brute Force",
        "Web Attack - XSS",
        "Web Attack - Sql Injection",
    }


# --- NetFlow v2 ----------------------------------------------------------------------------


@pytest.mark.parametrize("source", ["nf_bot_iot_v2", "nf_ton_iot_v2"])
def test_nf_v2_drops_identifiers_and_reads_both_labels(make_cfg, source):
    cfg = make_cfg("dataset=nf_v2", f"dataset.source={source}", f"data_dir={_folder(source)}")
    assert set(cfg.dataset.drop_columns) == NETFLOW_IDENTIFIERS
    data = _prepare(cfg, task="multiclass")
    assert "NetFlow v2" in data.notes["origin"] and cfg.dataset.path.startswith(source)
    assert data.n_features == 39 and not NETFLOW_IDENTIFIERS & set(data.feature_names)
    # The attack classes are the file's `Attack` values; `Label` 0 is exactly `Benign`.
    attacks = pd.read_csv(DATA_DIR / cfg.dataset.path, usecols=["Label", "Attack"])
    assert (attacks["Label"] == 0).equals(attacks["Attack"] == "Benign")
    assert data.class_names == ["normal", *sorted(set(attacks["Attack"]) - {"Benign"})]
    _audited(data, 39)


def test_every_netflow_source_is_read_into_one_frame(make_cfg):
    cfg = make_cfg("dataset=nf_v2", f"data_dir={_folder('nf_ton_iot_v2')}")
    _folder("nf_bot_iot_v2")
    frames = {
        name: sources.read_source(cfg.dataset, DATA_DIR, name)
        for name in ("nf_bot_iot_v2", "nf_ton_iot_v2")
    }
    bot, ton = frames["nf_bot_iot_v2"].train, frames["nf_ton_iot_v2"].train
    assert list(bot.columns) == list(ton.columns) and len(bot) == 278_781 and len(ton) == 106_730
    assert set(bot["Dataset"]) == {"NF-BoT-IoT-v2"} and set(ton["Dataset"]) == {"NF-ToN-IoT-v2"}
    with pytest.raises(FedadError, match="knows nf_bot_iot_v2, nf_ton_iot_v2"):
        sources.read_source(cfg.dataset, DATA_DIR, "nf_unsw_nb15_v2")


def test_unknown_netflow_source_is_refused_before_anything_is_read(make_cfg):
    cfg = make_cfg("dataset=nf_v2", "dataset.source=nf_bot_iot", "data_dir=/nonexistent")
    with pytest.raises(FedadError) as caught:
        validate(cfg)
    text = str(caught.value)
    assert "dataset.source='nf_bot_iot' is not a source of dataset 'nf_v2'" in text
    assert "nf_bot_iot_v2, nf_ton_iot_v2" in text and "\n" not in text


# --- one-class samples: Edge-IIoTset (attacks only) and UNSW-NB15 (normal only) -----------


@pytest.mark.parametrize("name", sorted(EDGE_FILES))
def test_edge_iiotset_files_are_read_and_refused_alone(make_cfg, name):
    path = f"edge_iiotset/{name}"
    cfg = make_cfg(
        "dataset=edge_iiotset", f"dataset.path={path}", f"data_dir={_folder('edge_iiotset')}"
    )
    raw = sources.load(cfg.dataset, DATA_DIR, 0)
    assert raw.train.shape == (EDGE_FILES[name], 63) and "Edge-IIoTset" in raw.origin
    # Every identifier the config drops is a column of the real header.
    assert set(cfg.dataset.drop_columns) <= set(raw.train.columns)
    # One class: the audit has nothing to separate, and a run is refused before it starts.
    assert set(raw.train["Attack_label"]) == {1}
    assert single_feature_auc(raw.train[["tcp.seq"]], raw.train["Attack_label"])["auc"].isna().all()
    with pytest.raises(FedadError, match="holds a single class") as caught:
        sources.check_files(cfg.dataset, DATA_DIR)
    assert f"all {EDGE_FILES[name]:,} labelled rows have '1'" in str(caught.value)
    assert "autoencoder" in str(caught.value)


def test_unsw_nb15_any_file_of_the_layout_and_its_normal_only_sample(make_cfg, tmp_path):
    path = "unsw_nb15/UNSW_NB15_testing-set_10000.csv.gz"
    cfg = make_cfg("dataset=unsw_nb15", f"dataset.path={path}", f"data_dir={_folder('unsw_nb15')}")
    raw = sources.load(cfg.dataset, DATA_DIR, 0)
    assert raw.train.shape == (10_287, 45) and "UNSW-NB15 partitioned set" in raw.origin
    header = set(raw.train.columns)
    assert set(cfg.dataset.drop_columns) | set(cfg.dataset.categorical_columns) <= header
    with pytest.raises(FedadError, match="all 10,287 labelled rows have '0'"):
        sources.check_files(cfg.dataset, DATA_DIR)
    # A file of another layout is named as such, with the columns it lacks.
    raw.train.drop(columns=["id", "sttl"]).to_csv(tmp_path / "other.csv", index=False)
    other = make_cfg("dataset=unsw_nb15", "dataset.path=other.csv", f"data_dir={tmp_path}")
    with pytest.raises(FedadError, match="partitioned set .45 columns. needs id, sttl[.] Point"):
        sources.load(other.dataset, tmp_path, 0)


def test_one_class_file_ends_the_command_with_one_paragraph(tmp_path):
    """``python -m fedad.simulate``: exit 2 and the reason recorded.

    The refusal is :func:`fedad.data.sources.check_files`'s, which a run calls before it starts
    the engine (Ray).
    """
    data_dir = _folder("edge_iiotset")
    run_dir = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(REPO), "FEDAD_DATA_DIR": str(data_dir)}
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "fedad.simulate",
            "dataset=edge_iiotset",
            "dataset.path=edge_iiotset/OS_Fingerprinting_attack.csv.gz",
            f"hydra.run.dir={run_dir}",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 2 and "Traceback" not in done.stderr
    paragraph = " ".join(done.stderr[done.stderr.index("fedad: error:") :].split())  # unwrapped
    assert "holds a single class" in paragraph and "dataset.path" in paragraph
    failed = json.loads((run_dir / "failed.json").read_text())
    assert "holds a single class" in failed["error"]


# --- one small run end to end ----------------------------------------------------------------


@pytest.mark.long
def test_cic_ids2017_runs_end_to_end(tmp_path):
    """A tiny federated run on the real CIC-IDS2017 sample, through the command."""
    data_dir = _folder("cic_ids2017")
    run_dir = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(REPO), "FEDAD_DATA_DIR": str(data_dir)}
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "fedad.simulate",
            "dataset=cic_ids2017",
            "simulation.num_clients=3",
            "simulation.num_rounds=2",
            "explain=false",
            "eda=false",
            "baselines=none",
            "detector.write=false",
            f"hydra.run.dir={run_dir}",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((run_dir / "results.json").read_text())
    assert results["status"] == "done" and "MachineLearningCVE" in results["data"]["origin"]
    assert results["data"]["n_features"] == 77
