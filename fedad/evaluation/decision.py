"""The decision rule every model of a comparison is scored under: argmax or a calibrated threshold.

A calibrated rule turns a model's attack score (``1 - p(normal)``, or an anomaly score) into
"attack" at a threshold chosen on validation rows, never on test rows: the one that maximizes
macro-F1 (``max_macro_f1``) or the lowest that flags at most ``target_fpr`` of the normal rows
(``target_fpr``). A centralized model chooses it from its own validation scores; a federated
model from counts the sites send (histograms of their validation rows' attack scores on bin
edges the server announces, normal and attack apart), so that no score leaves a site. In a
multiclass task the rule decides attack versus normal, and an attack row's class is the most
probable attack class.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import numpy as np

from fedad.errors import FedadError
from fedad.evaluation.metrics import (
    TABLE_METRICS,
    attack_score,
    compute_metrics,
    threshold_for_fpr,
    tune_threshold,
)

if TYPE_CHECKING:
    from fedad.evaluation.comparison import ModelResult

RULES = ("argmax", "max_macro_f1", "target_fpr")
# Bin edges of a probability's attack score for the sites' histograms: steps of 1/4096 from 0
# to 1, merged with 4,095 edges evenly spaced in log-odds from -16 to 16. A trained model's
# scores crowd near 0 and 1, where a target false-positive rate puts its threshold: there, even
# steps in probability would hold most normal rows in one bin, steps in log-odds stay fine
# (about 1e-7 at 0.99999). A federated threshold lies within one bin of the pooled one.
_LOG_ODDS = 1.0 / (1.0 + np.exp(-np.linspace(-16.0, 16.0, 4095)))
PROBABILITY_EDGES = np.unique(np.concatenate([np.linspace(0.0, 1.0, 4097), _LOG_ODDS]))


@dataclass(frozen=True)
class Rule:
    """A decision rule and, for a calibrated one, the threshold it chose.

    Attributes
    ----------
    rule : str
        One of :data:`RULES`.
    threshold : float or None
        Attack score from which a row is an attack; None for ``argmax``.
    target_fpr : float or None
        The rule's target, for ``target_fpr``.
    """

    rule: str
    threshold: float | None = None
    target_fpr: float | None = None

    def decide(self, scores: np.ndarray) -> np.ndarray:
        """Class codes for ``scores`` (probabilities ``(n, k)`` or 1-D attack scores)."""
        return decide(scores, self.threshold)


# Today's default: every model decides by its most probable class.
ARGMAX = Rule("argmax")


def check_rule(rule: str, target_fpr: float | None) -> None:
    """Raise :class:`FedadError` unless ``rule`` is known and ``target_fpr`` fits it."""
    if rule not in RULES:
        raise FedadError(
            f"decision.rule must be one of {', '.join(RULES)}, got '{rule}'. Set it on the "
            "command line, e.g. decision.rule=target_fpr decision.target_fpr=0.01."
        )
    if rule == "target_fpr" and (target_fpr is None or not 0 < float(target_fpr) < 1):
        raise FedadError(
            f"decision.target_fpr must be a number in (0, 1) with decision.rule=target_fpr, got "
            f"{target_fpr!r}: the share of normal validation rows a detector may flag, e.g. "
            "decision.target_fpr=0.01."
        )


def check_config(cfg_decision: Mapping[str, Any]) -> list[str]:
    """What is wrong with a ``decision`` config: one phrase per problem.

    Every rule applies to every task: in a multiclass task a threshold decides
    attack versus normal (``max_macro_f1`` tunes that decision's macro-F1 on
    validation rows, ``target_fpr`` its FPR), then the row's class is the
    likeliest attack class (:func:`decide`).
    """
    rule, target = cfg_decision.get("rule"), cfg_decision.get("target_fpr")
    if rule not in RULES:
        return [f"decision.rule must be one of {', '.join(RULES)}, got {rule!r}"]
    problems = []
    if rule == "target_fpr" and not (
        isinstance(target, int | float) and not isinstance(target, bool) and 0 < target < 1
    ):
        problems.append(
            f"decision.target_fpr must be a number in (0, 1) with decision.rule=target_fpr, "
            f"got {target!r} (the share of normal validation rows a model may flag)"
        )
    return problems


def threshold_from_scores(
    y_true: np.ndarray, scores: np.ndarray, rule: str, target_fpr: float | None = None
) -> float | None:
    """The threshold ``rule`` chooses on labelled validation rows and their model scores.

    Parameters
    ----------
    y_true : np.ndarray
        True class codes (0 = normal) of validation rows, never test rows.
    scores : np.ndarray
        The model's scores of those rows: probabilities ``(n, k)`` or 1-D attack scores.
    rule : str
        One of :data:`RULES`.
    target_fpr : float, optional
        For ``target_fpr``.

    Returns
    -------
    float or None
        None for ``argmax``.
    """
    check_rule(rule, target_fpr)
    if rule == "argmax":
        return None
    attack = attack_score(scores)
    if rule == "target_fpr":
        return threshold_for_fpr(y_true, attack, float(target_fpr or 0.0))
    return tune_threshold(np.asarray(y_true) != 0, attack)


def threshold_from_counts(
    edges: np.ndarray,
    normal: np.ndarray,
    attack: np.ndarray,
    rule: str,
    target_fpr: float | None = None,
) -> float | None:
    """The threshold ``rule`` chooses from pooled histogram counts of validation attack scores.

    Rows are flagged from a bin edge on: flagging from edge ``j`` flags every row in
    bins ``j`` and above, so the threshold is exact up to one bin's width.

    Parameters
    ----------
    edges : np.ndarray
        ``b + 1`` increasing bin edges.
    normal, attack : np.ndarray
        ``b`` counts each: the normal and the attack rows' scores per bin, summed over sites.
    rule : str
        One of :data:`RULES`.
    target_fpr : float, optional
        For ``target_fpr``.

    Returns
    -------
    float or None
        None for ``argmax``; infinity (nothing flagged) when no row was counted.
    """
    check_rule(rule, target_fpr)
    if rule == "argmax":
        return None
    normal = np.asarray(normal, dtype=np.float64)
    attack = np.asarray(attack, dtype=np.float64)
    if normal.sum() + attack.sum() == 0:
        return float("inf")
    # Rows flagged when flagging from edge j (j = 0 .. b): bins j .. b-1.
    fp = np.concatenate([np.cumsum(normal[::-1])[::-1], [0.0]])
    if rule == "target_fpr":
        allowed = float(target_fpr or 0.0) * normal.sum()
        return float(edges[int(np.argmax(fp <= allowed))])
    tp = np.concatenate([np.cumsum(attack[::-1])[::-1], [0.0]])
    fn, tn = attack.sum() - tp, normal.sum() - fp
    with np.errstate(invalid="ignore", divide="ignore"):
        f1_attack = np.nan_to_num(2 * tp / (2 * tp + fp + fn))
        f1_normal = np.nan_to_num(2 * tn / (2 * tn + fn + fp))
    return float(edges[int(np.argmax(f1_attack + f1_normal))])


def score_counts(
    y_true: np.ndarray, scores: np.ndarray, edges: np.ndarray = PROBABILITY_EDGES
) -> tuple[list[int], list[int]]:
    """A site's share of the protocol: counts of its validation attack scores per bin.

    Parameters
    ----------
    y_true : np.ndarray
        True class codes (0 = normal) of the site's validation rows.
    scores : np.ndarray
        The global model's scores of those rows.
    edges : np.ndarray
        The bin edges the server announced.

    Returns
    -------
    tuple[list[int], list[int]]
        Counts of the normal and of the attack rows, one per bin; scores outside the
        edges count in the first or last bin.
    """
    attack = np.clip(attack_score(scores), edges[0], edges[-1])
    is_attack = np.asarray(y_true) != 0
    counts = [np.histogram(attack[rows], bins=edges)[0] for rows in (~is_attack, is_attack)]
    return counts[0].astype(np.int64).tolist(), counts[1].astype(np.int64).tolist()


def decide(scores: np.ndarray, threshold: float | None) -> np.ndarray:
    """Class codes: the most probable class, or attack-versus-normal at ``threshold``.

    Parameters
    ----------
    scores : np.ndarray
        Class probabilities ``(n, k)`` with class 0 = normal, or 1-D attack scores.
    threshold : float or None
        None: the most probable class (a 1-D score then needs a threshold). Else a
        row is an attack when its attack score reaches it; its class is then the
        most probable attack class (class 1 in a binary task).

    Returns
    -------
    np.ndarray
        ``int64`` class codes.
    """
    scores = np.asarray(scores, dtype=np.float64)
    if threshold is None:
        if scores.ndim == 1:
            # A programming error, not a user's: every anomaly scorer carries its threshold.
            raise ValueError("1-D attack scores need a threshold to become predictions")
        return scores.argmax(axis=1).astype(np.int64)
    flagged = attack_score(scores) >= threshold
    if scores.ndim == 1:
        return flagged.astype(np.int64)
    attack_class = 1 + scores[:, 1:].argmax(axis=1)
    return np.where(flagged, attack_class, 0).astype(np.int64)


def calibrate(
    result: ModelResult,
    threshold: float,
    decision: Rule,
    y_test: np.ndarray,
    class_names: list[str],
) -> None:
    """Score ``result`` under its calibrated ``threshold``, keeping its argmax metrics beside.

    The model decides by the threshold from now on (importance, SHAP and its
    detector follow it); ``info["decision"]`` records the rule and threshold.
    """
    # A Scorer (fedad.evaluation.scorer imports this module, so it is not named here).
    model: Any = result.model
    result.info["argmax"] = {k: result.metrics.get(k) for k in TABLE_METRICS}
    model.threshold = threshold
    scores = cast(np.ndarray, result.scores)
    result.metrics = compute_metrics(y_test, scores, class_names, y_pred=model.decide(scores))
    result.info["decision"] = {
        "rule": decision.rule,
        "target_fpr": decision.target_fpr,
        "threshold": threshold,
        "chosen_on": "validation rows",
    }
