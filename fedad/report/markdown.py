"""Markdown text of the sweep report: headline, tables, figures, failed jobs."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import pandas as pd

from fedad.evaluation.comparison import KEPT
from fedad.report.jobs import OTHER_VERSION

_CAPTIONS = {
    "f1_vs_alpha": "Federated macro-F1 against Dirichlet alpha (log scale; smaller alpha, "
    "more label skew), mean ± std over seeds; dashed lines: centralized references.",
    "f1_vs_clients": "Federated macro-F1 against the number of clients, mean ± std over "
    "seeds; dashed lines: centralized references.",
    "convergence": "Global-model macro-F1 and loss per round (round 0: initial model), "
    "mean over seeds.",
    "gap": "Federated minus its centralized twin's macro-F1 per setting and family, mean ± std "
    "over seeds.",
    "f1_vs_mb": "Macro-F1 against the megabytes each model moved (log scale): federated "
    "payload, or the training rows a central model pools; mean over seeds.",
    "site_spread": "Worst, median and best client macro-F1 per setting, mean over seeds.",
}


def render(
    root: Path,
    out_dir: Path,
    tidy: pd.DataFrame,
    summary: pd.DataFrame,
    gaps: pd.DataFrame,
    sites: pd.DataFrame,
    *,
    keys: Sequence[str],
    settings: Sequence[str],
    fixed: Mapping[str, object],
    seeds: Sequence[object],
    metrics: Sequence[str],
    made: Mapping[str, Path],
    heatmaps: Sequence[tuple[str, Path]],
) -> str:
    """Write the text of ``report.md``.

    Parameters
    ----------
    root : Path
        The reported run or multirun directory, named in the title.
    out_dir : Path
        Folder ``report.md`` goes into; links to figures are relative to it.
    tidy : pd.DataFrame
        Every job and model, as :func:`fedad.report.collect` gives them.
    summary : pd.DataFrame
        Mean ± std over seeds per setting and model, as :func:`fedad.report.summarize`
        gives them.
    gaps : pd.DataFrame
        Federated minus centralized macro-F1 per setting and federated model, largest
        loss first: ``model``, ``reference``, ``n`` and ``<v>_mean``, ``<v>_std`` for
        ``federated_f1``, ``reference_f1`` and ``gap``; empty when no job holds both.
    sites : pd.DataFrame
        Worst, median and best client macro-F1 per setting: ``n``, ``clients`` and
        ``<v>_mean``, ``<v>_std`` for each; empty when no job wrote ``clients.csv``.
    keys : Sequence[str]
        The settings that vary across the done jobs, seed excepted.
    settings : Sequence[str]
        Every settings column of ``tidy``.
    fixed : Mapping[str, object]
        Settings that hold one value over the done jobs, with that value.
    seeds : Sequence[object]
        The seeds averaged over, in order.
    metrics : Sequence[str]
        The metrics of ``summary``, in the order of its columns.
    made : Mapping[str, Path]
        Figure name (a key of the captions, e.g. ``gap``) to its image file.
    heatmaps : Sequence[tuple[str, Path]]
        Caption and image file of each partition heatmap.

    Returns
    -------
    str
        The markdown text.
    """
    jobs = tidy.drop_duplicates("job")
    count = jobs["status"].value_counts()
    averaged = ", ".join(format_value(s) for s in seeds)
    lines = [
        f"# Federated versus centralized: `{root}`",
        "",
        f"{len(jobs)} job(s): {count.get('done', 0)} done, {count.get('failed', 0)} failed, "
        f"{count.get('incomplete', 0)} incomplete"
        + (f", {count['skipped']} skipped" if count.get("skipped") else "")
        + (f", {count[OTHER_VERSION]} of another fedad version" if count.get(OTHER_VERSION) else "")
        + ". Aggregates cover the done jobs: mean ± sample "
        "standard deviation (ddof=1) over seeds, n = jobs averaged. Every job and model: "
        "`report.csv`; aggregates: `summary.csv`.",
        "",
        "Varied: " + (", ".join(keys) or "nothing") + f"; averaged over seeds {averaged or '–'}.",
        "",
    ]
    if fixed:
        values = [f"{c}={format_value(v)}" for c, v in fixed.items()]
        lines += ["Fixed: " + ", ".join(values) + ".", ""]
    lines += ["## Headline", "", *_headline(summary, gaps, sites, keys)]
    if len(jobs) > count.get("done", 0):
        lines[-1:-1] = [
            f"- **Failed or incomplete:** {len(jobs) - count.get('done', 0)} job(s), listed at "
            "the end; they are left out of every aggregate."
        ]

    lines += ["## The price of federation per setting and family (largest loss first)", ""]
    if gaps.empty:
        lines += ["No job holds both a federated and a centralized model.", ""]
    else:
        lines += [
            "gap = federated − the centralized twin trained in the same job (its family "
            "trained on the pooled rows: `central_<model>`, `xgboost` for `federated_xgboost`; "
            "else the job's best centralized model), in macro-F1, ROC-AUC and FPR, each under "
            "the job's decision rule (a calibrated rule: thresholds chosen on validation rows "
            "only); gap at argmax = the same at argmax, where the job decided otherwise; alone = "
            "federated macro-F1 − the mean of the sites each trained alone; kept round, seconds "
            "and MB = the cost of the answer: the round whose model is scored (the best round "
            "under early stopping) and the seconds and payload MB until it; averaged over seeds.",
            "",
        ]
        header = [
            *keys,
            *("federated model", "reference", "n", "federated", "reference", "gap"),
            *("gap ROC-AUC", "gap FPR", "gap at argmax", "gain vs alone"),
            *("kept round", "seconds", "MB"),
        ]
        rows = [
            [
                *(format_value(r[k]) for k in keys),
                f"`{r['model']}`",
                r["reference"],
                str(r["n"]),
                _pm(r["federated_f1_mean"], r["federated_f1_std"]),
                _pm(r["reference_f1_mean"], r["reference_f1_std"]),
                _pm(r["gap_mean"], r["gap_std"], signed=True),
                *(
                    _pm(r.get(f"{v}_mean"), r.get(f"{v}_std"), signed=True)
                    for v in ("gap_roc_auc", "gap_fpr", "gap_argmax", "gain_vs_alone")
                ),
                *(_pm(r.get(f"{v}_mean"), r.get(f"{v}_std"), digits=1) for v in KEPT),
            ]
            for _, r in gaps.iterrows()
        ]
        lines += _table(header, rows, left=len(keys) + 2)

    lines += ["## All models, mean ± std over seeds", ""]
    names = {"macro_f1": "macro-F1", "f1": "F1", "roc_auc": "ROC-AUC", "pr_auc": "PR-AUC"}
    header = [*keys, "model", "kind", "n", *(names.get(m, m) for m in metrics)]
    rows = [
        [
            *(format_value(r[k]) for k in keys),
            ("★ " if r["federated"] else "") + str(r["model"]),
            format_value(r["kind"]),
            str(r["n"]),
            *(_pm(r[f"{m}_mean"], r[f"{m}_std"]) for m in metrics),
        ]
        for _, r in summary.iterrows()
    ]
    lines += [*_table(header, rows, left=len(keys) + 2), "★ federated model", ""]

    lines += ["## Spread across sites", ""]
    if sites.empty:
        lines += ["No finished job wrote clients.csv.", ""]
    else:
        lines += [
            "Worst, median and best client macro-F1 of each job (`clients.csv`), mean ± std over "
            "seeds.",
            "",
        ]
        header = [*keys, "n", "clients", "worst", "median", "best"]
        rows = [
            [
                *(format_value(r[k]) for k in keys),
                str(r["n"]),
                r["clients"],
                *(_pm(r[f"{c}_mean"], r[f"{c}_std"]) for c in ("worst", "median", "best")),
            ]
            for _, r in sites.iterrows()
        ]
        lines += _table(header, rows, left=len(keys))

    lines += ["## Figures", ""]
    for name, path in made.items():
        lines += [f"{_CAPTIONS[name]}", "", f"![{name}]({_link(path, out_dir)})", ""]
    if not made:
        lines += ["The data support no figure.", ""]
    if heatmaps:
        lines += ["### Partitions (class counts per client)", ""]
        for caption, path in heatmaps:
            lines += [f"{caption}:", "", f"![partition]({_link(path, out_dir)})", ""]

    lines += ["## Failed or incomplete jobs", "", *_failures(root, out_dir, tidy, keys, settings)]
    return "\n".join(lines)


def format_value(value: object) -> str:
    """Show one setting value: ``–`` when missing, whole floats without a decimal point.

    Parameters
    ----------
    value : object
        A cell of the tidy or summary table.

    Returns
    -------
    str
        The text, e.g. ``0.5``, ``4`` for ``4.0``, ``fedavg`` or ``–``.
    """
    if pd.isna(value):
        return "–"
    if isinstance(value, float):
        return str(int(value)) if value.is_integer() else f"{value:g}"
    return str(value)


def setting_label(row: pd.Series | dict, keys: Sequence[str]) -> str:
    """Name the setting of one row, e.g. ``strategy=fedavg, alpha=0.5``.

    Parameters
    ----------
    row : pd.Series or dict
        A row holding every one of ``keys``.
    keys : Sequence[str]
        The settings to name, in order.

    Returns
    -------
    str
        ``key=value`` pairs joined by commas; ``all jobs`` when ``keys`` is empty.
    """
    return ", ".join(f"{k}={format_value(row[k])}" for k in keys) or "all jobs"


def row_labels(frame: pd.DataFrame, keys: Sequence[str]) -> list[str]:
    """Name each row by its setting, and by its model where models must be told apart.

    Parameters
    ----------
    frame : pd.DataFrame
        Rows holding ``model`` and every one of ``keys``.
    keys : Sequence[str]
        The settings to name, in order.

    Returns
    -------
    list[str]
        One label per row, as :func:`setting_label` gives it, followed by the model name
        when ``frame`` holds more than one model or ``keys`` is empty.
    """
    named = frame["model"].nunique() > 1 or not keys
    return [
        ", ".join(
            filter(None, [setting_label(r, keys) if keys else "", r["model"] if named else ""])
        )
        for _, r in frame.iterrows()
    ]


def _pm(mean: float, std: float, signed: bool = False, digits: int = 3) -> str:
    if pd.isna(mean):
        return "–"
    text = f"{mean:+.{digits}f}" if signed else f"{mean:.{digits}f}"
    return text if pd.isna(std) else f"{text} ± {std:.{digits}f}"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], left: int) -> list[str]:
    """Markdown table lines; the first ``left`` columns are text, the rest numbers."""
    rule = ["---"] * left + ["---:"] * (len(header) - left)
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(rule) + "|"]
    lines += ["| " + " | ".join(cells) + " |" for cells in rows]
    return [*lines, ""]


def _headline(
    summary: pd.DataFrame, gaps: pd.DataFrame, sites: pd.DataFrame, keys: Sequence[str]
) -> list[str]:
    fed = summary[summary["federated"].astype(bool) & summary["macro_f1_mean"].notna()]
    central = summary[~summary["federated"].astype(bool) & summary["macro_f1_mean"].notna()]
    if fed.empty or central.empty:
        missing = "federated" if fed.empty else "centralized"
        return [f"No finished {missing} model to compare with: no gap can be given.", ""]
    best = fed.loc[fed["macro_f1_mean"].idxmax()]
    # Compare on the same jobs (same data and seeds) when the setting holds a centralized model.
    here = setting_label(best, keys)
    same = central[[setting_label(r, keys) == here for _, r in central.iterrows()]]
    pool = same if not same.empty else central
    ref = pool.loc[pool["macro_f1_mean"].idxmax()]
    where = f" ({here})" if keys else ""
    diff = best["macro_f1_mean"] - ref["macro_f1_mean"]
    share = f" ({diff / ref['macro_f1_mean']:+.1%} of centralized)" if ref["macro_f1_mean"] else ""
    lines = [
        f"- **Best federated:** `{best['model']}`{where}: macro-F1 "
        f"{_pm(best['macro_f1_mean'], best['macro_f1_std'])} (n={best['n']})",
        f"- **Best centralized:** `{ref['model']}`: macro-F1 "
        f"{_pm(ref['macro_f1_mean'], ref['macro_f1_std'])} (n={ref['n']})",
        f"- **Cost of federating, at best:** {diff:+.3f} macro-F1{share}",
    ]
    if not gaps.empty:
        worst = gaps.iloc[0]
        title = "Largest loss" if len(gaps) > 1 else "Same-job gap"
        lines.append(
            f"- **{title}:** {row_labels(gaps.iloc[:1], keys)[0]}: gap "
            f"{_pm(worst['gap_mean'], worst['gap_std'], signed=True)} against "
            f"`{worst['reference']}`"
        )
    if not sites.empty:
        low = sites.loc[sites["worst_mean"].idxmin()]
        lines.append(
            f"- **Weakest site:** worst client macro-F1 {_pm(low['worst_mean'], low['worst_std'])}"
            f" ({setting_label(low, keys)}; the median client scores {low['median_mean']:.3f})"
        )
    return [*lines, ""]


def _failures(
    root: Path, out_dir: Path, tidy: pd.DataFrame, keys: Sequence[str], settings: Sequence[str]
) -> list[str]:
    jobs = tidy.drop_duplicates("job")
    bad = jobs[jobs["status"] != "done"]
    if bad.empty:
        return ["None: every job finished.", ""]
    shown = [c for c in settings if c in keys or c == "seed" or jobs[c].nunique() > 1]
    lines = []
    for _, job in bad.iterrows():
        label = ", ".join(f"{k}={format_value(job[k])}" for k in shown if pd.notna(job[k]))
        models = tidy.loc[(tidy["job"] == job["job"]) & tidy["model"].notna(), "model"]
        finished = ", ".join(f"`{m}`" for m in models) or "none"
        if job["status"] == "skipped":
            text = f"**skipped**: {job['error']}"
        elif job["status"] == OTHER_VERSION:
            text = (
                f"**{OTHER_VERSION}**: {job['error']}. Its numbers may come from other code: "
                "rerun it with this version to include it."
            )
        elif job["status"] == "failed":
            text = f"**failed**: {job['error'] or 'no error message was saved.'}"
            if len(models):
                text += f" Partial results (left out of the aggregates): {finished}."
        else:
            text = (
                "**incomplete**: the job never marked its results done (interrupted, or still "
                f"running). Finished models (left out of the aggregates): {finished}."
            )
        heatmap = root / job["job"] / "partition.png"
        if heatmap.exists():
            text += f" [partition]({_link(heatmap, out_dir)})"
        lines.append(f"- `{job['job']}`" + (f" ({label})" if label else "") + f" — {text}")
    return [*lines, ""]


def _link(path: Path, out_dir: Path) -> str:
    return Path(os.path.relpath(path, out_dir)).as_posix()
