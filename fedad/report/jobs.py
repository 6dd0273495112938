"""One job folder as the report sees it, whatever state its files are in."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import pandas as pd
import yaml

from fedad import rundir
from fedad.evaluation.comparison import REPORTED
from fedad.versions import __version__

# Override keys that name a settings field under another name, or that would clash with a
# column of the tidy table ("model" is the per-row model name, "federated" the per-row flag).
ALIASES = {
    "model": "federated_model",
    "federated": "federated_run",
    "partition.alpha": "alpha",
    "simulation.num_clients": "num_clients",
    "simulation.num_rounds": "num_rounds",
    "decision.rule": "decision",
}


# Statuses of a job the report leaves out of its aggregates, beside failed and skipped: it never
# marked its results done, or another fedad version wrote them.
INCOMPLETE, OTHER_VERSION = "incomplete", "other version"


class Unreadable(Exception):
    """A file of a job folder that cannot be read as the report expects; the text says why."""


def read_job(root: Path, job_dir: Path) -> dict:
    """Read one job folder into the fields of its rows in the tidy table.

    A file that cannot be read (not JSON or YAML, not UTF-8, or not the shape
    fedad writes) makes the job ``failed``, with the reason; what can be read
    is kept.

    Parameters
    ----------
    root : Path
        The reported folder; the job is named by its path relative to it.
    job_dir : Path
        The job's run folder.

    Returns
    -------
    dict
        ``job``, ``status`` (``done``, ``failed``, ``skipped``, ``incomplete`` or
        ``other version``: done by another fedad version, named in ``error``),
        ``overrides`` and ``settings`` (mappings of scalar values), ``models``
        (one mapping per model), ``label_skew``, ``wall_seconds`` and ``error``.
    """
    problems: list[str] = []

    def attempt(read, default):
        try:
            return read()
        except Unreadable as err:
            problems.append(str(err))
            return default

    results = attempt(lambda: _json_object(job_dir / rundir.RESULTS_FILE), None) or {}
    failed = attempt(lambda: _json_object(job_dir / rundir.FAILED_FILE), {})
    overrides = attempt(lambda: _overrides(job_dir / rundir.OVERRIDES_FILE), {})
    settings = attempt(lambda: _section(results, "settings"), {})
    if "model" in settings:
        settings["federated_model"] = settings.pop("model")
    models = _models(results, job_dir, problems)
    error = " ".join(str((failed or {}).get("error") or results.get("error") or "").split())
    if failed is not None or problems or results.get("status") == rundir.FAILED:
        status = rundir.FAILED
        error = "; ".join(filter(None, [error, *problems]))
        error = error or "results.json says failed, but the job left no failed.json."
    elif results.get("status") == rundir.SKIPPED:
        # A sweep skipped it: valid settings outside the chosen method's bound.
        status = rundir.SKIPPED
    else:
        status = rundir.DONE if results.get("status") == rundir.DONE else INCOMPLETE
    written_by = (results.get("versions") or {}).get("fedad") if status == rundir.DONE else None
    if written_by is not None and written_by != __version__:
        # Numbers of another version may come from other code: listed apart, never averaged in.
        status = OTHER_VERSION
        error = f"written by fedad {written_by}; this report is fedad {__version__}"
    return {
        "job": job_dir.relative_to(root).as_posix(),
        "status": status,
        "overrides": overrides,
        "settings": {k: _scalar(v) for k, v in settings.items()},
        "models": models,
        "label_skew": attempt(lambda: _section(results, "partition"), {}).get("label_skew"),
        "wall_seconds": results.get("wall_seconds"),
        "error": error,
    }


def read_table(path: Path) -> pd.DataFrame | None:
    """A CSV file of a job folder, or None when it is absent or unreadable."""
    try:
        return pd.read_csv(path)
    except (OSError, ValueError):
        # ValueError covers pandas' parser and empty-file errors and bad UTF-8.
        return None


def _json_object(path: Path) -> dict | None:
    """The JSON object in ``path``; None when the file is absent."""
    if not path.exists():
        return None
    try:
        return rundir.read_object(path)
    except (OSError, ValueError) as err:
        # ValueError covers broken JSON, bytes that are not UTF-8 and a value not an object.
        raise Unreadable(f"{path.name} is unreadable: {' '.join(str(err).split())}") from err


def _section(results: dict, key: str) -> dict:
    value = results.get(key) or {}
    if not isinstance(value, dict):
        raise Unreadable(f"results.json is unreadable: its '{key}' is a {_kind(value)}")
    return dict(value)


def _overrides(path: Path) -> dict:
    if not path.exists():
        return {}
    try:
        items = yaml.safe_load(path.read_bytes().decode("utf-8")) or []
    except (OSError, ValueError, yaml.YAMLError) as err:
        reason = " ".join(str(err).split())
        raise Unreadable(f"{rundir.OVERRIDES_FILE} is unreadable: {reason}") from err
    if not isinstance(items, list):
        raise Unreadable(
            f"{rundir.OVERRIDES_FILE} is unreadable: it holds a {_kind(items)}, not a list"
        )
    values = {}
    for item in items:
        key, sep, raw = str(item).partition("=")
        if not sep or key.startswith("~"):
            continue
        key = ALIASES.get(key.lstrip("+"), key.lstrip("+"))
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            # Hydra's own syntax (e.g. choice(...), interpolations) is not always YAML.
            value = raw
        if isinstance(value, str):
            # YAML 1.1 reads "1e-3" as text; Hydra reads it as a number.
            with contextlib.suppress(ValueError):
                value = float(value)
        values[key] = _scalar(value, raw)
    return values


def _scalar(value: object, text: str | None = None) -> object:
    """``value`` if a table can group on it; lists and mappings become their text."""
    if value is None or isinstance(value, str | int | float):
        return value
    return text if text is not None else json.dumps(value, default=str)


def _models(results: dict, job_dir: Path, problems: list[str]) -> list[dict]:
    models = results.get("models") or {}
    if not isinstance(models, dict):
        problems.append(f"results.json is unreadable: its 'models' is a {_kind(models)}")
        return []
    if not models:
        frame = read_table(job_dir / rundir.COMPARISON_CSV)
        if frame is None:
            return []
        if "federated" not in frame:
            frame["federated"] = frame.get("kind") == "federated"
        return frame.to_dict("records")
    rows = []
    for name, entry in models.items():
        if not isinstance(entry, dict):
            problems.append(f"results.json is unreadable: model '{name}' is a {_kind(entry)}")
            continue
        kind = entry.get("kind")
        scalars = {
            k: v
            for k, v in entry.items()
            if k != "kind" and isinstance(v, int | float) and not isinstance(v, bool)
        }
        rows.append({"model": name, "kind": kind, "federated": kind == "federated", **scalars})
    return _with_comparison(rows, read_table(job_dir / rundir.COMPARISON_CSV))


def _with_comparison(rows: list[dict], frame: pd.DataFrame | None) -> list[dict]:
    """``rows`` with the comparison's :data:`~fedad.evaluation.comparison.REPORTED` cells."""
    if frame is None or "model" not in frame:
        return rows
    columns = [c for c in REPORTED if c in frame]
    cells = frame.set_index("model")[columns].to_dict("index") if columns else {}
    return [{**row, **cells.get(row["model"], {})} for row in rows]


def _kind(value: object) -> str:
    """``value``'s JSON or YAML kind, in words."""
    if isinstance(value, list):
        return "list"
    if isinstance(value, dict):
        return "mapping"
    return "text" if isinstance(value, str) else type(value).__name__
