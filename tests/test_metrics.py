"""Hand-checkable cases for fedad.evaluation.metrics."""

from __future__ import annotations

import json

import numpy as np
import pytest
from sklearn.metrics import f1_score

from fedad.data.audit import MIN_CLASS_ROWS, small_classes
from fedad.errors import FedadError
from fedad.evaluation.metrics import attack_score, compute_metrics, macro_f1, tune_threshold

BINARY = ["normal", "attack"]


def one_hot(codes: np.ndarray, n_classes: int) -> np.ndarray:
    return np.eye(n_classes)[codes]


def test_binary_confusion_by_hand():
    # 3 normal rows (1 flagged), 5 attack rows (1 missed): confusion [[2, 1], [1, 4]].
    y = np.array([0, 0, 0, 1, 1, 1, 1, 1])
    pred = np.array([0, 1, 0, 1, 1, 0, 1, 1])
    m = compute_metrics(y, one_hot(pred, 2), BINARY)
    assert m["confusion"] == [[2, 1], [1, 4]]
    assert m["n"] == 8
    assert m["accuracy"] == pytest.approx(6 / 8)
    assert m["precision"] == pytest.approx(4 / 5)
    assert m["recall"] == pytest.approx(4 / 5)
    assert m["f1"] == pytest.approx(0.8)
    # Normal-class F1 = 2*2 / (2*2 + 1 + 1) = 2/3.
    assert m["macro_f1"] == pytest.approx((0.8 + 2 / 3) / 2)
    assert m["weighted_f1"] == pytest.approx((3 * 2 / 3 + 5 * 0.8) / 8)
    assert m["fpr"] == pytest.approx(1 / 3)
    assert m["per_class_recall"] == pytest.approx({"normal": 2 / 3, "attack": 0.8})
    json.dumps(m)


def test_perfect_predictor_scores_one():
    y = np.array([0, 1, 1, 0, 1, 1])
    m = compute_metrics(y, one_hot(y, 2), BINARY)
    for key in ("accuracy", "precision", "recall", "f1", "macro_f1", "weighted_f1"):
        assert m[key] == 1.0
    assert m["roc_auc"] == 1.0
    assert m["pr_auc"] == 1.0
    assert m["fpr"] == 0.0


def test_fpr_counts_only_normal_rows():
    names = ["normal", "dos", "probe"]
    y = np.array([0, 0, 0, 0, 1, 1, 2, 2])
    # One normal row called "probe"; attacks confused with each other do not count.
    pred = np.array([0, 0, 0, 2, 2, 2, 1, 1])
    m = compute_metrics(y, one_hot(pred, 3), names)
    assert m["fpr"] == pytest.approx(1 / 4)
    assert m["per_class_recall"] == {"normal": 0.75, "dos": 0.0, "probe": 0.0}


def test_macro_and_weighted_f1_differ_when_imbalanced():
    names = ["normal", "dos", "rare"]
    y = np.array([0] * 2 + [1] * 8 + [2] * 2)
    pred = y.copy()
    pred[-2:] = 1  # the rare class is always missed
    m = compute_metrics(y, one_hot(pred, 3), names)
    f1_dos = 2 * 8 / (2 * 8 + 2)  # 8 hits, 2 false alarms
    assert m["macro_f1"] == pytest.approx((1.0 + f1_dos + 0.0) / 3)
    assert m["weighted_f1"] == pytest.approx((2 * 1.0 + 8 * f1_dos) / 12)
    assert m["f1"] == m["macro_f1"]
    assert m["weighted_f1"] > m["macro_f1"]


def test_undefined_metrics_are_none():
    y = np.zeros(5, dtype=int)  # only normal rows
    probs = np.tile([0.9, 0.1], (5, 1))
    m = compute_metrics(y, probs, BINARY)
    assert m["roc_auc"] is None and m["pr_auc"] is None
    assert m["precision"] is None  # nothing flagged
    assert m["recall"] is None  # no attacks to find
    assert m["per_class_recall"]["attack"] is None
    assert m["fpr"] == 0.0
    json.dumps(m)

    multi = compute_metrics(np.full(4, 2), np.full((4, 3), 1 / 3), ["n", "a", "b"])
    assert multi["roc_auc"] is None and multi["fpr"] is None


def test_multiclass_auc_is_macro_over_present_classes():
    names = ["normal", "a", "b", "unseen"]
    y = np.array([0, 0, 1, 1, 2, 2])
    probs = one_hot(y, 4) * 0.7 + 0.075
    m = compute_metrics(y, probs, names)
    assert m["roc_auc"] == 1.0
    assert m["pr_auc"] == 1.0
    assert m["per_class_recall"]["unseen"] is None


def test_one_dimensional_scores():
    y = np.array([0, 0, 1, 1])
    s = np.array([0.1, 0.6, 0.4, 0.9])
    m = compute_metrics(y, s, BINARY)  # default threshold 0.5
    assert m["confusion"] == [[1, 1], [1, 1]]
    assert m["roc_auc"] == pytest.approx(0.75)
    tuned = compute_metrics(y, s, BINARY, y_pred=(s >= 0.3).astype(int))
    assert tuned["confusion"] == [[1, 1], [0, 2]]
    with pytest.raises(ValueError):
        compute_metrics(np.array([0, 1, 2]), np.zeros(3), ["n", "a", "b"])


def test_attack_score():
    probs = np.array([[0.8, 0.1, 0.1], [0.2, 0.5, 0.3]])
    assert attack_score(probs) == pytest.approx([0.2, 0.8])
    assert attack_score(np.array([3.0, -1.0])) == pytest.approx([3.0, -1.0])


def test_tune_threshold_separates_and_refuses_one_class():
    y = np.array([0, 0, 0, 1, 1, 1])
    s = np.array([0.1, 0.2, 0.3, 0.7, 0.8, 0.9])
    t = tune_threshold(y, s)
    assert 0.3 < t <= 0.7
    assert np.array_equal(s >= t, y == 1)
    # A shifted score scale: the threshold follows the data, not a fixed 0.5.
    t2 = tune_threshold(y, s * 10 - 20)
    assert np.array_equal(s * 10 - 20 >= t2, y == 1)
    with pytest.raises(FedadError):
        tune_threshold(np.ones(3), np.array([0.1, 0.2, 0.3]))


# --- macro averages over the classes the test rows hold --------------------------------------


def test_two_models_on_a_one_class_slice_are_averaged_over_the_same_classes():
    """The bug: 1.000 for one model, 0.43 for another, on the same 4 attack rows.

    Averaging over the labels a model predicts scored the model that called one row
    normal on two classes (its normal-class F1 is 0) and the perfect one on one.
    scikit-learn's default and ``labels=range(n), zero_division=nan`` both do so; fedad
    averages over the classes the rows hold, so one error costs what it costs.
    """
    y = np.array([1, 1, 1, 1])
    perfect, one_miss = np.array([1, 1, 1, 1]), np.array([1, 1, 1, 0])
    attack_f1 = 2 * 3 / (2 * 3 + 1)  # 3 hits, 1 missed
    for average in ({}, {"labels": [0, 1], "zero_division": np.nan}):
        assert f1_score(y, one_miss, average="macro", **average) == pytest.approx(attack_f1 / 2)
    a = compute_metrics(y, one_hot(perfect, 2), BINARY)
    b = compute_metrics(y, one_hot(one_miss, 2), BINARY)
    assert a["macro_f1"] == 1.0
    assert b["macro_f1"] == pytest.approx(attack_f1) == pytest.approx(b["f1"])
    assert a["classes_scored"] == b["classes_scored"] == 1
    assert a["weighted_f1"] == 1.0 and b["weighted_f1"] == pytest.approx(attack_f1)


def test_one_row_slice():
    y = np.array([1])
    right = compute_metrics(y, one_hot(np.array([1]), 2), BINARY)
    wrong = compute_metrics(y, one_hot(np.array([0]), 2), BINARY)
    assert (right["macro_f1"], wrong["macro_f1"]) == (1.0, 0.0)
    assert right["classes_scored"] == wrong["classes_scored"] == 1


def test_a_predicted_absent_class_costs_through_the_rows_it_took():
    names = ["normal", "dos", "probe", "u2r"]
    y = np.array([0, 0, 0, 0, 1, 1, 1, 1])  # probe and u2r hold no test row
    clean = compute_metrics(y, one_hot(y, 4), names)
    # Two dos rows called probe: dos recall 1/2, F1 2/3; probe is not averaged in.
    pred = np.array([0, 0, 0, 0, 1, 1, 2, 2])
    m = compute_metrics(y, one_hot(pred, 4), names)
    assert clean["macro_f1"] == 1.0
    assert m["macro_f1"] == pytest.approx((1.0 + 2 / 3) / 2)
    assert m["recall"] == pytest.approx((1.0 + 0.5) / 2)
    assert m["precision"] == pytest.approx(1.0)
    assert m["classes_scored"] == clean["classes_scored"] == 2
    assert macro_f1(y, pred, 4) == m["macro_f1"]
    assert macro_f1(np.array([], dtype=int), np.array([], dtype=int), 4) is None


def test_small_classes_lists_the_classes_below_the_count():
    y = np.array([0] * 50 + [1] * (MIN_CLASS_ROWS - 1) + [2] * MIN_CLASS_ROWS)
    assert small_classes(y, ["normal", "dos", "probe", "u2r"]) == {
        "dos": MIN_CLASS_ROWS - 1,
        "u2r": 0,
    }
