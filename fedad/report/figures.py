"""Figures of the sweep report: macro-F1 against a setting, convergence, gaps, sites."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.ticker import MaxNLocator

# Figures are written to files; no display is needed (or present on servers).
matplotlib.use("Agg")


def f1_versus(
    points: pd.DataFrame,
    x: str,
    references: Mapping[str, float],
    path: Path,
    log_x: bool = False,
) -> Path:
    """Plot federated macro-F1 against one setting, one line per other setting.

    Parameters
    ----------
    points : pd.DataFrame
        Summary rows of federated models: column ``x``, ``macro_f1_mean``,
        ``macro_f1_std`` and ``line`` (the legend entry each row belongs to).
    x : str
        The setting on the x-axis, e.g. ``alpha`` or ``num_clients``.
    references : Mapping[str, float]
        Centralized model name to its mean macro-F1, drawn as dashed horizontal lines.
    path : Path
        Image file to write.
    log_x : bool, optional
        Use a logarithmic x-axis (for Dirichlet alpha).

    Returns
    -------
    Path
        ``path``.
    """
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for line, rows in points.groupby("line", sort=False):
        rows = rows.sort_values(x)
        std = rows["macro_f1_std"].fillna(0)
        ax.errorbar(rows[x], rows["macro_f1_mean"], yerr=std, marker="o", capsize=3, label=line)
    for i, (name, value) in enumerate(references.items()):
        ax.axhline(value, linestyle="--", color=f"C{(i + 5) % 10}", linewidth=1, label=name)
    if log_x:
        ax.set_xscale("log")
    # Tick the swept values themselves; a log axis would otherwise show only powers of ten.
    values = sorted(points[x].unique())
    ax.set_xticks(values, [f"{v:g}" for v in values])
    ax.minorticks_off()
    ax.set_xlabel("Dirichlet alpha (smaller: more label skew)" if x == "alpha" else x)
    ax.set_ylabel("macro-F1")
    ax.set_title(f"Federated macro-F1 against {x}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    return _save(fig, path)


def convergence(history: pd.DataFrame, path: Path) -> Path:
    """Plot the global model's macro-F1 and loss per round, one line per setting.

    Parameters
    ----------
    history : pd.DataFrame
        Rows of every job's ``history.csv`` with a ``setting`` column naming the line;
        rounds of jobs that share a setting are averaged (over seeds).
    path : Path
        Image file to write.

    Returns
    -------
    Path
        ``path``.
    """
    metrics = [m for m in ("macro_f1", "loss") if m in history]
    fig, axes = plt.subplots(1, max(len(metrics), 1), figsize=(11, 4), squeeze=False)
    mean = history.groupby(["setting", "round"], sort=False)[metrics].mean().reset_index()
    for ax, metric in zip(axes[0], metrics, strict=False):
        for setting, rows in mean.groupby("setting", sort=False):
            ax.plot(rows["round"], rows[metric], marker=".", label=setting)
        ax.set_xlabel("round (0: initial model)")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(metric.replace("macro_f1", "macro-F1"))
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize="small")
    fig.suptitle("Global model per round")
    return _save(fig, path)


def gap_bars(gaps: pd.DataFrame, path: Path) -> Path:
    """Draw the federated-minus-centralized macro-F1 gap per setting as bars.

    Parameters
    ----------
    gaps : pd.DataFrame
        Columns ``label``, ``gap_mean`` and ``gap_std``.
    path : Path
        Image file to write.

    Returns
    -------
    Path
        ``path``.
    """
    fig, ax = plt.subplots(figsize=(7, 1.5 + 0.4 * len(gaps)))
    ys = np.arange(len(gaps))
    colors = ["C3" if g < 0 else "C2" for g in gaps["gap_mean"].fillna(0)]
    ax.barh(ys, gaps["gap_mean"], xerr=gaps["gap_std"].fillna(0), color=colors, capsize=3)
    ax.set_yticks(ys, gaps["label"])
    ax.invert_yaxis()
    ax.axvline(0, color="black", linewidth=0.8)
    ax.set_xlabel("macro-F1 gap (federated − centralized)")
    ax.grid(axis="x", alpha=0.3)
    return _save(fig, path)


def f1_versus_mb(points: pd.DataFrame, path: Path) -> Path:
    """Draw macro-F1 against the megabytes each model moved, one marker per setting and model.

    Parameters
    ----------
    points : pd.DataFrame
        Columns ``label``, ``federated`` (bool), ``mb_exchanged`` and ``macro_f1``.
    path : Path
        Image file to write.

    Returns
    -------
    Path
        ``path``.
    """
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for federated, marker, name in ((True, "o", "federated payload"), (False, "s", "pooled rows")):
        part = points[points["federated"] == federated]
        ax.scatter(part["mb_exchanged"], part["macro_f1"], marker=marker, label=name)
        for _, row in part.iterrows():
            ax.annotate(
                row["label"],
                (row["mb_exchanged"], row["macro_f1"]),
                fontsize=7,
                xytext=(4, 2),
                textcoords="offset points",
            )
    ax.set_xscale("log")
    ax.set_xlabel("MB moved (10^6 bytes, log scale)")
    ax.set_ylabel("test macro-F1")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def site_spread(sites: pd.DataFrame, path: Path) -> Path:
    """Draw the worst, median and best client macro-F1 per setting.

    Parameters
    ----------
    sites : pd.DataFrame
        Columns ``label``, ``worst_mean``, ``median_mean`` and ``best_mean``.
    path : Path
        Image file to write.

    Returns
    -------
    Path
        ``path``.
    """
    fig, ax = plt.subplots(figsize=(7, 1.5 + 0.4 * len(sites)))
    ys = np.arange(len(sites))
    ax.hlines(ys, sites["worst_mean"], sites["best_mean"], color="grey", linewidth=2)
    for column, marker in (("worst", "<"), ("median", "o"), ("best", ">")):
        ax.plot(sites[f"{column}_mean"], ys, marker, linestyle="none", label=column)
    ax.set_yticks(ys, sites["label"])
    ax.invert_yaxis()
    ax.set_xlabel("client macro-F1 (mean over seeds)")
    ax.grid(axis="x", alpha=0.3)
    ax.legend(fontsize="small")
    return _save(fig, path)


def site_scores(rows: pd.DataFrame, path: Path) -> Path:
    """Each site's macro-F1 on its own slice: the global, personal, lone and central models.

    Parameters
    ----------
    rows : pd.DataFrame
        :func:`fedad.report.sites.site_rows`: ``job``, ``client``, ``model``
        (a key of :data:`~fedad.evaluation.fairness.MODELS`) and ``macro_f1``.
    path : Path
        Image file to write.

    Returns
    -------
    Path
        ``path``.
    """
    jobs = list(dict.fromkeys(rows["job"]))
    fig, axes = plt.subplots(len(jobs), 1, figsize=(7, 2.6 * len(jobs)), squeeze=False)
    markers = {"global": "o", "personal": "^", "alone": "s", "central": "D"}
    for ax, job in zip(axes[:, 0], jobs, strict=True):
        one = rows[rows["job"] == job]
        # Sites in the order of the global model's score: the worst served on the left.
        order = one[one["model"] == "global"].sort_values("macro_f1")["client"].tolist()
        order += [c for c in dict.fromkeys(one["client"]) if c not in order]
        x = {client: i for i, client in enumerate(order)}
        for model, marker in markers.items():
            points = one[one["model"] == model]
            if len(points):
                ax.plot(
                    [x[c] for c in points["client"]],
                    points["macro_f1"],
                    marker,
                    linestyle="none",
                    label=model,
                )
        ax.set_xticks(range(len(order)), [str(c) for c in order], fontsize="small")
        ax.set_title(str(job), fontsize="small")
        ax.set_ylabel("macro-F1 on its slice")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    axes[-1, 0].set_xlabel("site (by the global model's score)")
    return _save(fig, path)


def poisoning(table: pd.DataFrame, out_dir: Path) -> dict[str, Path]:
    """Macro-F1 (one panel per attack) and targeted attack success against the attacker share.

    Parameters
    ----------
    table : pd.DataFrame
        :func:`fedad.report.security.poisoning_table`: ``attack``, ``share``,
        ``strategy`` and mean/std of ``macro_f1`` and ``attack_success``.
    out_dir : Path
        Folder for ``poisoning_f1.png`` and ``attack_success.png``.

    Returns
    -------
    dict[str, Path]
        Caption to image file, one line per strategy in each.
    """
    made = {}
    attacks = sorted(table["attack"].unique())
    width = max(6.0, 4.5 * len(attacks))
    fig, axes = plt.subplots(1, len(attacks), figsize=(width, 4), squeeze=False)
    for ax, attack in zip(axes[0], attacks, strict=True):
        _share_lines(ax, table[table["attack"] == attack], "macro_f1")
        ax.set_title(attack)
        ax.set_ylabel("macro-F1")
    axes[0][0].legend(fontsize="small")
    fig.suptitle("Federated macro-F1 against the malicious share")
    made["Macro-F1 against the attacker share"] = _save(fig, out_dir / "poisoning_f1.png")
    targeted = table[(table["attack"] == "targeted_flip") & table["attack_success_mean"].notna()]
    if len(targeted):
        fig, ax = plt.subplots(figsize=(6, 4))
        _share_lines(ax, targeted, "attack_success")
        ax.set_ylabel("attack success (targeted attacks scored normal)")
        ax.legend(fontsize="small")
        made["Targeted attack success against the attacker share"] = _save(
            fig, out_dir / "attack_success.png"
        )
    return made


def _share_lines(ax: plt.Axes, rows: pd.DataFrame, value: str) -> None:
    for strategy, line in rows.groupby("strategy", sort=True):
        line = line.sort_values("share")
        std = line[f"{value}_std"].fillna(0)
        ax.errorbar(
            line["share"], line[f"{value}_mean"], yerr=std, marker="o", capsize=3, label=strategy
        )
    ax.set_xlabel("share of malicious sites")
    ax.grid(alpha=0.3)


def f1_versus_epsilon(table: pd.DataFrame, path: Path) -> Path:
    """Federated macro-F1 against ε (log scale), one line per DP option and site count.

    Parameters
    ----------
    table : pd.DataFrame
        :func:`fedad.report.security.privacy_table`: ``privacy``, ``num_clients``,
        ``epsilon``, ``macro_f1_mean``/``_std`` and ``reference_f1``.
    path : Path
        Image file to write.

    Returns
    -------
    Path
        ``path``; the no-DP reference of each site count is a dashed line.
    """
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for i, ((privacy, sites), line) in enumerate(table.groupby(["privacy", "num_clients"])):
        line = line.sort_values("epsilon")
        std = line["macro_f1_std"].fillna(0)
        label = f"{privacy}, {sites:g} sites"
        ax.errorbar(
            line["epsilon"],
            line["macro_f1_mean"],
            yerr=std,
            marker="o",
            capsize=3,
            color=f"C{i % 10}",
            label=label,
        )
        reference = line["reference_f1"].dropna()
        if len(reference):
            ax.axhline(
                reference.iloc[0],
                linestyle="--",
                linewidth=1,
                color=f"C{i % 10}",
                label=f"{sites:g} sites, no DP",
            )
    ax.set_xscale("log")
    ax.set_xlabel(f"ε at δ = {table['delta'].iloc[0]:g} (whole run)")
    ax.set_ylabel("macro-F1")
    ax.set_title("Federated macro-F1 against the privacy budget")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    return _save(fig, path)


def _save(fig: plt.Figure, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
