"""From a dataset config to the one train/test split every model in a run shares."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.model_selection import train_test_split
from sklearn.preprocessing import StandardScaler

from fedad.data import audit, federation, labels, sources
from fedad.data.audit import MIN_CLASS_ROWS, small_classes
from fedad.data.federation import SOURCE
from fedad.data.labels import INTERNAL
from fedad.data.prepared import PreparedData
from fedad.data.preprocess import (
    NUMERIC_SHARE,
    Preprocessor,
    infer_categorical,
    numeric_share,
    written_numbers,
)
from fedad.errors import FedadError

log = logging.getLogger(__name__)

TASKS = ("binary", "multiclass")


def prepare(
    dataset: Mapping, preprocess: Mapping, task: str, data_dir: str | Path, seed: int
) -> PreparedData:
    """Load, label, de-duplicate, split, audit and encode a dataset.

    Everything learnt from data (category vocabularies, medians, the scaler) is
    fitted on the training part only. Duplicates are dropped before a
    single-file split, so no row can sit on both sides of it. A federation of
    sources (``dataset.federate``) is de-duplicated and split source by source,
    so each source's test rows come from its own rows; the test set is their
    union (``sources_test`` says which source each row is from).

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
    federated = bool(federation.members(dataset))
    raw = federation.load(dataset, data_dir) if federated else sources.load(dataset, data_dir, seed)
    notes: dict = {"origin": raw.origin, "warnings": raw.warnings}
    train, test, facts = labels.attach(raw.train, raw.test, dataset, task)
    notes.update(facts)
    for text in labels.near_misses(facts, dataset):
        raw.warn(text)
    natural = dataset.get("natural_column")
    if natural and natural not in train.columns:
        raise labels.missing_column(natural, "natural_column", train.columns)

    dropped = 0

    features = _feature_columns(train, dataset)
    # A dataset config may overrule it: telemetry repeats the same reading by nature.
    read = train[SOURCE].value_counts() if federated else None
    if dataset.get("drop_duplicates", preprocess.get("drop_duplicates", True)):
        train, notes["duplicates_dropped_train"] = _dedup(train, features)
        dropped = notes["duplicates_dropped_train"]
        if test is not None:
            test, notes["duplicates_dropped_test"] = _dedup(test, features)
    if test is None:
        # Each source split on its own rows, stratified within it: its test set is its own.
        pieces = [
            _split(rows, float(preprocess.get("test_size", 0.2)), seed, dropped)
            for _, rows in (train.groupby(SOURCE, sort=False) if federated else [(None, train)])
        ]
        train, test = (pd.concat(side, ignore_index=True) for side in zip(*pieces, strict=True))
    if read is not None:
        kept = train[SOURCE].value_counts().add(test[SOURCE].value_counts(), fill_value=0)
        notes["sources"] = federation.breakdown(train, test, read.sub(kept).astype(int))
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
    notes["small_test_classes"] = _check_test_classes(y_test, class_names, dataset, raw)

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
    notes["written_numbers"] = _written_numbers(train[features], categorical, dataset, raw)
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
    if encoder.out_of_range:
        raw.warn(
            "Values too large for float32 (beyond ±3.4e38) were replaced by the training median "
            "and counted as cleaned_cells.out_of_range: "
            + ", ".join(f"'{col}' ({n} cells)" for col, n in encoder.out_of_range.items())
            + ". preprocess.log_transform=true keeps such values, on a log scale."
        )

    return PreparedData(
        X_train=X_train,
        y_train=y_train,
        X_test=X_test,
        y_test=y_test,
        feature_names=encoder.feature_names,
        class_names=class_names,
        task=task,
        groups_train=train[natural].astype(str).to_numpy() if natural else None,
        types_train=_attack_types(train, dataset, task),
        types_test=_attack_types(test, dataset, task),
        sources_train=train[SOURCE].astype(str).to_numpy() if federated else None,
        sources_test=test[SOURCE].astype(str).to_numpy() if federated else None,
        scaler=StandardScaler().fit(X_train),
        notes=notes,
        preprocessor=encoder,
    )


def _attack_types(train: pd.DataFrame, dataset: Mapping, task: str) -> np.ndarray | None:
    """Each training row's attack type, for a binary task whose data name the types."""
    column = dataset.get("class_column") or dataset["label_column"]
    if task != "binary" or column not in train.columns:
        return None
    _, classes, _ = labels.classify(train, dataset, "multiclass")
    return np.asarray(classes, dtype=object) if len(set(classes)) > 2 else None


def _feature_columns(frame: pd.DataFrame, dataset: Mapping) -> list[str]:
    drop = list(dataset.get("drop_columns") or [])
    missing = [c for c in drop if c not in frame.columns]
    if missing:
        log.info("dataset.drop_columns names columns that are absent: %s", missing)
    target = {dataset["label_column"], dataset.get("class_column")}
    skip = set(drop) | target | {dataset.get("natural_column"), SOURCE, *INTERNAL}
    features = [c for c in frame.columns if c not in skip]
    if not features:
        raise FedadError(
            "No feature columns are left after removing the label and dataset.drop_columns. "
            "Drop fewer columns."
        )
    return features


def _dedup(frame: pd.DataFrame, features: list[str]) -> tuple[pd.DataFrame, int]:
    # Within a source only: the same flow seen by two organisations is a row of each.
    own = [SOURCE] if SOURCE in frame.columns else []
    kept = frame.drop_duplicates(subset=[*features, "_class", *own], ignore_index=True)
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


def _check_test_classes(
    y_test: np.ndarray, class_names: list[str], dataset: Mapping, raw: sources.RawData
) -> dict[str, int]:
    """Refuse a test set that cannot measure a detector; flag its classes with few rows."""
    present = np.unique(y_test)
    if len(present) < 2:
        where = (
            f"The test file (dataset.test_file={dataset['test_file']})"
            if raw.test is not None
            else "The test part of the split"
        )
        raise FedadError(
            f"{where} holds {len(y_test)} row(s) of a single class "
            f"('{class_names[present[0]]}'), so no score of a model on it means anything "
            "(macro-F1, ROC-AUC, PR-AUC and FPR need normal and attack rows). Use a test file "
            "with both, or give one file as dataset.path and fedad splits it."
        )
    small = small_classes(y_test, class_names)
    if small:
        raw.warn(
            f"The test set holds fewer than {MIN_CLASS_ROWS} rows of "
            + ", ".join(f"'{name}' ({n})" for name, n in small.items())
            + ": scores of those classes, and the macro averages, rest on few rows."
        )
    return small


def _written_numbers(
    frame: pd.DataFrame, categorical: list[str], dataset: Mapping, raw: sources.RawData
) -> dict[str, int]:
    """Warn of numbers the reader left as text: one-hot encoded, or cleaned as junk."""
    found = {}
    for col, (n, example, setting) in written_numbers(frame).items():
        if col in categorical:
            # Listed by the user, or mostly text: one-hot encoding is what was asked.
            if dataset.get("categorical_columns") is not None:
                continue
            if numeric_share(frame[col]) + n / frame[col].notna().sum() < NUMERIC_SHARE:
                continue
            fate = "is one-hot encoded as categorical"
        else:
            fate = f"has {n} such cells replaced by the median as junk text"
        found[col] = n
        raw.warn(
            f"Column '{col}' holds numbers written as text (e.g. '{example}') and {fate}. Set "
            f"{setting} (dataset.thousands / dataset.decimal say how the file writes numbers) "
            "to read them as numbers."
        )
    return found
