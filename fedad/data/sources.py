"""Read a dataset named by config into raw train (and test) frames."""

from __future__ import annotations

import csv
import logging
import lzma
import zipfile
import zlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from fedad.config import checks
from fedad.data import layouts, synthetic
from fedad.data.preprocess import numeric_share
from fedad.errors import FedadError

log = logging.getLogger(__name__)

# dataset.label_case: exact = a label must equal dataset.normal_value, spaces around it
# aside; insensitive = case is ignored too, and class names are reported in lower case.
LABEL_CASES = ("exact", "insensitive")
# Rows of a column looked at to judge whether a file's first row is a header.
HEADER_SAMPLE = 1000
# dataset.encoding_errors: strict = a byte that is not UTF-8 stops the read; replace = it is read
# as U+FFFD (CIC-IDS2017 writes an en dash as the Windows-1252 byte 0x96).
ENCODING_ERRORS = ("strict", "replace")
# Label cells read at a time when checking, before a run starts, that a file holds two classes.
LABEL_CHUNK = 100_000


@dataclass
class RawData:
    """Raw frames as read, before any cleaning.

    ``test`` is None when the dataset is one file; the caller then splits ``train``.
    ``warnings`` holds what was noticed on the way (a header that looks like data,
    labels spelt almost like the normal value, ...), each also logged.
    """

    train: pd.DataFrame
    test: pd.DataFrame | None
    origin: str
    warnings: list[str] = field(default_factory=list)

    def warn(self, text: str) -> None:
        """Log ``text`` as a warning and keep it for ``results.json``."""
        _warn(self.warnings, text)


def check_config(cfg: Mapping) -> list[str]:
    """What is wrong with a ``dataset`` config's types; empty when it can be read.

    Whether the files exist and hold the columns named is checked when they are read.

    Parameters
    ----------
    cfg : Mapping
        The ``dataset`` config group.

    Returns
    -------
    list[str]
        One phrase per problem, naming the key.
    """
    if cfg.get("name") == "synthetic":
        return synthetic.check_arguments(
            cfg.get("n_rows"),
            cfg.get("n_sites"),
            cfg.get("attack_share"),
            cfg.get("overlap"),
            profile=cfg.get("profile", "iot"),
        )
    problems = [
        checks.flag(cfg, "header", "dataset"),
        checks.flag(cfg, "drop_duplicates", "dataset"),
    ]
    problems.append(checks.choice(cfg, "label_case", "dataset", LABEL_CASES))
    problems.append(checks.choice(cfg, "encoding_errors", "dataset", ENCODING_ERRORS))
    for key in ("sep", "label_column"):
        if key in cfg and not (isinstance(cfg[key], str) and cfg[key]):
            problems.append(f"dataset.{key} must be a non-empty text, got {cfg[key]!r}")
    problems += _number_format_problems(cfg)
    for key in ("path", "train_file", "test_file", "class_column", "natural_column"):
        if cfg.get(key) is not None and not isinstance(cfg[key], str):
            problems.append(f"dataset.{key} must be a text (or null), got {cfg[key]!r}")
    for key in ("columns", "categorical_columns", "drop_columns"):
        value = cfg.get(key)
        if value is not None and (
            isinstance(value, str | Mapping) or not hasattr(value, "__iter__")
        ):
            problems.append(f"dataset.{key} must be a list of column names, got {value!r}")
    if cfg.get("class_map") is not None and not isinstance(cfg["class_map"], Mapping):
        problems.append(
            f"dataset.class_map must be a mapping of class names, got {cfg['class_map']!r}"
        )
    problems += layouts.source_problems(cfg) + layouts.release_problems(cfg)
    return [p for p in problems if p]


def _number_format_problems(cfg: Mapping) -> list[str]:
    """``dataset.thousands`` (or null) and ``dataset.decimal``: one character each, distinct."""
    problems = []
    marks = {}
    for key, default in (("thousands", None), ("decimal", ".")):
        value = cfg.get(key, default)
        if value is None and key == "thousands":
            continue
        if not (isinstance(value, str) and len(value) == 1):
            problems.append(f"dataset.{key} must be one character (e.g. ','), got {value!r}")
            continue
        marks[key] = value
    if len(marks) == 2 and marks["thousands"] == marks["decimal"]:
        problems.append(
            f"dataset.thousands and dataset.decimal must differ, both are {marks['decimal']!r}"
        )
    return problems


def load(cfg: Mapping, data_dir: str | Path, seed: int) -> RawData:
    """Load the dataset that ``cfg`` (the ``dataset`` config group) describes.

    Parameters
    ----------
    cfg : Mapping
        ``name: synthetic`` calls the built-in generator; anything else is read
        as CSV from ``path``, or from ``train_file`` and ``test_file``, relative
        to ``data_dir`` unless absolute.
    data_dir : str or Path
        Folder holding the real datasets (``data_dir`` in the run config).
    seed : int
        Seed for the synthetic generator.

    Returns
    -------
    RawData
        The train frame, the test frame if the dataset ships one, and a short
        description of where they came from: the file, and the release of
        ``dataset.releases`` its header was recognised as.
    """
    if cfg["name"] == "synthetic":
        frame = synthetic.generate(
            n_rows=int(cfg["n_rows"]),
            n_sites=int(cfg["n_sites"]),
            attack_share=float(cfg["attack_share"]),
            overlap=float(cfg["overlap"]),
            seed=seed,
            profile=cfg.get("profile", "iot"),
        )
        return RawData(frame, None, f"synthetic generator (seed {seed})")

    for key in _file_keys(cfg):
        _data_file(cfg, data_dir, key)
    warnings: list[str] = []
    if cfg.get("train_file"):
        train, train_origin = _read_csv(cfg, data_dir, "train_file", warnings)
        test, test_origin = _read_csv(cfg, data_dir, "test_file", warnings)
        _check_same_columns(train, test, cfg)
        return RawData(train, test, f"{train_origin} -> {test_origin}", warnings)
    frame, origin = _read_csv(cfg, data_dir, "path", warnings)
    return RawData(frame, None, origin, warnings)


def read_source(cfg: Mapping, data_dir: str | Path, source: str) -> RawData:
    """Read one source of a dataset that lists ``sources`` (``nf_v2``) into its common frame.

    The sources of such a dataset share one layout (its ``releases`` check each
    file's header), one label column and one normal value: frames read by this
    function can be set side by side.

    Parameters
    ----------
    cfg : Mapping
        The ``dataset`` config group, with ``sources`` (name: ``{path, download}``).
    data_dir : str or Path
        Folder holding the real datasets.
    source : str
        A key of ``cfg["sources"]``.

    Returns
    -------
    RawData
        The source's rows as read (``test`` None), its file and layout in ``origin``.
    """
    if source not in (cfg.get("sources") or {}):
        raise FedadError(layouts.unknown_source(cfg, source) + ".")
    single = {**cfg, "source": source, "path": cfg["sources"][source]["path"]}
    return load({**single, "train_file": None, "test_file": None}, data_dir, seed=0)


def check_files(cfg: Mapping, data_dir: str | Path) -> None:
    """Raise :class:`FedadError` unless the dataset's files exist and can train a model.

    Every file the dataset names must exist (none: synthetic), and its training
    file's label column must hold more than one value. Cheap (the label column
    alone, read until its second value), so a run checks it before it starts
    anything slow (Ray, the actors).
    """
    if cfg["name"] == "synthetic":
        return
    keys = _file_keys(cfg)
    paths = [_data_file(cfg, data_dir, key) for key in keys]
    _check_two_classes(cfg, paths[0], keys[0])


def _file_keys(cfg: Mapping) -> tuple[str, ...]:
    """The keys naming the dataset's files: ``path``, or ``train_file`` and ``test_file``."""
    if cfg.get("train_file"):
        if not cfg.get("test_file"):
            raise FedadError(
                f"dataset '{cfg['name']}' sets dataset.train_file but no dataset.test_file. "
                "Give both, or give a single file as dataset.path and fedad splits it."
            )
        return ("train_file", "test_file")
    if cfg.get("path"):
        return ("path",)
    raise FedadError(
        f"dataset '{cfg['name']}' names no file. Set dataset.path=<file.csv> (fedad splits it "
        "into train and test), or dataset.train_file and dataset.test_file."
    )


def _check_two_classes(cfg: Mapping, path: Path, key: str) -> None:
    """Refuse a training file whose label column holds one value: no model can learn from it."""
    found = single_class(cfg, path)
    if found is None:
        return
    value, rows, read = found
    label = cfg["label_column"]
    where = f" The full dataset comes from {layouts.where(cfg)}." if layouts.where(cfg) else ""
    raise FedadError(
        f"{path} (dataset.{key}) holds a single class: all {rows:,} labelled rows have "
        f"'{value}' in its label column '{read}' (dataset.label_column='{label}', "
        f"dataset.normal_value='{cfg['normal_value']}'). Supervised models learn from normal and "
        "attack rows, and every model, the autoencoder and the unsupervised baselines included "
        "(they learn from normal rows alone), is scored on a test set holding both: no model can "
        f"be trained and tested on this file alone. Point dataset.{key} at a file of this layout "
        f"with both classes, or use it beside a source of the other class.{where}"
    )


def single_class(cfg: Mapping, path: Path) -> tuple[str, int, str] | None:
    """The one label a file holds, if it holds one: cheap, before a run starts anything slow.

    Reads the label column alone, a chunk at a time, and stops at its second
    value. A file the full read will refuse (no such column, not CSV) passes:
    that read names its fault.

    Parameters
    ----------
    cfg : Mapping
        The ``dataset`` config group (its label column, releases, reader settings).
    path : Path
        The data file.

    Returns
    -------
    tuple[str, int, str] or None
        The one value, the labelled rows holding it and the column read; None
        when the file holds two values or more, or cannot be read here.
    """
    label = cfg["label_column"]
    names = {label, *(r.get("label_column") for r in cfg.get("releases") or [])}
    columns = list(cfg["columns"]) if cfg.get("columns") else None
    if columns and label not in columns:
        return None
    values: set[str] = set()
    rows = 0
    try:
        chunks = pd.read_csv(
            path,
            sep=cfg.get("sep", ","),
            header=0 if cfg.get("header", True) else None,
            usecols=[columns.index(label)] if columns else lambda c: str(c).strip() in names,
            dtype=str,
            encoding_errors=cfg.get("encoding_errors", "strict"),
            chunksize=LABEL_CHUNK,
        )
        for chunk in chunks:
            if chunk.shape[1] != 1:  # two columns that could be the label: the full read decides
                return None
            cells = chunk.iloc[:, 0].dropna().str.strip()
            cells = cells[cells != ""]
            values |= set(cells)
            rows += len(cells)
            if len(values) > 1:
                return None
            read = label if columns else str(chunk.columns[0]).strip()
    except (
        ValueError,
        csv.Error,
        EOFError,
        OSError,
        zlib.error,
        lzma.LZMAError,
        zipfile.BadZipFile,
    ):
        return None
    return (values.pop(), rows, read) if values else None


def resolve(data_dir: str | Path, relative: str) -> Path:
    """Return ``relative`` under ``data_dir`` unless it is already absolute."""
    path = Path(relative).expanduser()
    return path if path.is_absolute() else Path(data_dir).expanduser() / path


def looks_like_data(names: Iterable[object]) -> bool:
    """Whether most of ``names`` are numbers: a data row taken for a header.

    Parameters
    ----------
    names : Iterable[object]
        Column names as read.

    Returns
    -------
    bool
    """
    texts = pd.Series([str(n) for n in names], dtype=object)
    return bool(len(texts)) and numeric_share(texts) >= 0.5


def _header_warning(frame: pd.DataFrame, cfg: Mapping, path: Path, key: str) -> str | None:
    """What looks wrong with the header setting of the file just read, if anything."""
    if cfg.get("header", True):
        if not looks_like_data(frame.columns):
            return None
        return (
            f"The header row of {path} (dataset.{key}) looks like data "
            f"({', '.join(map(str, frame.columns[:5]))}): with dataset.header=true it is read "
            "as column names, and lost as a row. If the file has no header, set "
            "dataset.header=false and name the columns in dataset.columns."
        )
    # A header read as data: names above columns whose other cells are numbers.
    sample = frame.iloc[1 : HEADER_SAMPLE + 1]
    numeric = [c for c in frame.columns if len(sample) and numeric_share(sample[c]) >= 0.9]
    first = frame.iloc[0][numeric].dropna().astype(str)
    if first.empty or numeric_share(first) > 0.5:
        return None
    return (
        f"The first row of {path} (dataset.{key}) looks like column names "
        f"({', '.join(frame.iloc[0].astype(str).iloc[:5])}), but dataset.header=false reads it as "
        "a data row. If the file has a header, set dataset.header=true."
    )


def _warn(warnings: list[str], text: str) -> None:
    log.warning(text)
    warnings.append(text)


def _data_file(cfg: Mapping, data_dir: str | Path, key: str) -> Path:
    """The file ``dataset.<key>`` names; a :class:`FedadError` naming the fix if there is none."""
    path = resolve(data_dir, str(cfg[key]))
    if not path.is_file():
        where = layouts.where(cfg) or "the dataset's publisher"
        base = Path(data_dir).expanduser()
        if not Path(str(cfg[key])).expanduser().is_absolute() and not base.is_dir():
            raise FedadError(
                f"data_dir='{data_dir}' is not an existing folder, so dataset.{key}="
                f"'{cfg[key]}' cannot be found under it. Point data_dir (or the FEDAD_DATA_DIR "
                "environment variable) at the folder that holds the datasets, or give "
                f"dataset.{key} as an absolute path. The data comes from {where}."
            )
        if path.is_dir():
            raise FedadError(
                f"{path} (dataset.{key}='{cfg[key]}') is a folder, not a data file. Point "
                f"dataset.{key} at the CSV file inside it."
            )
        raise FedadError(
            f"Data file not found: {path} (from dataset.{key}='{cfg[key]}' under "
            f"data_dir='{data_dir}'). Download it from {where}, put it there, or point "
            "data_dir (or the FEDAD_DATA_DIR environment variable) at the folder that holds it."
        )
    return path


def _read_csv(
    cfg: Mapping, data_dir: str | Path, key: str, warnings: list[str]
) -> tuple[pd.DataFrame, str]:
    """The file ``dataset.<key>`` names, read, and where it came from (its release, if known)."""
    path = _data_file(cfg, data_dir, key)
    columns = list(cfg["columns"]) if cfg.get("columns") else None
    try:
        frame = pd.read_csv(
            path,
            sep=cfg.get("sep", ","),
            header=0 if cfg.get("header", True) else None,
            thousands=cfg.get("thousands"),
            decimal=cfg.get("decimal", "."),
            skipinitialspace=True,
            low_memory=False,
            encoding_errors=cfg.get("encoding_errors", "strict"),
        )
    except pd.errors.EmptyDataError as err:
        raise FedadError(
            f"Data file {path} (dataset.{key}) is empty. Check that the download finished and "
            "that the file is the CSV the dataset config expects."
        ) from err
    except (
        pd.errors.ParserError,
        UnicodeDecodeError,
        csv.Error,
        EOFError,
        OSError,
        # A damaged compressed file: its decompressor's own error.
        zlib.error,
        lzma.LZMAError,
        zipfile.BadZipFile,
    ) as err:
        reason = " ".join(str(err).split())
        raise FedadError(
            f"Data file {path} (dataset.{key}) could not be read as CSV: {reason}. Check the "
            f"delimiter (dataset.sep='{cfg.get('sep', ',')}'), the header setting "
            f"(dataset.header={cfg.get('header', True)}) and that the file is not truncated or "
            "corrupted."
        ) from err
    if frame.empty:
        raise FedadError(
            f"Data file {path} (dataset.{key}) has a header but no data rows. Check that the "
            "download finished."
        )
    noticed = _header_warning(frame, cfg, path, key)
    if noticed:
        _warn(warnings, noticed)
    if columns:
        # Checked here: pandas given fewer names than fields silently makes the extra fields an
        # index, and given more names fills the missing columns with NaN.
        if frame.shape[1] != len(columns):
            raise FedadError(
                f"Data file {path} (dataset.{key}) has {frame.shape[1]} fields per row, but "
                f"dataset.columns names {len(columns)}. List one name per field, in file order "
                f"(check dataset.sep='{cfg.get('sep', ',')}' too)."
            )
        frame.columns = columns
    frame.columns = [str(c).strip() for c in frame.columns]
    return layouts.recognise(frame, cfg, path, key)


def _check_same_columns(train: pd.DataFrame, test: pd.DataFrame, cfg: Mapping) -> None:
    missing = [c for c in train.columns if c not in test.columns]
    extra = [c for c in test.columns if c not in train.columns]
    if missing or extra:
        raise FedadError(
            f"The test file ({cfg['test_file']}) and the train file ({cfg['train_file']}) have "
            f"different columns: missing from test {missing or 'none'}, only in test "
            f"{extra or 'none'}. Both files must share one schema; fix the files or "
            "dataset.columns."
        )
