"""The fairness audit of the sites: each model's score at every site, on the site's own slice."""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from fedad import rundir

# The models a site can be served by, as clients.csv names their columns: the global model's
# metrics have no prefix (clients.csv's columns since before the audit), a personal model's, the
# site alone's and the central model's (every site's training rows pooled) carry theirs.
MODELS = {"global": "", "personal": "personal_", "alone": "alone_", "central": "central_"}
# The metrics audited, and whether a higher value is better (the FPR: lower is better).
AUDITED = {"macro_f1": True, "fpr": False, "recall": True}
# The share of sites at the worse end that the percentile marks.
PERCENTILE = 10


def column(model: str, metric: str) -> str:
    """The clients.csv column of ``model``'s ``metric`` at each site (``alone_fpr``)."""
    return f"{MODELS[model]}{metric}"


def audit(clients: pd.DataFrame) -> dict[str, Any]:
    """Summarize how well each model serves the sites of one run.

    Parameters
    ----------
    clients : pd.DataFrame
        ``clients.csv``: one row per site with ``client`` and, per model of
        :data:`MODELS` the run has, the :data:`AUDITED` metrics on the site's
        own test slice.

    Returns
    -------
    dict
        ``sites`` (rows with a global score), ``models`` (per model present,
        per metric: ``worst`` and ``worst_site``, ``p10`` — the
        :data:`PERCENTILE` th percentile from the worse end —, ``median``,
        ``best``, ``spread`` = best - worst, ``sites`` scored) and
        ``worse_than_alone`` (per served model: how many sites score a lower
        macro-F1 than alone, of ``compared`` sites holding both), ready for
        ``results.json`` (None where undefined).
    """
    present = [m for m in MODELS if column(m, "macro_f1") in clients]
    out: dict[str, Any] = {
        "sites": int(_numeric(clients, column("global", "macro_f1")).notna().sum())
        if "global" in present
        else 0,
        "models": {m: {k: _spread(clients, m, k) for k in AUDITED} for m in present},
    }
    if "alone" in present:
        alone = _numeric(clients, column("alone", "macro_f1"))
        worse: dict[str, Any] = {}
        for model in (m for m in present if m != "alone"):
            served = _numeric(clients, column(model, "macro_f1"))
            both = served.notna() & alone.notna()
            worse[model] = int((served[both] < alone[both]).sum())
            worse["compared"] = int(both.sum())
        out["worse_than_alone"] = worse
    return out


def _numeric(clients: pd.DataFrame, name: str) -> pd.Series:
    values = clients[name] if name in clients else pd.Series(np.nan, index=clients.index)
    return pd.to_numeric(values, errors="coerce")


def _spread(clients: pd.DataFrame, model: str, metric: str) -> dict[str, Any]:
    """Worst, the worse-end percentile, median, best and spread of one metric over the sites."""
    values = _numeric(clients, column(model, metric))
    scored = values.notna()
    if not scored.any():
        return {"sites": 0}
    higher = AUDITED[metric]
    worst_at = values.idxmin() if higher else values.idxmax()
    v = values[scored].to_numpy(dtype=np.float64)
    worst, best = (v.min(), v.max()) if higher else (v.max(), v.min())
    return {
        "worst": float(worst),
        "worst_site": int(clients.loc[worst_at, "client"]),
        "p10": float(np.percentile(v, PERCENTILE if higher else 100 - PERCENTILE)),
        "median": float(np.median(v)),
        "best": float(best),
        "spread": float(abs(best - worst)),
        "sites": int(scored.sum()),
    }


def record(run_dir: str | Path, model: str, per_site: Mapping[int, Mapping[str, Any]]) -> bool:
    """Write ``model``'s metrics at each site into the run's ``clients.csv``.

    Parameters
    ----------
    run_dir : str or Path
        The run folder.
    model : str
        One of :data:`MODELS` but ``global`` (whose columns the server writes).
    per_site : Mapping[int, Mapping]
        Metrics on each site's own test slice, by site; a site left out keeps
        the columns empty, and the model's earlier columns are replaced.

    Returns
    -------
    bool
        False where the run wrote no ``clients.csv`` (nothing to add to).
    """
    path = Path(run_dir) / rundir.CLIENTS_FILE
    if not path.is_file():
        return False
    prefix = MODELS[model]
    clients = pd.read_csv(path)
    scored = pd.DataFrame.from_dict(dict(per_site), orient="index").add_prefix(prefix)
    clients = clients.drop(columns=[c for c in clients if c.startswith(prefix)])
    clients = clients.join(scored, on="client")
    with rundir.atomic(path, "w") as file:
        clients.to_csv(file, index=False)
    return True


def audit_run(run_dir: str | Path) -> dict[str, Any] | None:
    """Audit a run's ``clients.csv`` and write the audit to ``sites.md``; None without it.

    Parameters
    ----------
    run_dir : str or Path
        The run folder.

    Returns
    -------
    dict or None
        :func:`audit` of the run's sites.
    """
    path = Path(run_dir) / rundir.CLIENTS_FILE
    if not path.is_file():
        return None
    clients = pd.read_csv(path)
    summary = audit(clients)
    rundir.write_text(Path(run_dir) / rundir.SITES_FILE, to_markdown(summary, clients))
    return summary


def to_markdown(summary: dict[str, Any], clients: pd.DataFrame) -> str:
    """``sites.md``: the summary per model and metric, then every site's scores."""
    models = list(summary["models"])
    lines = [
        "# Every site on its own test slice",
        "",
        "Each model is scored at each site on the site's own held-out test slice (never the "
        "server's global test set, which no personal model reaches): the global model, the "
        "site's personal model (any personalize but none), the site trained alone "
        "(local_<model>) and the model trained centrally on every site's training rows pooled "
        "(simulation.central_sites). Worst = lowest macro-F1 and recall, highest FPR; p10 = the "
        f"{PERCENTILE}th percentile of the sites from that worse end; spread = best - worst.",
        "",
        "| model | metric | worst (site) | p10 | median | best | spread | sites |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for model in models:
        for metric, s in summary["models"][model].items():
            if not s.get("sites"):
                continue
            lines.append(
                f"| {model} | {metric} | {s['worst']:.3f} ({s['worst_site']}) | {s['p10']:.3f} | "
                f"{s['median']:.3f} | {s['best']:.3f} | {s['spread']:.3f} | {s['sites']} |"
            )
    worse = summary.get("worse_than_alone")
    if worse:
        lines += [""] + [
            f"- The {model} model scores a lower macro-F1 than training alone at "
            f"**{count} of {worse['compared']}** sites."
            for model, count in worse.items()
            if model != "compared"
        ]
    header = [c for m in models for c in (column(m, k) for k in AUDITED) if c in clients]
    lines += [
        "",
        "## Per site",
        "",
        "| site | " + " | ".join(header) + " |",
        "|---|" + "---|" * len(header),
    ]
    for _, row in clients.iterrows():
        cells = [_cell(row.get(c)) for c in header]
        lines.append(f"| {int(row['client'])} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _cell(value: Any) -> str:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return ""
    return "" if math.isnan(number) else f"{number:.3f}"
