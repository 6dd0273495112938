"""The report's sites section: each job's sites served by the global, personal and lone models."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from fedad import rundir
from fedad.evaluation.fairness import AUDITED, MODELS, audit, column
from fedad.report import figures
from fedad.report.jobs import read_table

# The report's files of the section.
SITES_CSV, SITES_PNG = "site_audit.csv", "site_audit.png"


def site_rows(root: Path, jobs: Sequence[str]) -> pd.DataFrame:
    """Every site's scores on its own slice: one row per job, site and model it was scored for.

    Parameters
    ----------
    root : Path
        The reported folder.
    jobs : Sequence[str]
        Finished job folders, relative to ``root``.

    Returns
    -------
    pd.DataFrame
        ``job``, ``client``, ``model`` (a key of :data:`~fedad.evaluation.fairness.MODELS`) and
        the audited metrics; empty when no job wrote ``clients.csv``.
    """
    frames = []
    for job in jobs:
        clients = read_table(root / job / rundir.CLIENTS_FILE)
        if clients is None or "client" not in clients:
            continue
        for model in MODELS:
            if column(model, "macro_f1") not in clients:
                continue
            scores = {
                k: pd.to_numeric(clients.get(column(model, k)), errors="coerce") for k in AUDITED
            }
            frame = pd.DataFrame(
                {"job": job, "client": clients["client"], "model": model, **scores}
            )
            frames.append(frame.dropna(subset=["macro_f1"]))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def audit_table(root: Path, jobs: Sequence[str]) -> pd.DataFrame:
    """Per job and model: :func:`fedad.evaluation.fairness.audit` of its ``clients.csv``, flat.

    Columns ``job``, ``model``, ``sites``, ``<metric>_worst``, ``<metric>_p10``,
    ``<metric>_median``, ``<metric>_spread`` and ``worse_than_alone`` (of
    ``compared`` sites; empty for the site alone itself).
    """
    rows = []
    for job in jobs:
        clients = read_table(root / job / rundir.CLIENTS_FILE)
        if clients is None or "client" not in clients:
            continue
        summary = audit(clients)
        worse = summary.get("worse_than_alone", {})
        for model, metrics in summary["models"].items():
            row: dict = {"job": job, "model": model, "sites": metrics["macro_f1"].get("sites", 0)}
            for metric, spread in metrics.items():
                for stat in ("worst", "p10", "median", "spread"):
                    row[f"{metric}_{stat}"] = spread.get(stat)
            row["worse_than_alone"] = worse.get(model)
            row["compared"] = worse.get("compared")
            rows.append(row)
    return pd.DataFrame(rows)


def write(root: Path, out_dir: Path, done_jobs: Sequence[str]) -> list[str]:
    """Write ``site_audit.csv`` and ``site_audit.png``; return the section's lines.

    Parameters
    ----------
    root, out_dir : Path
        The reported folder and where the report goes.
    done_jobs : Sequence[str]
        Finished job folders, relative to ``root``.

    Returns
    -------
    list[str]
        Markdown lines (none when no job scored its sites).
    """
    table = audit_table(root, done_jobs)
    if table.empty:
        return []
    table.to_csv(out_dir / SITES_CSV, index=False)
    figure = figures.site_scores(site_rows(root, done_jobs), out_dir / SITES_PNG)
    lines = [
        "## Sites",
        "",
        "Every site scored on its own held-out test slice (`clients.csv`; never the global test "
        "set, which no personal model reaches): the global model, the site's personal model "
        "(any `personalize` but `none`), the site trained alone (`local_<model>`) and the "
        "central reference, trained on every site's training rows pooled "
        "(`simulation.central_sites`). "
        "Worst = the lowest macro-F1 and recall, the highest FPR; p10 = the 10th percentile of "
        "the sites from that worse end; spread = best - worst; worse than alone = sites where "
        "the model's macro-F1 is below the site's own model.",
        "",
        "| job | model | sites | worst macro-F1 | p10 | median | spread | worst FPR | "
        "worst recall | worse than alone |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for _, r in table.iterrows():
        worse = (
            f"{int(r['worse_than_alone'])} of {int(r['compared'])}"
            if pd.notna(r["worse_than_alone"])
            else ""
        )
        lines.append(
            f"| `{r['job']}` | {r['model']} | {int(r['sites'])} | {_num(r['macro_f1_worst'])} | "
            f"{_num(r['macro_f1_p10'])} | {_num(r['macro_f1_median'])} | "
            f"{_num(r['macro_f1_spread'])} | {_num(r['fpr_worst'])} | "
            f"{_num(r['recall_worst'])} | {worse} |"
        )
    lines += ["", f"![Per-site macro-F1 of each model]({figure.name})", ""]
    return lines


def _num(value: Any) -> str:
    return "" if value is None or pd.isna(value) else f"{float(value):.3f}"
