"""How a row's label is read: the binary attack flag and the class name, and near-miss spellings."""

from __future__ import annotations

import difflib
import logging
from collections.abc import Iterable, Mapping

import numpy as np
import pandas as pd

from fedad.data.sources import looks_like_data
from fedad.errors import FedadError

log = logging.getLogger(__name__)

# Columns labelling adds to the raw frame: the binary label and the class name.
INTERNAL = ("_attack", "_class")


def attach(
    train: pd.DataFrame, test: pd.DataFrame | None, dataset: Mapping, task: str
) -> tuple[pd.DataFrame, pd.DataFrame | None, dict]:
    """Add ``_attack`` (0/1) and ``_class`` (class name; normal rows are ``normal``).

    Labels and class names are compared after stripping the spaces around them;
    with ``dataset.label_case=insensitive`` also without regard to case. Rows
    without a label (an empty cell, or a row cut short as the last line of a
    truncated file) cannot be learnt from or scored: they are dropped and counted.

    Parameters
    ----------
    train : pd.DataFrame
        The raw rows of the training file (or of the one file).
    test : pd.DataFrame or None
        The raw rows of the test file, if the dataset has one.
    dataset : Mapping
        The ``dataset`` config group.
    task : str
        ``binary`` or ``multiclass``.

    Returns
    -------
    train, test : pd.DataFrame
        The labelled rows (``test`` None when it was).
    facts : dict
        Over both files: ``rows_without_label``; ``label_variants`` (spellings
        of the label that differ from ``dataset.normal_value`` only in case or
        spacing and were not taken as normal, with their row counts);
        ``class_variants`` (multiclass: class spellings that differ only in
        case or spacing and so stay separate classes, with their row counts).
    """
    parts = [_attach(frame, dataset, task) for frame in (train, test) if frame is not None]
    columns = [dataset["label_column"], *INTERNAL]
    labelled = pd.concat([frame[columns] for frame, _, _ in parts], ignore_index=True)
    near = np.concatenate([mask for _, _, mask in parts])
    values = labelled[dataset["label_column"]].astype(str).str.strip()
    facts = {
        "rows_without_label": sum(n for _, n, _ in parts),
        "label_variants": _counts(values[near]),
        "class_variants": {},
    }
    if task == "multiclass":
        # Near misses of the normal value in the class column are reported once, above.
        same = (dataset.get("class_column") or dataset["label_column"]) == dataset["label_column"]
        attacks = labelled.loc[(labelled["_attack"] == 1) & ~(near & same), "_class"]
        spellings = attacks.groupby(_loose(attacks)).unique()
        clashes = [c for group in spellings if len(group) > 1 for c in group]
        facts["class_variants"] = _counts(attacks[attacks.isin(clashes)])
    return parts[0][0], parts[1][0] if test is not None else None, facts


def _attach(
    frame: pd.DataFrame, dataset: Mapping, task: str
) -> tuple[pd.DataFrame, int, np.ndarray]:
    """One file's labelled rows, its unlabelled count and which labels are near misses."""
    label = dataset["label_column"]
    if label not in frame.columns:
        hint = ""
        if frame.shape[1] == 1:
            hint = " Only one column was read: is dataset.sep right for this file?"
        elif looks_like_data(frame.columns):
            hint = " These names look like data: does the file lack a header (dataset.header)?"
        raise missing_column(label, "label_column", frame.columns, hint)
    frame, unlabelled = _drop_unlabelled(frame, label)
    class_column = dataset.get("class_column") or label
    if task != "binary" and class_column not in frame.columns:
        columns = [c for c in frame.columns if c not in INTERNAL]
        raise FedadError(
            f"task=multiclass needs an attack-type column, but dataset.class_column="
            f"'{class_column}' is not in the data (columns: {', '.join(map(str, columns))})."
            f"{did_you_mean(class_column, columns)} Set dataset.class_column to the column "
            "naming each row's attack type, or use task=binary."
        )
    attack, classes, near = classify(frame, dataset, task)
    frame["_attack"], frame["_class"] = attack, classes
    return frame, unlabelled, near


def classify(
    frame: pd.DataFrame, dataset: Mapping, task: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each row's binary label, class name, and whether its label is a near miss of normal.

    Used for the training and test files, and by a saved detector on rows it scores.

    Parameters
    ----------
    frame : pd.DataFrame
        Rows holding ``dataset.label_column`` (and, for the multiclass task,
        ``dataset.class_column``: the caller checks it is there), every label
        cell filled.
    dataset : Mapping
        ``label_column``, ``normal_value``, ``label_case``, and for the
        multiclass task ``class_column`` and ``class_map``.
    task : str
        ``binary`` (classes ``normal``/``attack``) or ``multiclass``.

    Returns
    -------
    attack, classes, near : np.ndarray
        ``int`` 0/1; class names (normal rows are ``normal``); ``bool``, a label
        spelt like the normal value but for case or spaces (not taken as normal).
    """
    label = dataset["label_column"]
    insensitive = dataset.get("label_case", "exact") == "insensitive"
    values = frame[label].astype(str).str.strip()
    normal = str(dataset["normal_value"]).strip()
    is_normal = _fold(values, insensitive) == (normal.casefold() if insensitive else normal)
    numeric = pd.to_numeric(values, errors="coerce")
    normal_number = pd.to_numeric(pd.Series([normal]), errors="coerce")[0]
    if not np.isnan(normal_number):
        is_normal |= numeric == normal_number
    attack = (~is_normal).astype(int).to_numpy()
    near = (~is_normal & (_loose(values) == _loose(pd.Series([normal]))[0])).to_numpy()
    if task == "binary":
        return attack, np.where(is_normal, "normal", "attack"), near
    class_column = dataset.get("class_column") or label
    classes = _fold(frame[class_column].astype(str).str.strip(), insensitive)
    class_map = {
        str(k).casefold() if insensitive else str(k): str(v)
        for k, v in (dataset.get("class_map") or {}).items()
    }
    if class_map:
        classes = _fold(classes.map(lambda c: class_map.get(c, c)), insensitive)
    return attack, np.where(is_normal, "normal", classes), near


def near_misses(facts: dict, dataset: Mapping) -> list[str]:
    """One sentence per kind of near-miss spelling in ``facts``, naming the fix.

    Parameters
    ----------
    facts : dict
        From :func:`attach`.
    dataset : Mapping
        The ``dataset`` config group.

    Returns
    -------
    list[str]
        Empty when no spelling was a near miss.
    """
    found = []
    if facts["label_variants"]:
        found.append(
            f"The label column '{dataset['label_column']}' holds values that differ from "
            f"dataset.normal_value='{dataset['normal_value']}' only in case or spacing: "
            f"{_listing(facts['label_variants'])}. They are counted as attacks. Set "
            "dataset.label_case=insensitive to count case variants as normal, or fix the file."
        )
    if facts["class_variants"]:
        column = dataset.get("class_column") or dataset["label_column"]
        found.append(
            f"The class column '{column}' holds class names that differ only in case or "
            f"spacing: {_listing(facts['class_variants'])}. Each spelling is a class of its "
            "own. Set dataset.label_case=insensitive to merge case variants, or map them with "
            "dataset.class_map."
        )
    return found


def missing_column(name: object, key: str, columns: Iterable[object], hint: str = "") -> FedadError:
    """The error for a column that ``dataset.<key>`` names but the data does not hold.

    Parameters
    ----------
    name : object
        The column named.
    key : str
        The ``dataset`` key that names it, e.g. ``label_column``.
    columns : Iterable[object]
        The columns the data holds.
    hint : str
        A sentence to add (default: a close match, if any).

    Returns
    -------
    FedadError
    """
    shown = [str(c) for c in columns if c not in INTERNAL]
    hint = hint or did_you_mean(name, shown)
    return FedadError(
        f"Column '{name}' (dataset.{key}) is not in the data. Columns found: "
        f"{', '.join(shown)}.{hint} Set dataset.{key} to one of them."
    )


def did_you_mean(name: object, columns: Iterable[object]) -> str:
    """`` Did you mean 'x'?`` for the closest of ``columns``, or nothing."""
    close = difflib.get_close_matches(str(name), [str(c) for c in columns], n=1, cutoff=0.6)
    return f" Did you mean '{close[0]}'?" if close else ""


def _fold(values: pd.Series, insensitive: bool) -> pd.Series:
    return values.str.casefold() if insensitive else values


def _loose(values: pd.Series) -> pd.Series:
    """Spellings compared without case or spaces: what a reader takes for the same word."""
    return values.str.casefold().str.replace(r"\s+", "", regex=True)


def _counts(values: pd.Series) -> dict[str, int]:
    return {str(k): int(v) for k, v in values.value_counts().sort_index().items()}


def _listing(counts: Mapping[str, int]) -> str:
    return ", ".join(f"'{value}' ({n} row{'s' if n != 1 else ''})" for value, n in counts.items())


def _drop_unlabelled(frame: pd.DataFrame, label: str) -> tuple[pd.DataFrame, int]:
    empty = frame[label].isna() | (frame[label].astype(str).str.strip() == "")
    n_empty = int(empty.sum())
    if n_empty == len(frame):
        raise FedadError(
            f"Every row has an empty label column '{label}' (dataset.label_column), so there is "
            "nothing to learn from. Check that dataset.label_column names the label, and that "
            "dataset.columns (for a file without a header) lists as many names as the file has "
            "fields, in order."
        )
    if n_empty:
        log.warning(
            "%d row(s) have an empty label column '%s' (a truncated last line, or empty cells); "
            "they are dropped. results.json counts them as data.rows_without_label.",
            n_empty,
            label,
        )
        frame = frame.loc[~empty].reset_index(drop=True)
    # A copy, consolidated: the label columns are added to it next.
    return frame.copy(), n_empty
