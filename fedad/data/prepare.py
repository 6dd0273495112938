"""From a dataset config to the one train/test split every model in a run shares."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.model_selection import train_test_split
from sklearn.preprocessing import StandardScaler

from fedad.data import audit, sources
from fedad.data.prepared import PreparedData
from fedad.data.preprocess import Preprocessor, infer_categorical
from fedad.errors import FedadError

log = logging.getLogger(__name__)

TASKS = ("binary", "multiclass")


def prepare(
    dataset: Mapping, preprocess: Mapping, task: str, data_dir: str | Path, seed: int
) -> PreparedData:
    """Load, label, de-duplicate, split, audit and encode a dataset.

    Everything learnt from data (category vocabularies, medians, the scaler) is
    fitted on the training part only. Duplicates are dropped before a
    single-file split, so no row can sit on both sides of it.

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
    train = _labelled(raw.train, dataset, task)
    test = _labelled(raw.test, dataset, task) if raw.test is not None else None

    features = _feature_columns(train, dataset)
    if preprocess.get("drop_duplicates", True):
        train, notes["duplicates_dropped_train"] = _dedup(train, features)
        if test is not None:
            test, notes["duplicates_dropped_test"] = _dedup(test, features)
    if test is None:
        train, test = _split(train, float(preprocess.get("test_size", 0.2)), seed)
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
    )


def _labelled(frame: pd.DataFrame, dataset: Mapping, task: str) -> pd.DataFrame:
    """Add ``_attack`` (0/1) and ``_class`` (class name; normal rows are 'normal')."""
    label = dataset["label_column"]
    if label not in frame.columns:
        hint = (
            " Only one column was read: is dataset.sep right for this file?"
            if frame.shape[1] == 1
            else ""
        )
        raise FedadError(
            f"Label column '{label}' (dataset.label_column) is not in the data. Columns found: "
            f"{', '.join(map(str, frame.columns))}.{hint} Set dataset.label_column to one of them."
        )
    frame = frame.copy()
    values = frame[label].astype(str).str.strip()
    normal = str(dataset["normal_value"]).strip()
    is_normal = values == normal
    numeric = pd.to_numeric(values, errors="coerce")
    normal_number = pd.to_numeric(pd.Series([normal]), errors="coerce")[0]
    if not np.isnan(normal_number):
        is_normal |= numeric == normal_number
    frame["_attack"] = (~is_normal).astype(int)

    if task == "binary":
        frame["_class"] = np.where(is_normal, "normal", "attack")
        return frame
    class_column = dataset.get("class_column") or label
    if class_column not in frame.columns:
        raise FedadError(
            f"task=multiclass needs an attack-type column, but dataset.class_column="
            f"'{class_column}' is not in the data (columns: {', '.join(map(str, frame.columns))})."
            " Set dataset.class_column, or use task=binary."
        )
    classes = frame[class_column].astype(str).str.strip()
    class_map = dict(dataset.get("class_map") or {})
    if class_map:
        classes = classes.map(lambda c: class_map.get(c, c))
    frame["_class"] = np.where(is_normal, "normal", classes)
    return frame


def _feature_columns(frame: pd.DataFrame, dataset: Mapping) -> list[str]:
    drop = list(dataset.get("drop_columns") or [])
    missing = [c for c in drop if c not in frame.columns]
    if missing:
        log.info("dataset.drop_columns names columns that are absent: %s", missing)
    target = {dataset["label_column"], dataset.get("class_column")}
    skip = set(drop) | target | {dataset.get("natural_column"), "_attack", "_class"}
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


def _split(frame: pd.DataFrame, test_size: float, seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    if not 0 < test_size < 1:
        raise FedadError(f"preprocess.test_size must be in (0, 1); got {test_size}.")
    if len(frame) < 4:
        raise FedadError(
            f"The dataset has {len(frame)} usable rows after cleaning: too few to split into "
            "training and test parts."
        )
    counts = frame["_class"].value_counts()
    # Stratify on the class when every class can appear on both sides, else on the binary label.
    strata = frame["_class"] if counts.min() >= 2 else frame["_attack"]
    train, test = train_test_split(frame, test_size=test_size, random_state=seed, stratify=strata)
    return train.reset_index(drop=True), test.reset_index(drop=True)


def _shared_rows(train: pd.DataFrame, test: pd.DataFrame, features: list[str]) -> int:
    seen = set(pd.util.hash_pandas_object(train[features], index=False))
    return int(pd.util.hash_pandas_object(test[features], index=False).isin(seen).sum())


def _class_names(train: pd.DataFrame, test: pd.DataFrame, task: str) -> list[str]:
    if task == "binary":
        return ["normal", "attack"]
    attacks = sorted((set(train["_class"]) | set(test["_class"])) - {"normal"})
    return ["normal", *attacks]
