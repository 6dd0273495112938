"""From a dataset config to the one train/test split every model in a run shares."""

from __future__ import annotations

import difflib
import logging
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.model_selection import train_test_split
from sklearn.preprocessing import StandardScaler

from fedad.data import audit, sources
from fedad.data.labels import classify
from fedad.data.prepared import PreparedData
from fedad.data.preprocess import Preprocessor, infer_categorical
from fedad.errors import FedadError

log = logging.getLogger(__name__)

TASKS = ("binary", "multiclass")
# Columns prepare adds to the raw frame: the binary label and the class name.
INTERNAL = ("_attack", "_class")


def prepare(
    dataset: Mapping, preprocess: Mapping, task: str, data_dir: str | Path, seed: int
) -> PreparedData:
    """Load, label, de-duplicate, split, audit and encode a dataset.

    Everything learnt from data (category vocabularies, medians, the scaler) is
    fitted on the training part only. Duplicates are dropped before a
    single-file split, so no row can sit on both sides of it.

    Recoveries, each counted in ``notes`` (and so in ``results.json`` under
    ``data``): rows whose label is empty, such as the cut-off last line of a
    truncated file, are dropped (``rows_without_label``); NaN, ±inf and text
    in numeric columns become the training median (``cleaned_cells``, see
    :class:`~fedad.data.preprocess.Preprocessor`); categories absent from the
    training part encode as zeros (``unseen_categories``).

    Parameters
    ----------
    dataset : Mapping
        The ``dataset`` config group.
    preprocess : Mapping
        The ``preprocess`` config: ``log_transform``, ``drop_duplicates``,
        ``test_size``, ``audit_threshold``.
    task : str
        ``binary`` or ``multiclass``.
    data_dir : str or Path
        Folder of the real datasets.
    seed : int
        Seed for the split and the synthetic generator.

    Returns
    -------
    PreparedData
    """
    if task not in TASKS:
        raise FedadError(f"task must be one of {', '.join(TASKS)} (got '{task}').")
    raw = sources.load(dataset, data_dir, seed)
    notes: dict = {"origin": raw.origin}
    train, notes["rows_without_label"] = _labelled(raw.train, dataset, task)
    test = None
    if raw.test is not None:
        test, unlabelled = _labelled(raw.test, dataset, task)
        notes["rows_without_label"] += unlabelled

    dropped = 0

    features = _feature_columns(train, dataset)
    # A dataset config may overrule it: telemetry repeats the same reading by nature.
    if dataset.get("drop_duplicates", preprocess.get("drop_duplicates", True)):
        train, notes["duplicates_dropped_train"] = _dedup(train, features)
        dropped = notes["duplicates_dropped_train"]
        if test is not None:
            test, notes["duplicates_dropped_test"] = _dedup(test, features)
    if test is None:
        train, test = _split(train, float(preprocess.get("test_size", 0.2)), seed, dropped)
    notes["duplicates_shared_train_test"] = _shared_rows(train, test, features)
    if notes["duplicates_shared_train_test"]:
        log.warning(
            "%d test rows have an identical feature row in the training part; scores on them "
            "measure recall of seen traffic, not generalisation.",
            notes["duplicates_shared_train_test"],
        )

    class_names = _class_names(train, test, task)
    codes = {name: i for i, name in enumerate(class_names)}
    y_train = train["_class"].map(codes).to_numpy(np.int64)
    y_test = test["_class"].map(codes).to_numpy(np.int64)
    if len(np.unique(y_train)) < 2:
        raise FedadError(
            f"The training data holds a single class ('{class_names[y_train[0]]}'), so there is "
            f"nothing to learn to separate. Check dataset.label_column="
            f"'{dataset['label_column']}' and dataset.normal_value='{dataset['normal_value']}'."
        )

    table = audit.single_feature_auc(train[features], train["_attack"].to_numpy(), seed)
    notes["audit"] = table.to_dict(orient="records")
    notes["audit_flagged"] = audit.flag(table, float(preprocess.get("audit_threshold", 0.98)))

    categorical = dataset.get("categorical_columns")
    categorical = (
        list(categorical) if categorical is not None else infer_categorical(train[features])
    )
    unknown = [c for c in categorical if c not in features]
    if unknown:
        raise FedadError(
            f"dataset.categorical_columns names {unknown}, which are not feature columns. "
            f"Feature columns: {', '.join(features)}."
        )
    encoder = Preprocessor(categorical, bool(preprocess.get("log_transform", True)))
    encoder.fit(train[features])
    X_train = encoder.transform(train[features])
    X_test = encoder.transform(test[features])
    notes["cleaned_cells"] = dict(encoder.cleaned)
    notes["unseen_categories"] = dict(encoder.unseen)
    if encoder.unseen:
        log.warning(
            "test rows hold categories never seen in training, encoded as all zeros: %s",
            ", ".join(f"{col} ({n} cells)" for col, n in encoder.unseen.items()),
        )

    natural = dataset.get("natural_column")
    return PreparedData(
        X_train=X_train,
        y_train=y_train,
        X_test=X_test,
        y_test=y_test,
        feature_names=encoder.feature_names,
        class_names=class_names,
        task=task,
        groups_train=train[natural].astype(str).to_numpy() if natural else None,
        scaler=StandardScaler().fit(X_train),
        notes=notes,
        preprocessor=encoder,
    )


def _labelled(frame: pd.DataFrame, dataset: Mapping, task: str) -> tuple[pd.DataFrame, int]:
    """Add ``_attack`` (0/1) and ``_class`` (class name; normal rows are 'normal').

    Rows without a label (an empty cell, or a row cut short as the last line of a
    truncated file) cannot be learnt from or scored: they are dropped and counted.
    """
    label = dataset["label_column"]
    if label not in frame.columns:
        hint = (
            " Only one column was read: is dataset.sep right for this file?"
            if frame.shape[1] == 1
            else _did_you_mean(label, frame.columns)
        )
        raise FedadError(
            f"Label column '{label}' (dataset.label_column) is not in the data. Columns found: "
            f"{', '.join(map(str, frame.columns))}.{hint} Set dataset.label_column to one of them."
        )
    frame, unlabelled = _drop_unlabelled(frame, label)
    class_column = dataset.get("class_column") or label
    if task != "binary" and class_column not in frame.columns:
        columns = [c for c in frame.columns if c not in INTERNAL]
        raise FedadError(
            f"task=multiclass needs an attack-type column, but dataset.class_column="
            f"'{class_column}' is not in the data (columns: {', '.join(map(str, columns))})."
            f"{_did_you_mean(class_column, columns)} Set dataset.class_column to the column "
            "naming each row's attack type, or use task=binary."
        )
    frame["_attack"], frame["_class"] = classify(frame, dataset, task)
    return frame, unlabelled


def _did_you_mean(name: str, columns: Iterable[object]) -> str:
    close = difflib.get_close_matches(str(name), [str(c) for c in columns], n=1, cutoff=0.6)
    return f" Did you mean '{close[0]}'?" if close else ""


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


def _feature_columns(frame: pd.DataFrame, dataset: Mapping) -> list[str]:
    drop = list(dataset.get("drop_columns") or [])
    missing = [c for c in drop if c not in frame.columns]
    if missing:
        log.info("dataset.drop_columns names columns that are absent: %s", missing)
    target = {dataset["label_column"], dataset.get("class_column")}
    skip = set(drop) | target | {dataset.get("natural_column"), *INTERNAL}
    features = [c for c in frame.columns if c not in skip]
    if not features:
        raise FedadError(
            "No feature columns are left after removing the label and dataset.drop_columns. "
            "Drop fewer columns."
        )
    return features


def _dedup(frame: pd.DataFrame, features: list[str]) -> tuple[pd.DataFrame, int]:
    kept = frame.drop_duplicates(subset=[*features, "_class"], ignore_index=True)
    return kept, len(frame) - len(kept)


def _split(
    frame: pd.DataFrame, test_size: float, seed: int, duplicates: int = 0
) -> tuple[pd.DataFrame, pd.DataFrame]:
    if not 0 < test_size < 1:
        raise FedadError(
            f"preprocess.test_size must be in (0, 1); got {test_size}. It is the share of rows "
            "held out for testing, e.g. preprocess.test_size=0.2."
        )
    dups = (
        f" ({duplicates} exact duplicate rows were dropped; preprocess.drop_duplicates=false "
        "keeps them, at the risk of the same row on both sides of the split)"
        if duplicates
        else ""
    )
    if len(frame) < 4:
        raise FedadError(
            f"The dataset has {len(frame)} usable rows after cleaning{dups}: too few to split "
            "into training and test parts. Use a file with more distinct labelled rows."
        )
    counts = frame["_class"].value_counts()
    # Stratify on the class when every class can appear on both sides, else on the binary label.
    strata = frame["_class"] if counts.min() >= 2 else frame["_attack"]
    try:
        train, test = train_test_split(
            frame, test_size=test_size, random_state=seed, stratify=strata
        )
    except ValueError as err:
        reason = " ".join(str(err).split()).rstrip(".")
        raise FedadError(
            f"Cannot split the {len(frame)} usable rows{dups} into training and test parts with "
            f"preprocess.test_size={test_size} and every class on both sides: {reason}. Use a "
            "file with more rows of each class, or a different preprocess.test_size."
        ) from err
    return train.reset_index(drop=True), test.reset_index(drop=True)


def _shared_rows(train: pd.DataFrame, test: pd.DataFrame, features: list[str]) -> int:
    seen = set(pd.util.hash_pandas_object(train[features], index=False))
    return int(pd.util.hash_pandas_object(test[features], index=False).isin(seen).sum())


def _class_names(train: pd.DataFrame, test: pd.DataFrame, task: str) -> list[str]:
    if task == "binary":
        return ["normal", "attack"]
    attacks = sorted((set(train["_class"]) | set(test["_class"])) - {"normal"})
    return ["normal", *attacks]
