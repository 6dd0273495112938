"""A dataset's file layouts: the release a header is read as, and named sources of one layout."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

import pandas as pd

from fedad.errors import FedadError

log = logging.getLogger(__name__)


def recognise(frame: pd.DataFrame, cfg: Mapping, path: Path, key: str) -> tuple[pd.DataFrame, str]:
    """The release of ``dataset.releases`` that a file is, its label put in the config's terms.

    A release is recognised when the header holds every one of its ``marks``
    and its label column; the first that fits is the one read, and is logged.
    Its label column and normal value, where they differ from
    ``dataset.label_column`` and ``dataset.normal_value``, are renamed to them,
    so every release of a dataset is read into one frame.

    Parameters
    ----------
    frame : pd.DataFrame
        The file as read, column names stripped.
    cfg : Mapping
        The ``dataset`` config group; without ``releases`` the frame is returned as it is.
    path : Path
        The file, for messages.
    key : str
        The ``dataset`` key naming the file (``path``, ``train_file``, ``test_file``).

    Returns
    -------
    frame : pd.DataFrame
        The rows, their label column and normal value the config's.
    origin : str
        The file as ``dataset.<key>`` names it, with its release in brackets.

    Raises
    ------
    FedadError
        The header fits no release: each release's missing columns named.
    """
    releases = cfg.get("releases") or []
    if not releases:
        return frame, str(cfg[key])
    target = cfg["label_column"]
    missing = {}
    for release in releases:
        label = release.get("label_column") or target
        missing[release["name"]] = [c for c in [*release["marks"], label] if c not in frame.columns]
        if missing[release["name"]]:
            continue
        if target not in frame.columns:
            frame = frame.rename(columns={label: target})
        normal = release.get("normal_value")
        if normal is not None and str(normal) != str(cfg["normal_value"]):
            is_normal = frame[target].astype(str).str.strip() == str(normal)
            frame[target] = frame[target].mask(is_normal, cfg["normal_value"])
        log.info("%s (dataset.%s) is read as the %s", path, key, release["name"])
        return frame, f"{cfg[key]}, read as the {release['name']}"
    lacks = "; ".join(f"the {name} needs {', '.join(cols)}" for name, cols in missing.items())
    raise FedadError(
        f"dataset '{cfg['name']}' reads the {' or the '.join(missing)}, but the header of {path} "
        f"(dataset.{key}) fits none of them: {lacks}. Point dataset.{key} at a file of one of "
        "these layouts, or read this file with dataset=csv and settings of its own."
    )


def release_problems(cfg: Mapping) -> list[str]:
    """What is wrong with ``dataset.releases``: {name, marks, label_column?, normal_value?} each.

    Parameters
    ----------
    cfg : Mapping
        The ``dataset`` config group.

    Returns
    -------
    list[str]
        One phrase naming the key, or nothing.
    """
    releases = cfg.get("releases")
    if releases is None:
        return []
    shape = (
        "dataset.releases must list {name: <text>, marks: [<column>, ...]} (label_column and "
        f"normal_value optional), got {releases!r}"
    )
    if isinstance(releases, str | Mapping) or not isinstance(releases, Sequence):
        return [shape]
    for release in releases:
        marks = release.get("marks") if isinstance(release, Mapping) else None
        if not (
            isinstance(release, Mapping)
            and isinstance(release.get("name"), str)
            and isinstance(marks, Sequence)
            and not isinstance(marks, str)
            and marks
            and all(isinstance(m, str) for m in marks)
        ):
            return [shape]
    return []


def source_problems(cfg: Mapping) -> list[str]:
    """What is wrong with ``dataset.sources`` (name: {path, download}) and ``dataset.source``.

    Parameters
    ----------
    cfg : Mapping
        The ``dataset`` config group; without ``sources``, ``source`` is free text
        (where the data comes from) and nothing is checked.

    Returns
    -------
    list[str]
        One phrase naming the key, or nothing.
    """
    known = cfg.get("sources")
    if known is None:
        return []
    if not isinstance(known, Mapping) or not all(
        isinstance(v, Mapping) and isinstance(v.get("path"), str) for v in known.values()
    ):
        return [f"dataset.sources must map each source name to {{path: <file>}}, got {known!r}"]
    if cfg.get("source") not in known:
        return [unknown_source(cfg, cfg.get("source"))]
    return []


def unknown_source(cfg: Mapping, source: object) -> str:
    """The phrase for a source name that ``dataset.sources`` does not list, naming those it does."""
    return (
        f"dataset.source={source!r} is not a source of dataset '{cfg.get('name')}', which knows "
        f"{', '.join(map(str, cfg['sources']))}. Set dataset.source to one of them, or add another "
        "file of this layout as +dataset.sources.<name>.path=<file> (relative to data_dir)"
    )


def where(cfg: Mapping) -> str | None:
    """Where the dataset's files come from, for messages: its source's download, or ``source``."""
    known = cfg.get("sources") or {}
    if cfg.get("source") in known:
        return known[cfg["source"]].get("download")
    return cfg.get("source")
