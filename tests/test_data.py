"""Loaders on the real files, preprocessing without leakage, and the leakage audit."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from fedad.data.labels import attach, near_misses
from fedad.data.prepare import prepare
from fedad.data.preprocess import Preprocessor, signed_log1p


def _prepare(cfg, task="binary"):
    return prepare(cfg.dataset, cfg.preprocess, task, cfg.data_dir, int(cfg.seed))


def test_nsl_kdd_train_file_to_test_file(make_cfg, data_dir):
    cfg = make_cfg("dataset=nsl_kdd", f"data_dir={data_dir}")
    data = _prepare(cfg)
    assert len(data.y_train) == 25_192  # no exact duplicates in the 20 % file
    assert len(data.y_test) == 22_544 - data.notes["duplicates_dropped_test"]
    assert data.class_names == ["normal", "attack"]
    assert (data.y_train == 0).sum() == 13_449
    # protocol/service/flag are one-hot; a service seen only in test encodes as zeros.
    assert any(name.startswith("service=") for name in data.feature_names)
    assert "difficulty" not in " ".join(data.feature_names)
    assert data.X_train.dtype == np.float32 and np.isfinite(data.X_train).all()


def test_nsl_kdd_multiclass_maps_unseen_attacks_to_families(make_cfg, data_dir):
    data = _prepare(make_cfg("dataset=nsl_kdd", f"data_dir={data_dir}"), task="multiclass")
    assert data.class_names == ["normal", "dos", "probe", "r2l", "u2r"]
    assert set(np.unique(data.y_test)) == {0, 1, 2, 3, 4}


def test_ton_iot_drops_time_columns_by_default(make_cfg, data_dir):
    data = _prepare(
        make_cfg("dataset=ton_iot", "dataset.device=Thermostat", f"data_dir={data_dir}")
    )
    assert not {"ts", "date", "time", "label", "type"} & set(data.feature_names)
    assert "current_temperature" in data.feature_names
    assert data.notes["audit_flagged"] == []


def test_audit_flags_ts_when_time_columns_are_kept(make_cfg, data_dir):
    cfg = make_cfg("dataset=ton_iot", "dataset.drop_columns=[label]", f"data_dir={data_dir}")
    data = _prepare(cfg)
    assert "ts" in data.notes["audit_flagged"]
    assert "fridge_temperature" not in data.notes["audit_flagged"]


def test_nbaiot_sample_loads_without_its_inverted_label(make_cfg, data_dir):
    data = _prepare(make_cfg("dataset=nbaiot", f"data_dir={data_dir}"))
    assert data.n_features == 115
    assert "Normal" not in data.feature_names
    # Stratified split keeps the 250/3300 attack share on both sides.
    assert abs(data.y_test.mean() - 250 / 3300) < 0.01
    assert abs(data.y_train.mean() - 250 / 3300) < 0.01


def test_scaler_statistics_are_the_training_parts(make_cfg):
    data = _prepare(make_cfg("dataset.n_rows=3000"))
    np.testing.assert_allclose(data.scaler.mean_, data.X_train.mean(axis=0), rtol=1e-4, atol=1e-4)
    pooled = np.vstack([data.X_train, data.X_test]).mean(axis=0)
    assert not np.allclose(data.scaler.mean_, pooled, rtol=1e-6, atol=1e-6)


def test_single_file_split_leaves_no_row_on_both_sides(make_cfg):
    data = _prepare(make_cfg("dataset.n_rows=3000"))
    train_rows = {row.tobytes() for row in data.X_train}
    assert not any(row.tobytes() in train_rows for row in data.X_test)
    assert data.notes["duplicates_shared_train_test"] == 0


def test_bad_numeric_cells_policy():
    train = pd.DataFrame({"x": ["1", "3", "junk", None, "inf", "5"], "proto": list("aabbab")})
    test = pd.DataFrame({"x": ["-inf", "2", "??", "1e308"], "proto": ["a", "zzz", "b", "a"]})
    pre = Preprocessor(categorical=["proto"], log_transform=False).fit(train)
    pre.transform(train)
    out = pre.transform(test)
    # junk, missing, ±inf and values beyond float32 all become the training median of the
    # finite values (1, 3, 5).
    np.testing.assert_array_equal(out[:, 0], [3.0, 2.0, 3.0, 3.0])
    assert np.isfinite(out).all()
    assert pre.feature_names == ["x", "proto=a", "proto=b"]
    # A category unseen in training encodes as all zeros instead of failing.
    np.testing.assert_array_equal(out[1, 1:], [0.0, 0.0])
    # Counted over both transforms: "junk" and "??", None, "inf" and "-inf", 1e308.
    assert pre.cleaned == {"junk_text": 2, "missing": 1, "infinite": 2, "out_of_range": 1}
    assert pre.out_of_range == {"x": 1}
    # On the log scale 1e308 is about 709: a value like any other.
    logged = Preprocessor(categorical=["proto"]).fit(train)
    assert logged.transform(test)[3, 0] == pytest.approx(np.log1p(1e308))
    assert logged.out_of_range == {}


def test_signed_log_keeps_sign_and_order():
    x = np.array([-1000.0, -1.0, 0.0, 1.0, 1e9])
    y = signed_log1p(x)
    assert (np.diff(y) > 0).all() and y[2] == 0 and y[0] == -y[0] * -1 and y[0] < 0
    assert y[-1] < 25


@pytest.mark.parametrize("dataset", ["nsl_kdd", "ton_iot", "nbaiot"])
def test_named_configs_compose(make_cfg, dataset):
    cfg = make_cfg(f"dataset={dataset}")
    assert cfg.dataset.name == dataset
    assert cfg.dataset.label_column


def test_label_spellings_across_train_and_test_files():
    """A class spelt one way in training and another in the test file is caught, and folded."""
    train = pd.DataFrame({"x": range(6), "label": ["normal", "DoS", "neptune"] * 2})
    test = pd.DataFrame({"x": range(3), "label": ["Normal", "dos", "Neptune"]})
    dataset = {"label_column": "label", "normal_value": "normal", "class_map": {"neptune": "DoS"}}
    _, labelled, facts = attach(train, test, dataset, "multiclass")
    assert facts["label_variants"] == {"Normal": 1}
    # 'Neptune' misses the class map (case), so it is a class of its own, like 'dos'.
    assert facts["class_variants"] == {"DoS": 4, "dos": 1}
    assert labelled["_class"].tolist() == ["Normal", "dos", "Neptune"]
    train_, labelled, facts = attach(
        train, test, {**dataset, "label_case": "insensitive"}, "multiclass"
    )
    assert labelled["_class"].tolist() == ["normal", "dos", "dos"]
    assert set(train_["_class"]) == {"normal", "dos"}
    assert facts["label_variants"] == facts["class_variants"] == {}
    assert near_misses(facts, dataset) == []
