"""The decision rule: thresholds from validation scores and from the sites' histogram counts."""

from __future__ import annotations

import numpy as np
import pytest

from fedad.errors import FedadError
from fedad.evaluation.decision import (
    PROBABILITY_EDGES,
    Rule,
    check_rule,
    decide,
    score_counts,
    threshold_from_counts,
    threshold_from_scores,
)
from fedad.evaluation.metrics import attack_score, compute_metrics


def within_one_bin(threshold: float, below: float, above: float) -> bool:
    """The threshold is a bin edge next to the bin (or the edge) where the pooled rule splits.

    ``below`` is the highest unflagged score, ``above`` the lowest flagged one.
    """
    at = int(np.searchsorted(PROBABILITY_EDGES, threshold))
    lower = PROBABILITY_EDGES[max(at - 1, 0)]
    upper = PROBABILITY_EDGES[min(at + 1, len(PROBABILITY_EDGES) - 1)]
    return bool(lower <= above and upper >= below)


def _validation(seed: int, n: int = 3000, n_classes: int = 2):
    """Labelled rows with class probabilities that rank attacks above normal, imperfectly."""
    rng = np.random.default_rng(seed)
    y = rng.choice(n_classes, size=n, p=[0.6, *([0.4 / (n_classes - 1)] * (n_classes - 1))])
    logits = rng.normal(size=(n, n_classes))
    logits[np.arange(n), y] += 1.5
    p = np.exp(logits)
    return y, p / p.sum(axis=1, keepdims=True)


def _sites(y: np.ndarray, scores: np.ndarray, n_sites: int, seed: int):
    """The rows split among sites, unevenly."""
    order = np.random.default_rng(seed).permutation(len(y))
    cuts = np.sort(np.random.default_rng(seed + 1).choice(len(y), n_sites - 1, replace=False))
    return [(y[part], scores[part]) for part in np.split(order, cuts)]


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize(("rule", "target"), [("max_macro_f1", None), ("target_fpr", 0.05)])
def test_the_sites_counts_give_the_pooled_threshold_within_one_bin(seed, rule, target):
    y, scores = _validation(seed)
    pooled = threshold_from_scores(y, scores, rule, target)
    normal, attack = np.zeros(len(PROBABILITY_EDGES) - 1), np.zeros(len(PROBABILITY_EDGES) - 1)
    for y_site, s_site in _sites(y, scores, 5, seed):
        n, a = score_counts(y_site, s_site)
        normal, attack = normal + n, attack + a
    federated = threshold_from_counts(PROBABILITY_EDGES, normal, attack, rule, target)
    assert pooled is not None and federated is not None
    # The pooled rule splits the scores between its highest unflagged and its lowest flagged
    # one; the counts find that split up to one bin's width.
    attack = attack_score(scores)
    below, above = attack[attack < pooled].max(), attack[attack >= pooled].min()
    assert within_one_bin(federated, below, above)
    if rule == "target_fpr":
        flagged = attack_score(scores)[y == 0] >= federated
        assert flagged.mean() <= target


def test_a_site_sends_counts_only():
    y, scores = _validation(3, n=200)
    normal, attack = score_counts(y, scores)
    assert all(isinstance(c, int) for c in normal + attack)
    assert sum(normal) == int((y == 0).sum()) and sum(attack) == int((y != 0).sum())
    assert len(normal) == len(attack) == len(PROBABILITY_EDGES) - 1


def test_argmax_needs_no_threshold_and_matches_the_most_probable_class():
    y, scores = _validation(4, n_classes=4)
    assert threshold_from_scores(y, scores, "argmax") is None
    np.testing.assert_array_equal(Rule("argmax").decide(scores), scores.argmax(axis=1))


def test_in_multiclass_the_threshold_decides_attack_and_the_class_is_the_likeliest_attack():
    scores = np.array(
        [
            [0.50, 0.10, 0.40],  # attack score 0.5: flagged at 0.3, class 2
            [0.80, 0.15, 0.05],  # 0.2: normal
            [0.30, 0.40, 0.30],  # 0.7: class 1
        ]
    )
    np.testing.assert_array_equal(decide(scores, 0.3), [2, 0, 1])
    np.testing.assert_array_equal(decide(scores, None), [0, 0, 1])


def test_a_calibrated_threshold_lowers_the_false_positives_of_a_shifted_model():
    # A model whose scores drift towards "attack" (as a federated model pulled by attack-heavy
    # sites): argmax flags many normal rows; a target_fpr threshold chosen on validation rows
    # brings the test FPR near its target.
    rng = np.random.default_rng(5)
    y_val, y_test = rng.integers(0, 2, 4000), rng.integers(0, 2, 4000)

    def scores(y):
        attack = np.clip(rng.normal(0.55 + 0.3 * y, 0.12), 0, 1)
        return np.column_stack([1 - attack, attack])

    threshold = threshold_from_scores(y_val, scores(y_val), "target_fpr", 0.05)
    test_scores = scores(y_test)
    names = ["normal", "attack"]
    argmax = compute_metrics(y_test, test_scores, names, y_pred=decide(test_scores, None))
    tuned = compute_metrics(y_test, test_scores, names, y_pred=decide(test_scores, threshold))
    assert argmax["fpr"] > 0.5
    assert tuned["fpr"] == pytest.approx(0.05, abs=0.02)


@pytest.mark.parametrize(
    ("rule", "target", "words"),
    [
        ("median", None, "decision.rule must be one of argmax, max_macro_f1, target_fpr"),
        ("target_fpr", None, "decision.target_fpr must be a number in (0, 1)"),
        ("target_fpr", 1.5, "decision.target_fpr must be a number in (0, 1)"),
        ("target_fpr", 0.0, "decision.target_fpr must be a number in (0, 1)"),
    ],
)
def test_a_bad_rule_is_one_paragraph_naming_the_key(rule, target, words):
    with pytest.raises(FedadError, match=None) as error:
        check_rule(rule, target)
    assert words in str(error.value) and "\n" not in str(error.value)


def _shifted(n: int, seed: int):
    """Mostly attack rows, a shifted mean per class: an argmax model flags many normal rows."""
    from tests.test_twins import prepared

    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.8).astype(np.int64)
    X = y[:, None] * 0.7 + rng.normal(0.0, 1.0, (n, 6))
    return prepared(X, y, 2, seed)


@pytest.mark.parametrize("rule", ["target_fpr", "max_macro_f1"])
def test_every_centralized_model_is_scored_under_the_runs_rule_chosen_on_validation_rows(rule):
    from fedad.baselines.runner import run_baselines
    from fedad.evaluation import comparison
    from fedad.evaluation.decision import Rule

    data = _shifted(1600, 0)
    config = {
        "models": {
            "logistic_regression": {},
            "xgboost": {"n_estimators": 30},
            "isolation_forest": {},
        },
        "val_fraction": 0.25,
    }
    decision = Rule(rule, target_fpr=0.05 if rule == "target_fpr" else None)
    results = run_baselines(config, data, {}, 1, 0, decision=decision)
    _, X_test = data.scaled()
    for r in results:
        model = r.model
        assert model.threshold is not None
        # The metrics are the calibrated decision's, on the test rows.
        y_true = data.y_test if r.kind == "supervised" else (data.y_test != 0).astype(int)
        again = compute_metrics(
            y_true, r.scores, list(data.class_names), y_pred=decide(r.scores, model.threshold)
        )
        assert r.metrics["macro_f1"] == pytest.approx(again["macro_f1"])
        assert r.metrics["fpr"] == pytest.approx(again["fpr"])
        if r.kind == "supervised":
            # Chosen on validation rows: a refit's held-out scores, never the test rows.
            assert r.info["decision"] == {
                "rule": rule,
                "target_fpr": decision.target_fpr,
                "threshold": model.threshold,
                "chosen_on": "validation rows",
            }
            assert set(r.info["argmax"]) >= {"macro_f1", "fpr"}
        else:
            assert r.info["threshold_rule"] == rule
    table = comparison.table(results)
    supervised = table[table["kind"] == "supervised"]
    assert (supervised["decision"] == rule).all()
    assert "Decision rule:" in comparison.to_markdown(table)
    if rule == "target_fpr":
        # The argmax decision of a model trained on 80 % attack rows flags more normal traffic.
        logistic = table.set_index("model").loc["logistic_regression"]
        assert logistic["fpr"] < logistic["argmax_fpr"]


def test_the_argmax_rule_changes_nothing():
    from fedad.baselines.runner import run_baselines

    data = _shifted(800, 1)
    config = {"models": {"logistic_regression": {}}, "val_fraction": 0.25}
    result = run_baselines(config, data, {}, 1, 0)[0]
    assert result.model.threshold is None and "decision" not in result.info
    np.testing.assert_array_equal(result.model.decide(result.scores), result.scores.argmax(axis=1))
