"""The report's cross-source section: each setting's matrix over its seeds, one table per source."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import pandas as pd

from fedad import rundir
from fedad.evaluation.cross_source import RECALL
from fedad.report.jobs import read_table

# The report's file of the section (the run's own cross_source.csv may sit in the same folder).
SUMMARY_CSV = "cross_source_summary.csv"
ROW_KEYS = ["setting", "test_source", "model", "trained_on", "own"]


def summary(root: Path, jobs: Sequence[str], settings: Mapping[str, str]) -> pd.DataFrame:
    """Every job's ``cross_source.csv``, averaged over the jobs of each setting (its seeds).

    Parameters
    ----------
    root : Path
        The reported folder.
    jobs : Sequence[str]
        Finished job folders, relative to ``root``.
    settings : Mapping[str, str]
        Each job's setting label (the settings that vary, seed excepted).

    Returns
    -------
    pd.DataFrame
        :data:`ROW_KEYS`, ``jobs``, then ``<metric>_mean`` and ``<metric>_std``
        for ``macro_f1``, ``fpr`` and each ``recall_<class>``; empty when no
        job wrote a matrix.
    """
    frames = []
    for job in jobs:
        table = read_table(root / job / rundir.CROSS_SOURCE_CSV)
        if table is not None and "test_source" in table:
            frames.append(table.assign(setting=settings.get(job, "all jobs"), job=job))
    if not frames:
        return pd.DataFrame()
    tidy = pd.concat(frames, ignore_index=True)
    metrics = ["macro_f1", "fpr", *(c for c in tidy.columns if c.startswith(RECALL))]
    grouped = tidy.groupby(ROW_KEYS, sort=False, dropna=False)
    out = grouped[metrics].agg(["mean", "std"])
    out.columns = [f"{metric}_{stat}" for metric, stat in out.columns]
    out.insert(0, "jobs", grouped["job"].nunique())
    return out.reset_index()


def write(
    root: Path, out_dir: Path, done_jobs: Sequence[str], settings: Mapping[str, str]
) -> list[str]:
    """Write :data:`SUMMARY_CSV`; return the section's lines (none when no job has a matrix).

    Parameters
    ----------
    root, out_dir : Path
        The reported folder and where the report goes.
    done_jobs : Sequence[str]
        Finished job folders, relative to ``root``.
    settings : Mapping[str, str]
        Each job's setting label.

    Returns
    -------
    list[str]
        Markdown lines.
    """
    table = summary(root, done_jobs, settings)
    if table.empty:
        return []
    table.to_csv(out_dir / SUMMARY_CSV, index=False)
    lines = [
        "## Across sources",
        "",
        "Runs over a federation of sources (`dataset=federation`): each source's own test rows "
        "scored by the detector trained on each source alone (`alone_<source>`, the central "
        "twin's family), the federated model and the central twin on the pooled training rows. "
        "Binary view: macro-F1 of attack versus normal, FPR, and each attack class's recall "
        "(the share of its rows flagged as an attack); mean ± std over the jobs (seeds) of a "
        "setting. A detector marked *never saw this source*, on that source's rows, is how "
        "well its organisation would catch attacks its own network never showed it. Every "
        f"number: `{SUMMARY_CSV}`.",
        "",
    ]
    for (setting, source), rows in table.groupby(["setting", "test_source"], sort=False):
        recalls = [
            c[: -len("_mean")]
            for c in rows.columns
            if c.startswith(RECALL) and c.endswith("_mean") and rows[c].notna().any()
        ]
        header = ["model", "trained on", "jobs", "macro-F1", "FPR"]
        header += [c[len(RECALL) :] for c in recalls]
        lines += [
            f"### {source} test rows ({setting})",
            "",
            "| " + " | ".join(header) + " |",
            "|---|---|" + "---:|" * (len(header) - 2),
        ]
        for _, r in rows.iterrows():
            where = str(r["trained_on"]) + ("" if _own(r["own"]) else " (never saw this source)")
            numbers = [_pm(r, m) for m in ("macro_f1", "fpr", *recalls)]
            cells = [str(r["model"]), where, str(int(r["jobs"])), *numbers]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return lines


def _own(value: object) -> bool:
    """``own`` as read back from a CSV: a bool, or its text."""
    return value is True or str(value).strip().lower() == "true"


def _pm(row: pd.Series, metric: str) -> str:
    mean, std = row[f"{metric}_mean"], row[f"{metric}_std"]
    if pd.isna(mean):
        return "–"
    return f"{mean:.3f}" if pd.isna(std) else f"{mean:.3f} ± {std:.3f}"
