"""The federated-versus-centralized table: one row per model, scored on one test set."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pandas as pd

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


def table(results: Sequence) -> pd.DataFrame:
    """One row per model result, federated rows first and marked.

    Parameters
    ----------
    results : Sequence
        Objects with ``name``, ``kind``, ``metrics`` and ``train_seconds``
        (``fedad.baselines.runner.ModelResult``).

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


def to_markdown(frame: pd.DataFrame) -> str:
    """Render the table as GitHub markdown; federated rows carry a ★."""
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
    return "\n".join(lines) + "\n\n★ federated model\n"


def write(frame: pd.DataFrame, run_dir: Path) -> None:
    """Write ``comparison.csv`` and ``comparison.md`` into ``run_dir``."""
    frame.to_csv(run_dir / "comparison.csv", index=False)
    (run_dir / "comparison.md").write_text(to_markdown(frame))


def _cell(value: object) -> str:
    if value is None or (isinstance(value, float) and value != value):
        return "–"
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 10 else f"{value:.1f}"
    return str(value)
