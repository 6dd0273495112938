"""The report's poisoning and privacy parts: macro-F1 against the attacker share and against ε."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from fedad import rundir
from fedad.evaluation.metrics import attack_success_rate
from fedad.report import figures
from fedad.report.markdown import format_value

# The settings a poisoning or privacy row is grouped by, besides what it measures.
ATTACK_KEYS = ("attack", "share", "strategy")
PRIVACY_KEYS = ("privacy", "num_clients", "noise_multiplier")
# A robust strategy counts as holding when its macro-F1 stays this close to its clean run.
WITHIN = 0.02


def job_rows(root: Path, jobs: Sequence[str]) -> pd.DataFrame:
    """One row per finished job's federated model: its attack, privacy and scores.

    Parameters
    ----------
    root : Path
        The reported folder.
    jobs : Sequence[str]
        Job folders (relative to ``root``) that finished.

    Returns
    -------
    pd.DataFrame
        ``job``, ``model``, ``strategy``, ``seed``, ``num_clients``, ``attack``,
        ``share`` (malicious sites / sites; 0 without attack), ``privacy``,
        ``noise_multiplier``, ``epsilon``, ``delta``, ``macro_f1``, ``fpr`` and
        ``attack_success`` (under a targeted attack; for a clean run, computed
        from its confusion matrix for the classes a targeted run in the folder
        targets, else every attack class). Jobs without a readable federated
        result are left out.
    """
    found = []
    for job in dict.fromkeys(jobs):
        try:
            results = rundir.read_results(root / job)
        except (OSError, ValueError):
            continue
        settings = results.get("settings") or {}
        for name, entry in (results.get("models") or {}).items():
            if isinstance(entry, dict) and entry.get("kind") == "federated":
                found.append((job, name, settings, entry))
    targets = _targets([entry for *_, entry in found])
    rows = []
    for job, name, settings, entry in found:
        info = entry.get("info") or {}
        attack, privacy = info.get("attack") or {}, info.get("privacy") or {}
        success = entry.get("attack_success")
        if success is None and attack.get("name", "none") == "none" and entry.get("confusion"):
            success = attack_success_rate(entry["confusion"], targets)
        rows.append(
            {
                "job": job,
                "model": name,
                "strategy": settings.get("strategy"),
                "seed": settings.get("seed"),
                "num_clients": settings.get("num_clients"),
                "attack": attack.get("name", "none"),
                "share": float(attack.get("share", 0.0)),
                "privacy": privacy.get("name", "none"),
                "noise_multiplier": privacy.get("noise_multiplier"),
                "epsilon": privacy.get("epsilon"),
                "delta": privacy.get("delta"),
                "macro_f1": entry.get("macro_f1"),
                "fpr": entry.get("fpr"),
                "attack_success": success,
            }
        )
    return pd.DataFrame(rows)


def _targets(entries: list[dict]) -> list[int]:
    """The classes targeted runs target, as codes of the confusion matrix; default: all attacks."""
    width = max((len(e.get("confusion") or []) for e in entries), default=2)
    for entry in entries:
        attack = (entry.get("info") or {}).get("attack") or {}
        target = attack.get("target_class")
        if attack.get("name") == "targeted_flip" and target is not None:
            names = list(entry.get("per_class_recall") or {})
            if target in names:
                return [names.index(target)]
    return list(range(1, max(width, 2)))


def poisoning_table(rows: pd.DataFrame) -> pd.DataFrame:
    """Macro-F1, FPR, attack success and the drop against the clean run, per attack and share.

    Parameters
    ----------
    rows : pd.DataFrame
        From :func:`job_rows`.

    Returns
    -------
    pd.DataFrame
        One row per attack, attacker share and strategy, the clean runs (share 0)
        repeated under every attack: ``n`` and mean/std (over seeds) of
        ``macro_f1``, ``fpr``, ``attack_success`` and ``drop`` (clean macro-F1 of the
        same strategy and seed minus this run's). Empty without an attacked run.
    """
    rows = rows[rows["privacy"] == "none"] if not rows.empty else rows
    if rows.empty or not (rows["attack"] != "none").any():
        return pd.DataFrame()
    clean = rows[rows["attack"] == "none"]
    reference = clean.groupby(["strategy", "seed"])["macro_f1"].mean()
    parts = []
    for attack in sorted(rows.loc[rows["attack"] != "none", "attack"].unique()):
        part = pd.concat([clean.assign(attack=attack), rows[rows["attack"] == attack]])
        keys = list(zip(part["strategy"], part["seed"], strict=True))
        part = part.assign(drop=[reference.get(k, np.nan) for k in keys] - part["macro_f1"])
        parts.append(part)
    frame = pd.concat(parts, ignore_index=True)
    grouped = frame.groupby(list(ATTACK_KEYS), sort=True)
    out = grouped.agg(n=("job", "nunique"))
    for value in ("macro_f1", "fpr", "attack_success", "drop"):
        numbers = pd.to_numeric(frame[value], errors="coerce").groupby(
            [frame[k] for k in ATTACK_KEYS]
        )
        out[f"{value}_mean"], out[f"{value}_std"] = numbers.mean(), numbers.std()
    return out.reset_index()


def privacy_table(rows: pd.DataFrame) -> pd.DataFrame:
    """Macro-F1 against ε per DP option, site count and noise multiplier, with the no-DP reference.

    Returns
    -------
    pd.DataFrame
        One row per setting: ``n``, ``epsilon`` (mean), ``macro_f1_mean``/``_std``,
        ``reference_f1`` (the same site count without DP, when the folder holds it)
        and ``kept`` (macro-F1 minus the reference). Empty without a DP run.
    """
    if rows.empty or not (rows["privacy"] != "none").any():
        return pd.DataFrame()
    rows = rows[rows["attack"] == "none"]
    private = rows[rows["privacy"] != "none"]
    reference = rows[rows["privacy"] == "none"].groupby("num_clients")["macro_f1"].mean()
    grouped = private.groupby(list(PRIVACY_KEYS), sort=True)
    out = grouped.agg(
        n=("job", "nunique"),
        epsilon=("epsilon", "mean"),
        delta=("delta", "first"),
        macro_f1_mean=("macro_f1", "mean"),
        macro_f1_std=("macro_f1", "std"),
    ).reset_index()
    out["reference_f1"] = [reference.get(n, np.nan) for n in out["num_clients"]]
    out["kept"] = out["macro_f1_mean"] - out["reference_f1"]
    return out


def write(root: Path, out_dir: Path, done_jobs: Sequence[str], skipped: pd.DataFrame) -> list[str]:
    """Write ``poisoning.csv``, ``privacy.csv`` and their figures; return the report's lines.

    Parameters
    ----------
    root, out_dir : Path
        The reported folder and where the report goes.
    done_jobs : Sequence[str]
        Finished job folders, relative to ``root``.
    skipped : pd.DataFrame
        The skipped jobs (``job``, ``error``): outside a strategy's bound.

    Returns
    -------
    list[str]
        Markdown lines (none when the folder holds no attack and no DP run).
    """
    rows = job_rows(root, done_jobs)
    lines: list[str] = []
    poisoning = poisoning_table(rows)
    if not poisoning.empty or not skipped.empty:
        poisoning.to_csv(out_dir / "poisoning.csv", index=False)
        lines += _poisoning_lines(poisoning, skipped, out_dir)
    private = privacy_table(rows)
    if not private.empty:
        private.to_csv(out_dir / "privacy.csv", index=False)
        path = figures.f1_versus_epsilon(private, out_dir / "f1_vs_epsilon.png")
        lines += _privacy_lines(private, path.name)
    return lines


def _poisoning_lines(table: pd.DataFrame, skipped: pd.DataFrame, out_dir: Path) -> list[str]:
    lines = ["## Poisoning", ""]
    if not table.empty:
        lines += [
            "Federated macro-F1 by attack, attacker share and strategy, mean ± std over seeds "
            "(share 0: the same strategy and seed without attack); drop = clean macro-F1 − "
            "attacked macro-F1 of the same strategy and seed; attack success = share of the "
            "targeted attack rows of the test set scored normal. Table: `poisoning.csv`.",
            "",
            *_headline(table),
        ]
        header = ["attack", "share", "strategy", "n", "macro-F1", "drop", "FPR", "attack success"]
        body = [
            [
                r["attack"],
                format_value(r["share"]),
                r["strategy"],
                str(r["n"]),
                *(_pm(r, v) for v in ("macro_f1", "drop", "fpr", "attack_success")),
            ]
            for _, r in table.iterrows()
        ]
        lines += ["| " + " | ".join(header) + " |", "|---|---:|---|" + "---:|" * 5]
        lines += ["| " + " | ".join(cells) + " |" for cells in body] + [""]
        for name, path in figures.poisoning(table, out_dir).items():
            lines += [f"{name}: `{path.name}`", "", f"![{name}]({path.name})", ""]
    if not skipped.empty:
        lines += ["Skipped, outside a strategy's bound on attackers:", ""]
        lines += [f"- `{r['job']}`: {r['error']}" for _, r in skipped.iterrows()] + [""]
    return lines


def _headline(table: pd.DataFrame) -> list[str]:
    """Per attack, at its largest share: FedAvg's drop, the best defence, targeted success."""
    lines = []
    for attack, rows in table.groupby("attack", sort=True):
        top = rows[rows["share"] == rows["share"].max()]
        if top.empty or top["share"].iloc[0] == 0:
            continue
        share = format_value(top["share"].iloc[0])
        fedavg = top[top["strategy"] == "fedavg"]
        parts = [f"FedAvg drops {_pm(fedavg.iloc[0], 'drop')}"] if len(fedavg) else []
        robust = top[top["strategy"] != "fedavg"].dropna(subset=["drop_mean"])
        if len(robust):
            best = robust.loc[robust["drop_mean"].idxmin()]
            held = "within" if best["drop_mean"] <= WITHIN else "not within"
            parts.append(
                f"best defence {best['strategy']} drops {_pm(best, 'drop')} ({held} "
                f"{WITHIN} of its clean run)"
            )
        if attack == "targeted_flip" and top["attack_success_mean"].notna().any():
            least = top.loc[top["attack_success_mean"].idxmin()]
            parts.append(
                "attack success "
                + ", ".join(
                    f"{r['strategy']} {_pm(r, 'attack_success')}"
                    for _, r in top.iterrows()
                    if r["strategy"] in ("fedavg", least["strategy"])
                )
            )
        if parts:
            lines.append(f"- **{attack}, share {share}:** " + "; ".join(parts) + ".")
    return [*lines, ""] if lines else []


def _privacy_lines(table: pd.DataFrame, figure: str) -> list[str]:
    lines = [
        "## Privacy",
        "",
        "Federated macro-F1 against the privacy budget ε (site-level, at the δ shown, over the "
        "whole run; RDP accounting without amplification by sampling), mean ± std over seeds; "
        "reference: the same number of sites without DP. Table: `privacy.csv`.",
        "",
    ]
    header = ["privacy", "sites", "noise multiplier", "n", "ε", "δ", "macro-F1", "no DP", "kept"]
    lines += ["| " + " | ".join(header) + " |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for _, r in table.iterrows():
        cells = [
            r["privacy"],
            format_value(r["num_clients"]),
            format_value(r["noise_multiplier"]),
            str(r["n"]),
            f"{r['epsilon']:.3g}",
            format_value(r["delta"]),
            _pm(r, "macro_f1"),
            "–" if pd.isna(r["reference_f1"]) else f"{r['reference_f1']:.3f}",
            "–" if pd.isna(r["kept"]) else f"{r['kept']:+.3f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return [*lines, "", f"![macro-F1 against epsilon]({figure})", ""]


def _pm(row: pd.Series, value: str) -> str:
    mean, std = row[f"{value}_mean"], row.get(f"{value}_std", np.nan)
    if pd.isna(mean):
        return "–"
    return f"{mean:.3f}" if pd.isna(std) else f"{mean:.3f} ± {std:.3f}"
