"""Tests for the built-in synthetic IoT traffic generator."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from sklearn.ensemble import RandomForestClassifier
from sklearn.metrics import f1_score
from sklearn.model_selection import train_test_split

from fedad.data.synthetic import FAMILIES, generate
from fedad.errors import FedadError

META = ["site", "device"]
LABELS = ["attack_type", "is_attack"]


@pytest.fixture(scope="module")
def flows() -> pd.DataFrame:
    return generate(n_rows=10000, seed=0)


def test_same_seed_same_frame_other_seed_differs():
    a = generate(n_rows=2000, seed=7)
    pd.testing.assert_frame_equal(a, generate(n_rows=2000, seed=7))
    assert not a.equals(generate(n_rows=2000, seed=8))


@pytest.mark.parametrize("share", [0.84, 0.5, 0.1])
def test_attack_share_holds(share):
    df = generate(n_rows=10000, attack_share=share, seed=1)
    assert abs(df["is_attack"].mean() - share) <= 0.01
    assert ((df["attack_type"] != "normal") == df["is_attack"].astype(bool)).all()


def test_columns(flows):
    numeric = flows.drop(columns=LABELS).select_dtypes("number")
    assert numeric.shape[1] >= 30
    assert np.isfinite(numeric.to_numpy()).all()
    assert (numeric >= 0).all().all()
    for column in ["protocol", "service", *META]:
        assert column in flows.columns
    assert set(flows["protocol"]) <= {"tcp", "udp", "icmp", "mqtt", "coap"}
    assert flows["site"].str.fullmatch(r"site_\d\d").all()
    assert set(FAMILIES) <= set(flows["attack_type"])
    assert len(flows) == 10000 and len(flows.columns) == len(set(flows.columns))


def test_derived_features_consistent(flows):
    assert (flows["total_packets"] == flows["fwd_packets"] + flows["bwd_packets"]).all()
    rate = (flows["fwd_bytes"] + flows["bwd_bytes"]) / flows["duration"]
    np.testing.assert_allclose(flows["bytes_per_s"], rate)
    assert (flows["iat_min"] <= flows["iat_mean"]).all()
    assert (flows["iat_max"] <= flows["duration"] + 1e-12).all()
    no_tcp = ~flows["protocol"].isin(["tcp", "mqtt"])
    assert (flows.loc[no_tcp, ["syn_count", "ack_count", "init_win_fwd"]] == 0).all().all()


def test_sites_are_non_iid(flows):
    attacks = flows[flows["is_attack"] == 1]
    mix = pd.crosstab(attacks["site"], attacks["attack_type"], normalize="index").to_numpy()
    # Total variation distance between every pair of site family distributions.
    tv = 0.5 * np.abs(mix[:, None, :] - mix[None, :, :]).sum(axis=2)
    assert tv.max() > 0.2
    share = flows.groupby("site")["is_attack"].mean()
    assert share.max() - share.min() > 0.1


def test_overlap_keeps_detection_imperfect(flows):
    X = pd.get_dummies(flows.drop(columns=META + LABELS), columns=["protocol", "service"])
    y = flows["is_attack"].to_numpy()
    X_tr, X_te, y_tr, y_te = train_test_split(X, y, test_size=0.25, stratify=y, random_state=0)
    model = RandomForestClassifier(n_estimators=50, random_state=0, n_jobs=1).fit(X_tr, y_tr)
    score = f1_score(y_te, model.predict(X_te), average="macro")
    assert 0.80 <= score <= 0.995


@pytest.mark.parametrize(
    "kwargs",
    [
        {"n_rows": 0},
        {"n_rows": 10.5},
        {"n_sites": 0},
        {"attack_share": 1.0},
        {"attack_share": -0.1},
        {"overlap": 1.5},
        {"overlap": float("nan")},
        {"concentration": 0.0},
    ],
)
def test_bad_arguments_raise(kwargs):
    name, value = next(iter(kwargs.items()))
    with pytest.raises(FedadError, match=name) as info:
        generate(**kwargs)
    assert repr(value) in str(info.value)


def test_edge_sizes():
    assert len(generate(n_rows=1)) == 1
    assert generate(n_rows=500, attack_share=0.0)["is_attack"].sum() == 0
    assert generate(n_rows=50, n_sites=100)["site"].nunique() <= 50
