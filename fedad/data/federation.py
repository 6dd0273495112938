"""A federation of sources: each organisation's rows read on one feature set, labelled by source."""

from __future__ import annotations

import csv
from collections.abc import Mapping, Sequence
from pathlib import Path

import pandas as pd

from fedad.data import sources
from fedad.data.sources import RawData
from fedad.errors import FedadError

# The column of the pooled frame naming each row's source; never a feature.
SOURCE = "_source"


def members(dataset: Mapping) -> list[str]:
    """The sources ``dataset.federate`` lists, in order; empty for a dataset of one source."""
    return [str(name) for name in dataset.get("federate") or []]


def check_config(dataset: Mapping, partition: Mapping) -> list[str]:
    """What is wrong with ``dataset.federate`` and ``partition=by_source``; empty when they fit.

    Parameters
    ----------
    dataset : Mapping
        The ``dataset`` config group.
    partition : Mapping
        The ``partition`` config group.

    Returns
    -------
    list[str]
        One phrase per problem, naming the key.
    """
    federate = dataset.get("federate")
    if federate is None:
        if partition.get("name") == "by_source":
            return [
                "partition=by_source gives each site one source's rows, but dataset "
                f"'{dataset.get('name')}' sets no dataset.federate; use dataset=federation (or "
                "list the sources in dataset.federate), or another partition"
            ]
        return []
    known = dataset.get("sources") or {}
    if (
        isinstance(federate, str | Mapping)
        or not isinstance(federate, Sequence)
        or not all(isinstance(name, str) for name in federate)
    ):
        return [f"dataset.federate must list source names, got {federate!r}"]
    if len(set(federate)) < 2 or len(set(federate)) != len(federate):
        return [
            f"dataset.federate must list two or more distinct sources, got {list(federate)}; a "
            "run on one source is dataset.source=<name> of its own dataset"
        ]
    unknown = [name for name in federate if name not in known]
    if unknown:
        return [
            f"dataset.federate names {', '.join(map(repr, unknown))}, not a source of dataset "
            f"'{dataset.get('name')}', which knows {', '.join(map(str, known)) or 'none'}; list "
            "known sources, or add another file of this layout as "
            "+dataset.sources.<name>.path=<file> (relative to data_dir)"
        ]
    return []


def check_files(dataset: Mapping, data_dir: str | Path) -> None:
    """Raise :class:`FedadError` unless the dataset's files exist and each can train a model.

    A dataset of one source is checked by :func:`fedad.data.sources.check_files`.
    A federation's sources must each exist, hold both classes (each source's
    test set must measure a detector, and each source trains one alone) and
    share one feature set. Cheap (headers and label columns), so a run checks
    it before Ray starts.

    Parameters
    ----------
    dataset : Mapping
        The ``dataset`` config group.
    data_dir : str or Path
        Folder holding the real datasets.
    """
    names = members(dataset)
    if not names:
        sources.check_files(dataset, data_dir)
        return
    headers = {}
    for name in names:
        path = _source_file(dataset, data_dir, name)
        found = sources.single_class(dataset, path)
        if found is not None:
            value, rows, read = found
            raise FedadError(
                f"Source '{name}' of dataset.federate ({path}, dataset.sources.{name}.path) holds "
                f"a single class: all {rows:,} labelled rows have '{value}' in its label column "
                f"'{read}'. Each source is split into training and test rows of its own, its test "
                "rows are scored by every detector and a detector is trained on it alone, so "
                f"each needs normal and attack rows. Remove '{name}' from dataset.federate, or "
                f"point dataset.sources.{name}.path at a file with both classes."
            )
        headers[name] = _header(dataset, path)
    check_features(dataset, headers)


def check_features(dataset: Mapping, columns: Mapping[str, Sequence[str]]) -> None:
    """Refuse sources whose feature columns differ, naming the columns each lacks or adds.

    Parameters
    ----------
    dataset : Mapping
        The ``dataset`` config group: its label, class and dropped columns are not features.
    columns : Mapping[str, Sequence[str]]
        Each source's columns as read.
    """
    features = {name: _features(dataset, cols) for name, cols in columns.items()}
    first, *others = features
    differences = []
    for name in others:
        lacks = [c for c in features[first] if c not in features[name]]
        adds = [c for c in features[name] if c not in features[first]]
        if lacks:
            differences.append(f"'{name}' lacks {', '.join(lacks)}")
        if adds:
            differences.append(f"'{name}' has {', '.join(adds)}, which '{first}' lacks")
    if differences:
        raise FedadError(
            "The sources of dataset.federate must share one feature set (one model is "
            f"federated over them and scored on each one's test rows), but {'; '.join(differences)}"
            ". Give every source a file of the same layout, or add the columns that differ to "
            "dataset.drop_columns."
        )


def load(dataset: Mapping, data_dir: str | Path) -> RawData:
    """Every source of ``dataset.federate`` read and pooled, each row's source in :data:`SOURCE`.

    Parameters
    ----------
    dataset : Mapping
        The ``dataset`` config group, with ``federate`` and ``sources``.
    data_dir : str or Path
        Folder holding the real datasets.

    Returns
    -------
    RawData
        The pooled rows (``test`` None: each source is split on its own rows),
        every source's file and layout in ``origin``, their warnings.
    """
    read = {name: sources.read_source(dataset, data_dir, name) for name in members(dataset)}
    check_features(dataset, {name: list(raw.train.columns) for name, raw in read.items()})
    frames = [raw.train.assign(**{SOURCE: name}) for name, raw in read.items()]
    return RawData(
        pd.concat(frames, ignore_index=True),
        None,
        "; ".join(f"{name}: {raw.origin}" for name, raw in read.items()),
        [text for raw in read.values() for text in raw.warnings],
    )


def breakdown(train: pd.DataFrame, test: pd.DataFrame, dropped: Mapping[str, int]) -> dict:
    """Per source: its training and test rows, their class counts, its duplicates dropped.

    Parameters
    ----------
    train, test : pd.DataFrame
        The labelled, de-duplicated and split rows, with :data:`SOURCE` and ``_class``.
    dropped : Mapping[str, int]
        Each source's exact duplicates dropped before its split.

    Returns
    -------
    dict
        ``{source: {n_train, n_test, duplicates_dropped, train_classes, test_classes}}``.
    """
    facts = {}
    for name in dict.fromkeys(train[SOURCE]):
        own_train, own_test = train[train[SOURCE] == name], test[test[SOURCE] == name]
        facts[str(name)] = {
            "n_train": int(len(own_train)),
            "n_test": int(len(own_test)),
            "duplicates_dropped": int(dropped.get(name, 0)),
            "train_classes": _counts(own_train["_class"]),
            "test_classes": _counts(own_test["_class"]),
        }
    return facts


def _counts(classes: pd.Series) -> dict[str, int]:
    return {str(name): int(n) for name, n in classes.value_counts().items()}


def _source_file(dataset: Mapping, data_dir: str | Path, name: str) -> Path:
    path = sources.resolve(data_dir, str(dataset["sources"][name]["path"]))
    if not path.is_file():
        where = dataset["sources"][name].get("download") or "the dataset's publisher"
        raise FedadError(
            f"Source '{name}' of dataset.federate has no file at {path} (dataset.sources.{name}"
            f".path='{dataset['sources'][name]['path']}' under data_dir='{data_dir}'). Download "
            f"it from {where} and put it there, point data_dir (or the FEDAD_DATA_DIR "
            "environment variable) at the folder that holds it, or remove it from "
            "dataset.federate."
        )
    return path


def _header(dataset: Mapping, path: Path) -> list[str]:
    """A source file's column names (its header row alone), or the configured ones."""
    if dataset.get("columns"):
        return [str(c) for c in dataset["columns"]]
    try:
        frame = pd.read_csv(
            path,
            sep=dataset.get("sep", ","),
            nrows=0,
            encoding_errors=dataset.get("encoding_errors", "strict"),
        )
    except (ValueError, csv.Error, EOFError, OSError) as err:
        raise FedadError(
            f"The header of {path} (a source of dataset.federate) could not be read: "
            f"{' '.join(str(err).split())}. Check that the file is a complete CSV of the "
            "dataset's layout."
        ) from err
    return [str(c).strip() for c in frame.columns]


def _features(dataset: Mapping, columns: Sequence[str]) -> list[str]:
    """The feature columns among ``columns``: not a label, class, dropped or internal column."""
    labels = {
        dataset["label_column"],
        dataset.get("class_column"),
        *(release.get("label_column") for release in dataset.get("releases") or []),
    }
    skip = labels | set(dataset.get("drop_columns") or []) | {SOURCE}
    return [c for c in columns if c not in skip]
