"""The generator's CICIoT2023-shaped profile (dataset=synthetic_ciciot); the default unchanged."""

from __future__ import annotations

import hashlib
import tracemalloc

import numpy as np
import pandas as pd
import pytest

from fedad.config import compose
from fedad.data import sources, synthetic
from fedad.data.prepare import prepare
from fedad.errors import FedadError
from fedad.run.validate import validate

FULL_ROWS = 1_048_575
# sha256 of generate()'s frames, computed on main (07a6376) before the profiles existed: the
# README's synthetic-default numbers depend on these frames staying byte for byte the same.
DEFAULT_DIGEST = "007e17dcea0ef0d710e0bf63b5f04ad46d99a66a823d2e98be4805bf06cd2b28"
OTHER_DIGEST = "a985b1e809d0b348ea0747c6afe50af3b48713b256cad6077df2ba0813493965"
OTHER_ARGS = {
    "n_rows": 777,
    "n_sites": 3,
    "attack_share": 0.5,
    "overlap": 0.9,
    "seed": 7,
    "concentration": 2.0,
}


def digest(frame: pd.DataFrame) -> str:
    """Column names, numeric dtypes and bytes, and text values, hashed in column order."""
    h = hashlib.sha256()
    for name in frame.columns:
        column = frame[name]
        h.update(str(name).encode() + b"\x00")
        if pd.api.types.is_numeric_dtype(column.dtype):
            values = column.to_numpy()
            h.update(values.dtype.str.encode())
            h.update(np.ascontiguousarray(values).tobytes())
        else:
            h.update("\x1f".join(column.astype(str).tolist()).encode())
    return h.hexdigest()


def preset(n_rows: int, seed: int = 0) -> pd.DataFrame:
    cfg = compose(["dataset=synthetic_ciciot", f"dataset.n_rows={n_rows}", f"seed={seed}"])
    return sources.load(cfg.dataset, ".", seed).train


def test_the_default_frames_are_byte_identical_to_mains():
    assert digest(synthetic.generate()) == DEFAULT_DIGEST
    assert digest(synthetic.generate(**OTHER_ARGS)) == OTHER_DIGEST
    assert digest(synthetic.generate(**OTHER_ARGS, profile="iot")) == OTHER_DIGEST


def test_the_preset_composes_to_the_seed_shape_and_validates():
    cfg = compose(["dataset=synthetic_ciciot", "task=multiclass"])
    validate(cfg)
    assert cfg.dataset.name == "synthetic" and cfg.dataset.profile == "ciciot"
    assert cfg.dataset.n_rows == FULL_ROWS and cfg.dataset.attack_share == 0.977
    with pytest.raises(FedadError, match=r"dataset\.profile must be one of iot, ciciot, got 'cic'"):
        validate(compose(["dataset=synthetic_ciciot", "dataset.profile=cic"]))


def test_a_small_preset_has_47_numeric_features_and_the_exact_class_counts():
    n = 20_000
    frame = preset(n)
    features = frame.drop(columns=["site", "label"])
    assert features.shape == (n, 47)
    assert (features.dtypes == np.float32).all()
    values = features.to_numpy()
    assert np.isfinite(values).all() and (values >= 0).all()
    indicators = features.filter(regex="^(service|proto)_")
    assert indicators.shape[1] == 11 and set(np.unique(indicators)) <= {0.0, 1.0}
    # At most one named service per flow (none for "other"), never both transports.
    assert features.filter(like="service_").sum(axis=1).max() == 1
    assert (features["proto_tcp"] + features["proto_udp"]).max() == 1

    counts = frame["label"].value_counts()
    n_attack = round(0.977 * n)
    assert counts[synthetic.CICIOT_NORMAL] == n - n_attack
    classes = synthetic.PROFILES["ciciot"].classes
    expected = dict(zip(classes, synthetic.class_counts(n_attack), strict=True))
    assert {c: int(counts.get(c, 0)) for c in classes} == expected
    assert frame["site"].nunique() == 10


def test_the_preset_is_deterministic_for_the_seed():
    a = preset(3_000, seed=5)
    pd.testing.assert_frame_equal(a, preset(3_000, seed=5))
    assert not a.equals(preset(3_000, seed=6))


@pytest.mark.parametrize("n_rows", [1_000, 30_000, 100_000, FULL_ROWS])
def test_the_long_tail_keeps_its_shape_as_the_rows_scale(n_rows):
    n_attack = round(0.977 * n_rows)
    counts = synthetic.class_counts(n_attack)
    shares = synthetic.PROFILES["ciciot"].shares
    assert len(counts) == 33 and counts.sum() == n_attack
    assert np.all(np.diff(counts) <= 0)
    # Largest remainder: each class within one row of its exact share.
    np.testing.assert_array_less(np.abs(counts - n_attack * shares), 1.0)
    # The largest class holds tens of percent of all rows at any size.
    assert 0.1 <= counts[0] / n_rows <= 0.3


def test_the_full_size_preset_has_the_seeds_shape_and_stays_lean():
    tracemalloc.start()
    try:
        frame = preset(FULL_ROWS)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert frame.shape == (FULL_ROWS, 49)
    assert peak < 2**30, f"generating the full preset allocated {peak / 2**20:.0f} MB at its peak"
    counts = frame["label"].value_counts()
    assert len(counts) == 34
    assert counts.drop(synthetic.CICIOT_NORMAL).min() in range(200, 1000)
    assert 0.1 <= counts.max() / FULL_ROWS <= 0.3
    assert (frame["label"] != synthetic.CICIOT_NORMAL).mean() == pytest.approx(0.977, abs=1e-6)


def test_prepare_makes_a_34_class_problem_with_no_giveaway_column():
    cfg = compose(["dataset=synthetic_ciciot", "dataset.n_rows=20000", "task=multiclass"])
    data = prepare(cfg.dataset, cfg.preprocess, cfg.task, ".", 0)
    assert data.n_features == 47 and data.n_classes == 34
    assert data.class_names[0] == "normal"
    assert data.notes["audit_flagged"] == []
    assert data.notes["duplicates_dropped_train"] == 0
