"""`python -m fedad.report DIR`: one report (tables, figures, markdown) over a run or a sweep."""

from __future__ import annotations

import argparse
import os
import re
import shutil
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from fedad import rundir
from fedad.errors import FedadError, exit_with
from fedad.report import figures, security
from fedad.report.jobs import read_table
from fedad.report.markdown import format_value, render, row_labels, setting_label
from fedad.report.tables import (
    PARTITION_KEYS,
    SUMMARY_METRICS,
    aggregate,
    collect,
    finished_jobs,
    fixed,
    gap_table,
    group_keys,
    job_gaps,
    job_sites,
    settings_columns,
    site_table,
    sort,
    sortable,
    summarize,
)


def write_report(path: str | os.PathLike, out: str | os.PathLike | None = None) -> Path:
    """Write ``report.csv``, ``summary.csv``, the figures and ``report.md``.

    A folder with attacked or private runs also gets ``poisoning.csv`` and
    ``privacy.csv`` and their figures (:mod:`fedad.report.security`).

    Parameters
    ----------
    path : str or PathLike
        A run directory or a folder above run directories (see :func:`collect`).
    out : str or PathLike, optional
        Output folder; ``path`` itself by default.

    Returns
    -------
    Path
        The written ``report.md``.

    Raises
    ------
    FedadError
        If ``path`` does not exist or holds no run.
    """
    root = Path(path)
    tidy = collect(root)
    out_dir = Path(out) if out is not None else root
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / ".write-probe").touch()
        (out_dir / ".write-probe").unlink()
    except OSError as err:
        raise FedadError(
            f"Cannot write the report to {out_dir}: {err.strerror}. Give --out a folder you can "
            "write (by default the report goes into the run directory itself)."
        ) from err
    tidy.to_csv(out_dir / "report.csv", index=False)
    summary = summarize(tidy)
    summary.to_csv(out_dir / "summary.csv", index=False)
    keys = group_keys(tidy)
    done = finished_jobs(tidy)
    gaps = job_gaps(done, keys)
    sites = job_sites(root, done, keys)
    made = _figures(root, out_dir, done, summary, gaps, sites, keys)
    heatmaps = _copy_heatmaps(root, out_dir, done, keys)
    settings = settings_columns(tidy)
    text = render(
        root,
        out_dir,
        tidy,
        summary,
        gap_table(gaps, keys),
        site_table(sites, keys),
        keys=keys,
        settings=settings,
        fixed=fixed(done, settings, keys),
        seeds=sorted(done["seed"].dropna().unique(), key=sortable),
        metrics=SUMMARY_METRICS,
        made=made,
        heatmaps=heatmaps,
    )
    # Poisoning and privacy: sections of their own, when the folder holds such runs.
    skipped = tidy.loc[tidy["status"] == "skipped", ["job", "error"]].drop_duplicates("job")
    extra = security.write(root, out_dir, list(done["job"].unique()), skipped)
    if extra:
        text = text.rstrip("\n") + "\n\n" + "\n".join(extra)
    report = out_dir / "report.md"
    report.write_text(text)
    return report


def _figures(
    root: Path,
    out_dir: Path,
    done: pd.DataFrame,
    summary: pd.DataFrame,
    gaps: pd.DataFrame,
    sites: pd.DataFrame,
    keys: list[str],
) -> dict[str, Path]:
    made: dict[str, Path] = {}
    fed = summary[summary["federated"].astype(bool)]
    refs = dict.fromkeys(gaps["reference"]) if not gaps.empty else {}
    ref_f1 = {r: done.loc[done["model"] == r, "macro_f1"].mean() for r in refs}
    for x, name, log in (("alpha", "f1_vs_alpha", True), ("num_clients", "f1_vs_clients", False)):
        if x not in keys or fed[x].dropna().nunique() < 2:
            continue
        points = fed[fed[x].notna()]
        points = points.assign(line=row_labels(points, [k for k in keys if k != x]))
        made[name] = figures.f1_versus(points, x, ref_f1, out_dir / f"{name}.png", log)
    histories = []
    for job, models in done[done["federated"]].groupby("job", sort=False):
        history = read_table(root / job / rundir.HISTORY_FILE)
        if history is not None:
            histories.append(history.assign(setting=setting_label(models.iloc[0], keys)))
    if histories:
        made["convergence"] = figures.convergence(
            pd.concat(histories, ignore_index=True), out_dir / "convergence.png"
        )
    if not gaps.empty:
        agg = aggregate(gaps, [*keys, "model"], ["gap"])
        made["gap"] = figures.gap_bars(agg.assign(label=row_labels(agg, keys)), out_dir / "gap.png")
    if not sites.empty:
        agg = aggregate(sites, keys, ["worst", "median", "best"])
        agg["label"] = [setting_label(r, keys) for _, r in agg.iterrows()]
        made["site_spread"] = figures.site_spread(agg, out_dir / "site_spread.png")
    return made


def _copy_heatmaps(
    root: Path, out_dir: Path, done: pd.DataFrame, keys: list[str]
) -> list[tuple[str, Path]]:
    # One heatmap per distinct split (lowest seed): strategies sharing a split share it.
    split_keys = [k for k in keys if k in PARTITION_KEYS or k.startswith("partition.")]
    jobs = done.drop_duplicates("job")
    jobs = jobs.iloc[sorted(range(len(jobs)), key=lambda i: sortable(jobs["seed"].iat[i]))]
    copied: list[tuple[str, Path]] = []
    seen: set[str] = set()
    for _, job in sort(jobs, split_keys).iterrows():
        source = root / job["job"] / "partition.png"
        label = setting_label(job, split_keys) if split_keys else "partition"
        if label in seen or not source.exists():
            continue
        seen.add(label)
        target = out_dir / "heatmaps" / (re.sub(r"[^A-Za-z0-9.=_-]+", "_", label) + ".png")
        target.parent.mkdir(exist_ok=True)
        shutil.copyfile(source, target)
        copied.append((f"{label} (seed {format_value(job['seed'])}, job `{job['job']}`)", target))
    return copied


def main(argv: Sequence[str] | None = None) -> None:
    """Command-line entry point: ``python -m fedad.report PATH [--out DIR]``.

    Parameters
    ----------
    argv : Sequence[str], optional
        Arguments without the program name; ``sys.argv[1:]`` when None.

    Raises
    ------
    SystemExit
        With status 2 and one paragraph on stderr, no traceback, on a user error
        (a missing path, a folder without runs).
    """
    parser = argparse.ArgumentParser(
        prog="python -m fedad.report",
        description="Report a run or a multirun of fedad.simulate: tables, figures, report.md.",
    )
    parser.add_argument("path", help="run directory or multirun directory")
    parser.add_argument("--out", help="output folder (default: the given directory)")
    args = parser.parse_args(argv)
    try:
        report = write_report(args.path, args.out)
    except FedadError as err:
        exit_with(err)
    print(report)


if __name__ == "__main__":
    main()
