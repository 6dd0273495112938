"""`python -m fedad.report DIR`: one report (tables, figures, markdown) over a run or a sweep."""

from __future__ import annotations

import argparse
import os
import re
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from fedad import rundir
from fedad.errors import FedadError, exit_with
from fedad.report import cross_source, figures, security
from fedad.report import sites as site_audit
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

# The report's own page: its presence marks a folder that holds a report.
REPORT_MD = "report.md"


def write_report(
    path: str | os.PathLike, out: str | os.PathLike | None = None, overwrite: bool = False
) -> Path:
    """Write ``report.csv``, ``summary.csv``, the figures and ``report.md``.

    A folder with attacked or private runs also gets ``poisoning.csv`` and
    ``privacy.csv`` and their figures (:mod:`fedad.report.security`). Every
    file is made in a hidden folder inside the output folder and moved into
    place only once the whole report is made, each in one step: a failure
    (a full disk) leaves the folder as it was. An earlier report's files are
    replaced only with ``overwrite``.

    Parameters
    ----------
    path : str or PathLike
        A run directory or a folder above run directories (see :func:`collect`).
    out : str or PathLike, optional
        Output folder, created if missing; ``path`` itself by default.
    overwrite : bool
        Replace the files of an earlier report (default: refuse, before any work).

    Returns
    -------
    Path
        The written ``report.md``.

    Raises
    ------
    FedadError
        If ``path`` does not exist or holds no run, the output folder cannot
        be written, it holds a report and ``overwrite`` is false, or a write fails.
    """
    root = Path(path)
    tidy = collect(root)
    out_dir = Path(out) if out is not None else root
    if not overwrite and (out_dir / REPORT_MD).exists():
        raise _clash(out_dir, [Path(REPORT_MD)])
    stage = _stage(out_dir)
    try:
        _make(root, out_dir, stage, tidy)
        made = sorted(p.relative_to(stage) for p in stage.rglob("*") if p.is_file())
        clashes = [p for p in made if os.path.lexists(out_dir / p)]
        if clashes and not overwrite:
            raise _clash(out_dir, clashes)
        rundir.publish(stage, out_dir, overwrite)
    except FileExistsError as err:
        raise _clash(out_dir, [Path(err.filename or REPORT_MD)]) from None
    except OSError as err:
        raise FedadError(
            f"Writing the report to {out_dir} failed: {err.strerror or err}. No file of an "
            "earlier report was replaced unless its new version was complete, and no partial "
            "file was left. Free space (or fix the folder) and run the command again."
        ) from None
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return out_dir / REPORT_MD


def _stage(out_dir: Path) -> Path:
    """A hidden folder inside ``out_dir`` (created if missing) to make the report in."""
    if out_dir.exists() and not out_dir.is_dir():
        raise FedadError(
            f"Cannot write the report to {out_dir}: it is a file. Give --out a folder (by "
            "default the report goes into the run directory itself)."
        )
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=".report-", suffix=".tmp", dir=out_dir))
    except OSError as err:
        raise FedadError(
            f"Cannot write the report to {out_dir}: {err.strerror}. Give --out a folder you can "
            "write (by default the report goes into the run directory itself)."
        ) from None


def _clash(out_dir: Path, clashes: list[Path]) -> FedadError:
    shown = ", ".join(str(p) for p in clashes[:5]) + (" ..." if len(clashes) > 5 else "")
    return FedadError(
        f"{out_dir} already holds a report ({shown}), left as it is. Give --overwrite to "
        "replace its files, or --out another folder."
    )


def _make(root: Path, out_dir: Path, stage: Path, tidy: pd.DataFrame) -> None:
    """Make every file of the report in ``stage``, its links written as from ``out_dir``."""
    tidy.to_csv(stage / "report.csv", index=False)
    summary = summarize(tidy)
    summary.to_csv(stage / "summary.csv", index=False)
    keys = group_keys(tidy)
    done = finished_jobs(tidy)
    gaps = job_gaps(done, keys)
    sites = job_sites(root, done, keys)
    made = _figures(root, stage, done, summary, gaps, sites, keys)
    heatmaps = _copy_heatmaps(root, stage, done, keys)
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
        # Linked where they will be once moved out of the stage.
        made={name: out_dir / p.relative_to(stage) for name, p in made.items()},
        heatmaps=[(label, out_dir / p.relative_to(stage)) for label, p in heatmaps],
    )
    # Sites, poisoning and privacy: sections of their own, when the folder holds such runs.
    skipped = tidy.loc[tidy["status"] == "skipped", ["job", "error"]].drop_duplicates("job")
    extra = site_audit.write(root, stage, list(done["job"].unique()))
    labels = {job: setting_label(rows.iloc[0], keys) for job, rows in done.groupby("job")}
    extra += cross_source.write(root, stage, list(done["job"].unique()), labels)
    extra += security.write(root, stage, list(done["job"].unique()), skipped)
    if extra:
        text = text.rstrip("\n") + "\n\n" + "\n".join(extra)
    (stage / REPORT_MD).write_text(text)


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
    if not gaps.empty and "mb_exchanged" in done and done["mb_exchanged"].notna().any():
        made["f1_vs_mb"] = figures.f1_versus_mb(
            _payload_points(done, gaps, keys), out_dir / "f1_vs_mb.png"
        )
    return made


def _payload_points(done: pd.DataFrame, gaps: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    """Each federated model and its twin: mean macro-F1 and MB per setting, labelled."""
    pairs = set(zip(gaps["job"], gaps["model"], strict=True)) | set(
        zip(gaps["job"], gaps["reference"], strict=True)
    )
    rows = done[[(j, m) in pairs for j, m in zip(done["job"], done["model"], strict=True)]]
    by = [*keys, "model", "federated"]
    points = rows.groupby(by, dropna=False, sort=False)[["mb_exchanged", "macro_f1"]].mean()
    points = points.reset_index()
    return points.assign(label=row_labels(points, keys))


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
        (a missing path, a folder without runs, an earlier report without
        ``--overwrite``, an output folder that cannot be written).
    """
    parser = argparse.ArgumentParser(
        prog="python -m fedad.report",
        description="Report a run or a multirun of fedad.simulate: tables, figures, report.md.",
    )
    parser.add_argument("path", help="run directory or multirun directory")
    parser.add_argument("--out", help="output folder (default: the given directory)")
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the files of an earlier report in the output folder (default: refuse)",
    )
    args = parser.parse_args(argv)
    try:
        report = write_report(args.path, args.out, args.overwrite)
    except FedadError as err:
        exit_with(err)
    print(report)


if __name__ == "__main__":
    main()
