"""The cross-source matrix: every detector on each source's test rows, from saved predictions."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pandas as pd

from fedad import rundir
from fedad.evaluation.metrics import macro_f1

# Columns of the predictions file before one column per detector (its attack flag, 0 or 1).
ROW = ("source", "class", "attack")
# What a detector of the matrix was trained on, besides one source's name (a source alone).
FEDERATED, POOLED = "federation", "pooled"
# A detector trained on one source's training rows alone is named alone_<source>.
ALONE = "alone_"
RECALL = "recall_"


def alone_name(source: str) -> str:
    """The matrix's name of the detector trained on ``source``'s training rows alone."""
    return f"{ALONE}{source}"


def predictions(
    sources: np.ndarray,
    classes: np.ndarray,
    attack: np.ndarray,
    flags: Mapping[str, np.ndarray],
) -> pd.DataFrame:
    """One row per test row: its source, class, truth and every detector's attack flag.

    Parameters
    ----------
    sources : np.ndarray
        Each test row's source.
    classes : np.ndarray
        Each test row's class name (its attack type; ``normal`` for normal rows).
    attack : np.ndarray
        Each test row's truth: 1 = attack.
    flags : Mapping[str, np.ndarray]
        Each detector's decision on every test row, under the run's decision
        rule: 1 = flagged as an attack (any attack class, in multiclass).

    Returns
    -------
    pd.DataFrame
        Columns :data:`ROW`, then one per detector.
    """
    frame = pd.DataFrame(
        {"source": sources, "class": classes, "attack": np.asarray(attack).astype(np.int64)}
    )
    for name, flagged in flags.items():
        frame[name] = (np.asarray(flagged) != 0).astype(np.int64)
    return frame


def matrix(frame: pd.DataFrame, trained_on: Mapping[str, str]) -> pd.DataFrame:
    """Each source's test rows scored by each detector: macro-F1, FPR and recall per attack class.

    The view is binary (attack versus normal): macro-F1 over the two classes
    present, FPR the share of normal rows flagged, and each attack class's
    recall the share of its rows flagged as an attack (blank where the source
    has no row of that class). In a multiclass run the classes are the union
    of the sources' classes, and a row counts as detected when flagged as any
    attack.

    Parameters
    ----------
    frame : pd.DataFrame
        From :func:`predictions` (or the predictions file read back).
    trained_on : Mapping[str, str]
        Each detector's training rows: a source's name (that source alone),
        :data:`FEDERATED` or :data:`POOLED`; the order of the matrix's rows.

    Returns
    -------
    pd.DataFrame
        One row per test source and detector: ``test_source``, ``model``,
        ``trained_on``, ``own`` (trained on that source's rows, alone or
        among others), ``rows``, ``attack_rows``, ``macro_f1``, ``fpr``, then
        ``recall_<class>`` for every attack class of any source.
    """
    attacks = sorted(set(frame.loc[frame["attack"] == 1, "class"].astype(str)))
    rows = []
    for source, own in frame.groupby("source", sort=False):
        truth = own["attack"].to_numpy()
        kinds = own["class"].astype(str).to_numpy()
        for model, where in trained_on.items():
            flagged = own[model].to_numpy()
            row = {
                "test_source": source,
                "model": model,
                "trained_on": where,
                "own": where in (source, FEDERATED, POOLED),
                "rows": len(own),
                "attack_rows": int(truth.sum()),
                "macro_f1": macro_f1(truth, flagged, 2),
                "fpr": float(flagged[truth == 0].mean()) if (truth == 0).any() else None,
            }
            for name in attacks:
                hit = flagged[kinds == name]
                row[RECALL + name] = float(hit.mean()) if len(hit) else None
            rows.append(row)
    return pd.DataFrame(rows)


def write(run_dir: Path, frame: pd.DataFrame, trained_on: Mapping[str, str]) -> dict:
    """Write the predictions and the matrix into ``run_dir``; what ``results.json`` records.

    Parameters
    ----------
    run_dir : Path
        The run folder.
    frame : pd.DataFrame
        From :func:`predictions`.
    trained_on : Mapping[str, str]
        As for :func:`matrix`.

    Returns
    -------
    dict
        ``file``, ``predictions`` (the file names) and ``models`` (``trained_on``).
    """
    rundir.write_text(run_dir / rundir.CROSS_SOURCE_PREDICTIONS, frame.to_csv(index=False))
    table = matrix(frame, trained_on)
    rundir.write_text(run_dir / rundir.CROSS_SOURCE_CSV, table.to_csv(index=False))
    return {
        "file": rundir.CROSS_SOURCE_CSV,
        "predictions": rundir.CROSS_SOURCE_PREDICTIONS,
        "models": dict(trained_on),
    }


def to_markdown(table: pd.DataFrame) -> str:
    """The matrix as one table per test source, the attack classes that source holds as columns.

    Parameters
    ----------
    table : pd.DataFrame
        From :func:`matrix` (or ``cross_source.csv`` read back).

    Returns
    -------
    str
    """
    text = (
        "\n## Across sources\n\nEach source's own test rows (split from its rows alone; the "
        "run's test set is their union), scored by the detector trained on each source alone "
        f"({ALONE}<source>, the central twin's family), the federated model and the central "
        "twin on the pooled training rows, all under the run's decision rule. Binary view: "
        "macro-F1 of attack versus normal, FPR, and each attack class's recall (the share of "
        "its rows flagged as an attack). A detector trained on another source alone, on a "
        "source's test rows, is how well that organisation would catch attacks its own network "
        "never showed it.\n"
    )
    for source, rows in table.groupby("test_source", sort=False):
        present = [c for c in table.columns if c.startswith(RECALL) and rows[c].notna().any()]
        header = ["model", "trained on", "macro-F1", "FPR", *(c[len(RECALL) :] for c in present)]
        lines = [
            f"\n### Test rows of {source} ({int(rows['rows'].iat[0]):,} rows, "
            f"{int(rows['attack_rows'].iat[0]):,} attacks)\n",
            "| " + " | ".join(header) + " |",
            "|---|---|" + "---:|" * (len(header) - 2),
        ]
        for _, r in rows.iterrows():
            cells = [r["macro_f1"], r["fpr"], *(r[c] for c in present)]
            where = r["trained_on"] + ("" if r["own"] else " (never saw this source)")
            lines.append(
                f"| {r['model']} | {where} | " + " | ".join(_number(v) for v in cells) + " |"
            )
        text += "\n".join(lines) + "\n"
    return text


def section(run_dir: Path) -> str:
    """The matrix's section of ``comparison.md``; empty when the run wrote none."""
    path = run_dir / rundir.CROSS_SOURCE_CSV
    if not path.is_file():
        return ""
    return to_markdown(pd.read_csv(path, keep_default_na=False, na_values=[""]))


def _number(value: object) -> str:
    if not isinstance(value, int | float) or np.isnan(value):
        return "–"
    return f"{float(value):.3f}"
