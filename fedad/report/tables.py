"""The tables of a report: every job of a run or sweep in one tidy table, summaries, gaps."""

from __future__ import annotations

import numbers
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from fedad import rundir
from fedad.errors import FedadError
from fedad.evaluation.comparison import KEPT, NAMES
from fedad.evaluation.metrics import METRIC_NAMES
from fedad.models.catalog import TWINS, local_name, model_of
from fedad.report.jobs import read_job, read_table
from fedad.report.markdown import format_value

# Fields of results.json "settings"; "model" is renamed so it cannot clash with the
# per-row model name ("federated_cnn", "random_forest", ...).
SETTINGS = (
    "dataset",
    "task",
    "partition",
    "alpha",
    "num_clients",
    "num_rounds",
    "federated_model",
    "strategy",
    "decision",
    "seed",
)
METRICS = (*METRIC_NAMES, "train_seconds")
SUMMARY_METRICS = ("macro_f1", "f1", "roc_auc", "pr_auc", "fpr", "accuracy")
# Per-job fields that close each row of the tidy table.
_JOB_FIELDS = ("label_skew", "wall_seconds", "error")
# Settings that change how the training data is split over clients (heatmaps differ by these).
PARTITION_KEYS = ("dataset", "task", "partition", "alpha", "num_clients")


def collect(path: str | os.PathLike) -> pd.DataFrame:
    """Gather every job under ``path`` into one tidy table.

    Parameters
    ----------
    path : str or PathLike
        A run directory (holding ``results.json`` or ``failed.json``) or any folder
        above run directories, such as a Hydra multirun directory; searched recursively.

    Returns
    -------
    pd.DataFrame
        One row per job and model; a job without any model result keeps one row with an
        empty ``model``. Columns, in order: ``job`` (path relative to ``path``),
        ``status`` (``done``, ``failed``, ``skipped``, ``incomplete`` or ``other version``),
        the settings
        (swept override keys first, then the :data:`SETTINGS` fields), ``model``, ``kind``,
        ``federated``, the metrics, then ``label_skew``, ``wall_seconds`` and ``error``.
        :func:`summarize` relies on the settings lying between ``status`` and ``model``.

    Raises
    ------
    FedadError
        If ``path`` does not exist or holds no run.
    """
    root = Path(path)
    if not root.exists():
        raise FedadError(
            f"{root} does not exist. Give the run directory of `python -m fedad.simulate` "
            "(outputs/<date>/<time>) or its multirun directory (multirun/<date>/<time>)."
        )
    dirs = _job_dirs(root)
    if not dirs:
        raise FedadError(
            f"{root} holds no run: no results.json or failed.json was found in it or below it. "
            "Give the run directory of `python -m fedad.simulate` or its multirun directory, "
            "and check that the jobs have started."
        )
    jobs = [read_job(root, d) for d in dirs]
    swept = list(dict.fromkeys(k for job in jobs for k in job["overrides"]))
    columns = [*swept, *(s for s in SETTINGS if s not in swept)]
    taken = {"job", "status", *columns, "model", "kind", "federated", *METRICS, *_JOB_FIELDS}
    extras = list(
        dict.fromkeys(k for job in jobs for m in job["models"] for k in m if k not in taken)
    )
    rows = []
    for job in jobs:
        values = {c: job["overrides"].get(c, job["settings"].get(c)) for c in columns}
        head = {"job": job["job"], "status": job["status"], **values}
        tail = {k: job[k] for k in _JOB_FIELDS}
        for model in job["models"] or [{}]:
            rows.append({**head, **model, **tail})
    order = ["job", "status", *columns, "model", "kind", "federated", *METRICS, *extras]
    tidy = pd.DataFrame(rows).reindex(columns=[*order, *_JOB_FIELDS])
    for metric in [*METRICS, *(e for e in extras if e not in NAMES)]:
        tidy[metric] = pd.to_numeric(tidy[metric], errors="coerce")
    return tidy


def summarize(tidy: pd.DataFrame) -> pd.DataFrame:
    """Mean, sample standard deviation and count of the main metrics over seeds.

    Parameters
    ----------
    tidy : pd.DataFrame
        The table from :func:`collect` (or ``report.csv`` read back).

    Returns
    -------
    pd.DataFrame
        One row per setting and model, from the jobs with status ``done`` only. The
        setting columns are the settings that vary across those jobs, ``seed`` excepted;
        then ``model``, ``kind``, ``federated``, ``n`` (jobs averaged) and, for each of
        :data:`SUMMARY_METRICS`, ``<metric>_mean`` and ``<metric>_std`` (``ddof=1``, as
        pandas computes it; NaN when ``n`` is 1).
    """
    done = finished_jobs(tidy)
    keys = group_keys(tidy)
    by = [*keys, "model"]
    columns = [*by, "kind", "federated", "n"]
    columns += [f"{m}_{s}" for m in SUMMARY_METRICS for s in ("mean", "std")]
    if done.empty:
        return pd.DataFrame(columns=columns)
    grouped = done.groupby(by, dropna=False, sort=False)
    frame = grouped.agg(
        kind=("kind", "first"), federated=("federated", "first"), n=("job", "nunique")
    )
    for metric in SUMMARY_METRICS:
        frame[f"{metric}_mean"] = grouped[metric].mean()
        frame[f"{metric}_std"] = grouped[metric].std()
    return sort(frame.reset_index(), keys)[columns]


def _job_dirs(root: Path) -> list[Path]:
    found = {
        p.parent for name in (rundir.RESULTS_FILE, rundir.FAILED_FILE) for p in root.rglob(name)
    }
    return sorted((d for d in found if ".hydra" not in d.parts), key=lambda d: _natural(d, root))


def _natural(path: Path, root: Path) -> list[tuple[int, int | str]]:
    # Hydra numbers jobs 0, 1, ..., 10: sort numerically, not as text.
    parts = path.relative_to(root).parts
    return [(0, int(p)) if p.isdigit() else (1, p) for p in parts]


def finished_jobs(tidy: pd.DataFrame) -> pd.DataFrame:
    """The rows of finished jobs that hold a model result."""
    done = tidy[(tidy["status"] == "done") & tidy["model"].notna()].copy()
    done["federated"] = done["federated"].astype(bool)
    return done


def group_keys(tidy: pd.DataFrame) -> list[str]:
    """The settings that vary across finished jobs, seed excepted: what a summary groups by."""
    done = finished_jobs(tidy)
    return [c for c in settings_columns(tidy) if c != "seed" and done[c].nunique(dropna=False) > 1]


def sortable(value: object) -> tuple:
    """A sort key that orders numbers numerically, before text, with missing values last."""
    # Settings mix numbers, text and missing values; order numbers first, missing last.
    if pd.isna(value):
        return (2, "")
    # numbers.Real also covers numpy's integers, which are no subclass of int.
    if isinstance(value, numbers.Real):
        return (0, value)
    return (1, str(value))


def sort(frame: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    """``frame`` sorted by ``keys`` with :func:`sortable` keys."""
    if not keys or frame.empty:
        return frame
    order = sorted(range(len(frame)), key=lambda i: [sortable(frame[k].iat[i]) for k in keys])
    return frame.iloc[order].reset_index(drop=True)


def job_gaps(done: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    """Per job and federated model: its gaps to its centralized twin, and its gain over alone.

    The twin is the one the job's comparison names (a histogram run's
    ``xgboost_pinned``), else :data:`fedad.models.catalog.TWINS`' (``xgboost``
    for ``federated_xgboost``, ``central_<model>`` otherwise); a job without it
    is compared with its best centralized model. The gain over going alone is
    the federated macro-F1 minus the mean of the sites trained alone
    (``local_<model>``), where the job has them.
    """
    rows = []
    for job, models in done.groupby("job", sort=False):
        central = models[models["kind"].isin(("supervised", "unsupervised"))]
        central = central[central["macro_f1"].notna()]
        if central.empty:
            continue
        for _, fed in models[models["federated"]].iterrows():
            family = model_of(fed["model"])
            named = fed.get("twin")
            if not isinstance(named, str):
                named = TWINS.get(family, f"central_{family}")
            twin = central[central["model"] == named]
            ref = twin.iloc[0] if len(twin) else central.loc[central["macro_f1"].idxmax()]
            alone = models[models["model"] == local_name(family)]
            rows.append(
                {
                    **{k: fed[k] for k in keys},
                    "job": job,
                    "model": fed["model"],
                    "reference": ref["model"],
                    "federated_f1": fed["macro_f1"],
                    "reference_f1": ref["macro_f1"],
                    "gap": fed["macro_f1"] - ref["macro_f1"],
                    "gap_roc_auc": fed["roc_auc"] - ref["roc_auc"],
                    "gap_fpr": fed["fpr"] - ref["fpr"],
                    "gap_argmax": fed.get("argmax_macro_f1", np.nan)
                    - ref.get("argmax_macro_f1", np.nan),
                    **{k: fed.get(k, np.nan) for k in KEPT},
                    "gain_vs_alone": fed["macro_f1"] - alone["macro_f1"].iloc[0]
                    if len(alone)
                    else np.nan,
                }
            )
    return pd.DataFrame(rows)


def job_sites(root: Path, done: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    """Per job: the worst, median and best site's final macro-F1 from ``clients.csv``."""
    rows = []
    for job, models in done.groupby("job", sort=False):
        clients = read_table(root / job / rundir.CLIENTS_FILE)
        if clients is None:
            continue
        scores = pd.to_numeric(clients.get("macro_f1", pd.Series(dtype=float)), errors="coerce")
        scores = scores.dropna()
        if scores.empty:
            continue
        first = models.iloc[0]
        rows.append(
            {
                **{k: first[k] for k in keys},
                "job": job,
                "clients": len(scores),
                "worst": scores.min(),
                "median": scores.median(),
                "best": scores.max(),
            }
        )
    return pd.DataFrame(rows)


def aggregate(
    frame: pd.DataFrame, by: list[str], values: Sequence[str], text: Sequence[str] = ()
) -> pd.DataFrame:
    """Mean and std (ddof=1) of ``values`` per ``by`` group, ``n`` jobs, distinct ``text``."""
    grouped = frame.groupby(by, dropna=False, sort=False) if by else frame.groupby(lambda _: 0)
    out = grouped.agg(n=("job", "nunique"))
    for t in text:
        out[t] = grouped[t].agg(lambda s: ", ".join(dict.fromkeys(map(format_value, s))))
    for v in values:
        out[f"{v}_mean"] = grouped[v].mean()
        out[f"{v}_std"] = grouped[v].std()
    return sort(out.reset_index(drop=not by), by)


def gap_table(gaps: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    """Same-job gaps per setting and federated model, mean ± std over seeds, largest loss first."""
    if gaps.empty:
        return pd.DataFrame(columns=["gap_mean"])
    values = ["federated_f1", "reference_f1", "gap", "gap_roc_auc", "gap_fpr", "gain_vs_alone"]
    values += ["gap_argmax", *KEPT]
    table = aggregate(gaps, [*keys, "model"], values, text=["reference"])
    return table.sort_values("gap_mean", kind="stable", ignore_index=True)


def site_table(sites: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    """Worst, median and best client macro-F1 per setting, mean ± std over seeds."""
    if sites.empty:
        return pd.DataFrame()
    return aggregate(sites, keys, ["worst", "median", "best"], text=["clients"])


def fixed(done: pd.DataFrame, settings: list[str], keys: list[str]) -> dict[str, object]:
    """Settings, seed aside, that hold one value over the done jobs, with that value."""
    return {
        c: done[c].dropna().iloc[0]
        for c in settings
        if c not in keys and c != "seed" and done[c].notna().any()
    }


def settings_columns(tidy: pd.DataFrame) -> list[str]:
    """The setting columns of the tidy table (between ``status`` and ``model``)."""
    cols = list(tidy.columns)
    return cols[cols.index("status") + 1 : cols.index("model")]
