"""The federated-versus-centralized table: one row per model, scored on one test set."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from fedad import rundir
from fedad.metrics import MIN_CLASS_ROWS

COLUMNS = (
    "accuracy",
    "precision",
    "recall",
    "f1",
    "macro_f1",
    "roc_auc",
    "pr_auc",
    "fpr",
)


@dataclass
class ModelResult:
    """One model's test-set outcome, comparable across federated and central runs.

    Attributes
    ----------
    name : str
        Model name, e.g. ``xgboost`` or ``federated_cnn``.
    kind : str
        ``supervised``, ``unsupervised`` or ``federated``.
    metrics : dict
        Output of :func:`fedad.metrics.compute_metrics` on the test set
        (binary view for unsupervised models).
    scores : np.ndarray
        Test scores: class probabilities ``(n, n_classes)``, or a 1-D attack
        score for unsupervised models; :func:`fedad.metrics.attack_score` turns
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
    kind: str
    metrics: dict
    scores: np.ndarray
    train_seconds: float
    model: object
    info: dict = field(default_factory=dict)


def table(results: Sequence[ModelResult]) -> pd.DataFrame:
    """One row per model result, federated rows first and marked.

    Parameters
    ----------
    results : Sequence[ModelResult]
        Every model of the run.

    Returns
    -------
    pd.DataFrame
        Columns ``model``, ``kind``, ``federated``, the metrics in
        :data:`COLUMNS` and ``train_seconds``.
    """
    rows = [
        {
            "model": r.name,
            "kind": r.kind,
            "federated": r.kind == "federated",
            **{c: r.metrics.get(c) for c in COLUMNS},
            "train_seconds": round(float(r.train_seconds), 2),
        }
        for r in results
    ]
    frame = pd.DataFrame(rows, columns=["model", "kind", "federated", *COLUMNS, "train_seconds"])
    return frame.sort_values("federated", ascending=False, kind="stable", ignore_index=True)


def to_markdown(frame: pd.DataFrame, small_classes: Mapping[str, int] | None = None) -> str:
    """Render the table as GitHub markdown; federated rows carry a ★.

    Parameters
    ----------
    frame : pd.DataFrame
        From :func:`table`.
    small_classes : Mapping[str, int], optional
        Test classes with few rows (see :func:`fedad.metrics.small_classes`),
        flagged under the table.

    Returns
    -------
    str
    """
    shown = frame.drop(columns=["federated"]).copy()
    shown["model"] = [
        f"★ {m}" if f else m for m, f in zip(frame["model"], frame["federated"], strict=True)
    ]
    header = "| " + " | ".join(shown.columns) + " |"
    rule = "|" + "|".join("---" if c in ("model", "kind") else "---:" for c in shown.columns) + "|"
    lines = [header, rule]
    for row in shown.itertuples(index=False):
        cells = [_cell(v) for v in row]
        lines.append("| " + " | ".join(cells) + " |")
    text = "\n".join(lines) + "\n\n★ federated model\n"
    if small_classes:
        counts = ", ".join(f"{name} ({n})" for name, n in small_classes.items())
        text += (
            f"\n⚠ few test rows: {counts}, below {MIN_CLASS_ROWS}. Those classes' scores, and "
            "the macro averages over them, rest on few rows.\n"
        )
    return text


def write(
    frame: pd.DataFrame, run_dir: Path, small_classes: Mapping[str, int] | None = None
) -> None:
    """Write ``comparison.csv`` and ``comparison.md`` (see :func:`to_markdown`) into ``run_dir``."""
    rundir.write_text(run_dir / rundir.COMPARISON_CSV, frame.to_csv(index=False))
    rundir.write_text(run_dir / rundir.COMPARISON_MD, to_markdown(frame, small_classes))


def _cell(value: object) -> str:
    if value is None or (isinstance(value, float) and value != value):
        return "–"
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 10 else f"{value:.1f}"
    return str(value)
