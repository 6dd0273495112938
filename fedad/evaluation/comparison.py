"""The federated-versus-centralized table: one row per model, scored on one test set."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd

from fedad import rundir
from fedad.data.audit import MIN_CLASS_ROWS
from fedad.evaluation import cross_source
from fedad.evaluation.metrics import TABLE_METRICS
from fedad.models.catalog import local_name, model_of

COLUMNS = TABLE_METRICS


# What a result is: the federated model, each site alone, or a centralized baseline.
Kind = Literal["federated", "local", "supervised", "unsupervised"]


@dataclass
class ModelResult:
    """One model's test-set outcome, comparable across federated and central runs.

    Attributes
    ----------
    name : str
        Model name, e.g. ``xgboost`` or ``federated_cnn``.
    kind : Kind
        ``federated``, ``local`` (the sites alone), ``supervised`` or ``unsupervised``.
    metrics : dict
        Output of :func:`fedad.evaluation.metrics.compute_metrics` on the test set
        (binary view for unsupervised models).
    scores : np.ndarray
        Test scores: class probabilities ``(n, n_classes)``, or a 1-D attack
        score for unsupervised models; :func:`fedad.evaluation.metrics.attack_score` turns
        either into the binary ROC view.
    train_seconds : float
        Wall time to fit (including threshold tuning), excluding test scoring.
    model : object
        The fitted model, with ``predict_scores(X)``, ``decide(scores)`` and
        ``predict(X)``; ``.estimator`` is the underlying library model.
    info : dict
        Settings and facts: ``params``, ``binary_view``, unsupervised
        ``method``/``flipped``/``threshold``..., and ``cv`` when enabled.
    """

    name: str
    kind: Kind
    metrics: dict
    scores: np.ndarray | None
    train_seconds: float
    model: object
    info: dict = field(default_factory=dict)


# Shown after COLUMNS when a model has it.
EXTRA = ("attack_success",)
# The price of federation, on each federated row: the gap to its centralized twin (federated
# minus twin; for FPR a positive gap means more false alarms) and the gain over going alone.
GAPS = ("gap_macro_f1", "gap_roc_auc", "gap_fpr", "gain_vs_alone", "gain_vs_worst_site")
# Where the twin is pinned to the federation's own training (a histogram run's pinned XGBoost,
# its gap federation alone), the plain central model beside it and the macro-F1 gap to that one:
# comparison.md says it under the price table, with the part the pins account for.
CENTRAL = ("central", "gap_central_macro_f1")
# The cost of the answer: the round whose global model is the one scored (the best round under
# early stopping, else the last), and the seconds and payload MB spent until it.
KEPT = ("kept_round", "kept_seconds", "kept_mb")
# The cost to reach the twin: the first round whose test macro-F1 comes within REACH of the
# twin's, the seconds and payload MB until then (None: not reached in the run). Each round is
# scored at argmax (no site sends score counts before the final evaluation), so the twin's
# argmax macro-F1 is the target under every decision rule: like is compared with like.
REACH = 0.01
COSTS = (*KEPT, "reach_round", "reach_seconds", "reach_mb")
# The budgets of both sides, so a reader sees they are comparable: the federated rounds run x
# local epochs (XGBoost: the boosting rounds a site adds per round) on the sites' training rows,
# and the federated booster's trees (bagging appends every site's trees each round); the twin's
# epochs run (Keras) or trees (XGBoost: one per class and round above two classes; the
# forest), the rows it fitted on and, when it saw fewer than it was given, its cap.
BUDGETS = (
    "rounds_run",
    "local_epochs",
    "fed_rows",
    "fed_trees",
    "twin_epochs",
    "twin_trees",
    "twin_rows",
    "twin_cap",
)
# Under a calibrated decision rule the metrics are the calibrated ones; these columns keep the
# same models' argmax metrics beside them (the rule and threshold in "decision").
ARGMAX = ("argmax_macro_f1", "argmax_fpr")
DECISION = ("decision", "threshold", *ARGMAX)
# The columns of a comparison a report reads back beside results.json's metrics: numbers, and
# names (each federated row's twin, which the report's gaps are taken against as the
# comparison's are).
NAMES = ("twin",)
REPORTED = (*ARGMAX, *KEPT, "rounds_run", *NAMES)
# The whole-number columns: every budget but the cap's text, and the rounds kept and reached.
COUNTS = (*(b for b in BUDGETS if b != "twin_cap"), "kept_round", "reach_round")


def table(results: Sequence[ModelResult], pooling_mb: float | None = None) -> pd.DataFrame:
    """One row per model result, federated rows first, then the sites alone, then the rest.

    Parameters
    ----------
    results : Sequence[ModelResult]
        Every model of the run. A federated result names its centralized twin
        in ``info["twin"]``, its payload in ``info["mb_exchanged"]``, its
        per-round test macro-F1, cumulative seconds and MB in ``info["curve"]``,
        its rounds run in ``info["stopping"]["rounds_run"]`` (else
        ``info["rounds"]``), its ``info["local_epochs"]`` and the sites'
        training rows ``info["train_rows"]``, a booster's ``info["trees"]``
        (each ``–`` when absent), where its twin is pinned to its own training
        the plain central model in ``info["central"]`` and, under
        DP, its budget in ``info["note"]``; the sites alone are
        ``local_<model>`` (their mean) and ``local_<model>_worst``. The twin's
        ``info`` gives its ``epochs_run`` or ``trees``, ``fit_rows``,
        ``fit_rows_used`` and ``fit_cap``.
    pooling_mb : float, optional
        What pooling the training rows would move (the centralized rows' payload).

    Returns
    -------
    pd.DataFrame
        Columns ``model``, ``kind``, ``federated``, the metrics in
        :data:`COLUMNS` (and ``attack_success`` when a model has it, under a
        targeted attack), ``train_seconds``, ``mb_exchanged``, ``twin``,
        :data:`GAPS`, :data:`CENTRAL`, :data:`COSTS` and :data:`BUDGETS`
        (federated rows only),
        :data:`DECISION` when a model decided by a calibrated rule (its rule,
        threshold and argmax metrics; ``info["decision"]``, ``info["argmax"]``)
        and, when a model has one, ``note`` (``ε = 3.2, δ = 1e-05`` under DP).
    """
    by_name = {r.name: r for r in results}
    # Attack success is defined only for a run under a targeted attack.
    metrics = [*COLUMNS, *(EXTRA if any(EXTRA[0] in r.metrics for r in results) else ())]
    rows = []
    for r in results:
        row = {
            "model": r.name,
            "kind": r.kind,
            "federated": r.kind == "federated",
            **{c: r.metrics.get(c) for c in metrics},
            "train_seconds": round(float(r.train_seconds), 2),
            "mb_exchanged": _payload(r, pooling_mb),
            "note": r.info.get("note"),
            **_decision(r),
        }
        if r.kind == "federated":
            row.update(_gaps(r, by_name))
        rows.append(row)
    notes = ["note"] if any(r.info.get("note") for r in results) else []
    calibrated = list(DECISION) if any(r.info.get("decision") for r in results) else []
    columns = [
        "model",
        "kind",
        "federated",
        *metrics,
        "train_seconds",
        "mb_exchanged",
        "twin",
        *GAPS,
        *CENTRAL,
        *COSTS,
        *BUDGETS,
        *calibrated,
        *notes,
    ]
    frame = pd.DataFrame(rows, columns=columns)
    # Whole numbers stay whole in comparison.csv, blank where unknown.
    frame[list(COUNTS)] = frame[list(COUNTS)].astype("Int64")
    order = frame["kind"].map({"federated": 0, "local": 1}).fillna(2)
    return frame.iloc[order.argsort(kind="stable")].reset_index(drop=True)


def _gaps(fed: ModelResult, by_name: dict[str, ModelResult]) -> dict:
    """The federated row's twin and gaps (None where the other model did not run)."""
    twin = by_name.get(fed.info.get("twin", ""))
    alone = by_name.get(local_name(model_of(fed.name)))
    worst = by_name.get(local_name(model_of(fed.name), worst=True))
    central = by_name.get(fed.info.get("central", ""))

    def minus(other: ModelResult | None, metric: str) -> float | None:
        if other is None or fed.metrics.get(metric) is None or other.metrics.get(metric) is None:
            return None
        return float(fed.metrics[metric]) - float(other.metrics[metric])

    return {
        "twin": twin.name if twin else fed.info.get("twin"),
        **_reach(fed, twin),
        "gap_macro_f1": minus(twin, "macro_f1"),
        "gap_roc_auc": minus(twin, "roc_auc"),
        "gap_fpr": minus(twin, "fpr"),
        "gain_vs_alone": minus(alone, "macro_f1"),
        "gain_vs_worst_site": minus(worst, "macro_f1"),
        "central": central.name if central else None,
        "gap_central_macro_f1": minus(central, "macro_f1"),
        **_budgets(fed, twin),
    }


def _decision(result: ModelResult) -> dict:
    """A model's :data:`DECISION` cells: its calibrated rule, threshold and argmax metrics."""
    decision = result.info.get("decision") or {}
    argmax = result.info.get("argmax") or {}
    return {
        "decision": decision.get("rule"),
        "threshold": decision.get("threshold"),
        "argmax_macro_f1": argmax.get("macro_f1"),
        "argmax_fpr": argmax.get("fpr"),
    }


def _budgets(fed: ModelResult, twin: ModelResult | None) -> dict:
    """The federated row's :data:`BUDGETS`: what each side trained for, and on how many rows."""
    stopping = fed.info.get("stopping") or {}
    of_twin = twin.info if twin is not None else {}
    used, given = of_twin.get("fit_rows_used"), of_twin.get("fit_rows")
    capped = used is not None and given is not None and used < given
    cap = of_twin.get("fit_cap") or {}
    return {
        "rounds_run": stopping.get("rounds_run", fed.info.get("rounds")),
        "local_epochs": fed.info.get("local_epochs"),
        "fed_rows": fed.info.get("train_rows"),
        "fed_trees": fed.info.get("trees"),
        "twin_epochs": of_twin.get("epochs_run"),
        "twin_trees": of_twin.get("trees"),
        "twin_rows": used,
        "twin_cap": (f"{cap['rows']} ({cap['why']})" if cap else "capped") if capped else None,
    }


def _payload(result: ModelResult, pooling_mb: float | None) -> float | None:
    """MB a model moved: the federated payload, nothing alone, the pooled rows centrally."""
    if result.kind == "federated":
        return result.info.get("mb_exchanged")
    return 0.0 if result.kind == "local" else pooling_mb


def _reach(fed: ModelResult, twin: ModelResult | None) -> dict[str, float | None]:
    """:data:`COSTS`: the kept round, and the first round within :data:`REACH` of the twin."""
    curve = fed.info.get("curve")
    costs: dict[str, float | None] = dict.fromkeys(COSTS)
    if not curve:
        return costs
    kept = (fed.info.get("stopping") or {}).get("best_round", curve["round"][-1])
    if kept in curve["round"]:
        i = curve["round"].index(kept)
        costs.update(zip(KEPT, (kept, curve["seconds"][i], curve["mb"][i]), strict=True))
    argmax = (twin.info.get("argmax") or twin.metrics) if twin is not None else {}
    target = argmax.get("macro_f1")
    if target is None:
        return costs
    for i, value in enumerate(curve["macro_f1"]):
        if value is not None and value >= target - REACH:
            reached = (curve["round"][i], curve["seconds"][i], curve["mb"][i])
            costs.update(zip(COSTS[len(KEPT) :], reached, strict=True))
            break
    return costs


def to_markdown(frame: pd.DataFrame, small_classes: Mapping[str, int] | None = None) -> str:
    """Render the table as GitHub markdown: federated rows carry a ★, then their price.

    Parameters
    ----------
    frame : pd.DataFrame
        From :func:`table`. A row's ``note`` (its privacy budget) follows its
        name: ``★ federated_cnn (ε = 3.2, δ = 1e-05)``.
    small_classes : Mapping[str, int], optional
        Test classes with few rows (see :func:`fedad.data.audit.small_classes`),
        flagged under the table.

    Returns
    -------
    str
    """
    notes = frame["note"] if "note" in frame else pd.Series([None] * len(frame))
    shown = frame.drop(
        columns=["federated", "twin", *GAPS, *CENTRAL, *COSTS, *BUDGETS, *DECISION, "note"],
        errors="ignore",
    )
    shown = shown.copy()
    shown["model"] = [
        ("★ " if f else "") + m + (f" ({n})" if isinstance(n, str) and n else "")
        for m, f, n in zip(frame["model"], frame["federated"], notes, strict=True)
    ]
    text = _markdown(shown) + "\n★ federated model\n"
    if small_classes:
        counts = ", ".join(f"{name} ({n})" for name, n in small_classes.items())
        text += (
            f"\n⚠ few test rows: {counts}, below {MIN_CLASS_ROWS}. Those classes' scores, and "
            "the macro averages over them, rest on few rows.\n"
        )
    price = frame.loc[frame["federated"], ["model", "twin", *GAPS, *COSTS]]
    if len(price):
        text += (
            "\nThe price of federation: federated minus its centralized twin, each under the "
            "decision rule of the table above; gains over each site training alone, on average "
            "and for the worst site; the cost of the answer (kept: the round whose model is "
            "scored, the seconds and payload MB until it); and the round, seconds and MB until "
            f"the test macro-F1 first came within {REACH} of the twin's (both at argmax, as "
            "every round is scored; – : not reached). MB exchanged: the federated model's "
            "payload (model arrays, metrics and configs, both ways); centrally, the training "
            "rows pooling would move (float32 features plus int32 labels).\n\n"
            + _markdown(price)
            + _central_notes(frame.loc[frame["federated"]])
        )
    budgets = frame.loc[frame["federated"], ["model", "twin", *BUDGETS]]
    if len(budgets) and "rounds_run" in frame:
        text += (
            "\nBudgets of both sides: the federated model's rounds run × local epochs (XGBoost: "
            "boosting rounds a site adds per round) on its sites' training rows, and its trees "
            "(XGBoost; bagging appends every site's trees each round); the twin's epochs run "
            "(Keras) or trees (XGBoost: one per class and round above two classes) on the rows "
            "it fitted on, and its cap when it saw fewer rows than it was given.\n\n"
            + _markdown(budgets)
            + _capped_notes(budgets)
        )
    if "decision" in frame:
        decided = frame.loc[frame["decision"].notna(), ["model", *DECISION]]
        text += (
            "\nDecision rule: the metrics above are those of each model's calibrated decision, "
            "its attack threshold chosen on validation rows only (never test rows; a federated "
            "model's from counts its sites sent); the same models' argmax metrics beside.\n\n"
            + _markdown(decided)
        )
    return text


def _central_notes(federated: pd.DataFrame) -> str:
    """One line per federated model whose twin is pinned: the gap to the plain central model."""
    notes = ""
    for row in federated.itertuples(index=False):
        if not isinstance(row.central, str) or pd.isna(row.gap_central_macro_f1):
            continue
        gap = float(row.gap_central_macro_f1)
        federation = None if pd.isna(row.gap_macro_f1) else float(row.gap_macro_f1)
        split = (
            ""
            if federation is None
            else f": {federation:+.4f} federation (the gap to {row.twin}) and "
            f"{gap - federation:+.4f} what pinning the twin changes (the run's bin edges, the "
            f"sites' training rows, the federated boosting rounds, against {row.central}'s own "
            "edges, every training row and its own budget)"
        )
        notes += (
            f"\n{row.model}'s twin {row.twin} is trained as the federation was (the sites' "
            "training rows pooled, the run's bin edges pinned, pooled class weights, the same "
            f"boosting rounds), so its gap measures federation alone. Against the unpinned "
            f"central {row.central}, the macro-F1 gap is {gap:+.4f}{split}.\n"
        )
    return notes


def _capped_notes(budgets: pd.DataFrame) -> str:
    """One warning per federated model whose gap is computed against a capped twin."""
    notes = ""
    for row in budgets.itertuples(index=False):
        if not isinstance(row.twin_cap, str):
            continue
        fed_rows = "–" if pd.isna(row.fed_rows) else f"{int(row.fed_rows):,}"
        notes += (
            f"\n⚠ {row.model}: the gap is computed against a capped reference: its twin "
            f"{row.twin} fitted on {int(row.twin_rows):,} training rows, capped at {row.twin_cap}; "
            f"the federation's sites trained on {fed_rows}. "
            f"baselines.models.{row.twin}.max_fit_rows=null lifts the cap.\n"
        )
    return notes


def _markdown(frame: pd.DataFrame) -> str:
    header = "| " + " | ".join(frame.columns) + " |"
    kinds = ("model", "kind", "twin", "twin_cap", "decision")
    rule = "|" + "|".join("---" if c in kinds else "---:" for c in frame.columns) + "|"
    lines = [header, rule]
    for row in frame.itertuples(index=False):
        lines.append("| " + " | ".join(_cell(v) for v in row) + " |")
    return "\n".join(lines) + "\n"


def write(
    frame: pd.DataFrame, run_dir: Path, small_classes: Mapping[str, int] | None = None
) -> None:
    """Write ``comparison.csv`` and ``comparison.md`` (see :func:`to_markdown`) into ``run_dir``.

    ``comparison.md`` ends with the cross-source matrix of a federation of
    sources when the run wrote one (``cross_source.csv``), and a pointer to the
    run's fairness audit of the sites when there is one (``sites.md``, written
    with the sites alone).
    """
    rundir.write_text(run_dir / rundir.COMPARISON_CSV, frame.to_csv(index=False))
    text = to_markdown(frame, small_classes) + cross_source.section(run_dir)
    if (run_dir / rundir.SITES_FILE).is_file():
        text += (
            f"\nEvery site on its own test slice (the global model, each personal model, the "
            f"site alone; the worst site, the 10th percentile, the spread): {rundir.SITES_FILE}.\n"
        )
    rundir.write_text(run_dir / rundir.COMPARISON_MD, text)


def _cell(value: object) -> str:
    if value is None or value is pd.NA or (isinstance(value, float) and value != value):
        return "–"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float):
        if value and abs(value) < 1e-3:
            # A small threshold keeps its magnitude: 1.0e-06, never 0.0000.
            return f"{value:.1e}"
        return f"{value:.4f}" if abs(value) < 10 else f"{value:.1f}"
    return str(value)
