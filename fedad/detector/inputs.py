"""Raw rows in the training file's own format, read in chunks and checked column by column."""

from __future__ import annotations

import csv
import lzma
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from fedad import rundir
from fedad.data.preprocess import numeric_share
from fedad.data.sources import looks_like_data
from fedad.detector.scorer import Detector
from fedad.errors import FedadError

CHUNK_ROWS = 65536
# Cells named per column in an error message.
SHOWN = 3
# What reading a damaged file raises: the CSV parser's errors, and each decompressor's own
# (gzip's BadGzipFile and bz2's are OSErrors, a truncated stream an EOFError).
CSV_ERRORS = (pd.errors.ParserError, UnicodeDecodeError, csv.Error)
READ_ERRORS = (*CSV_ERRORS, EOFError, OSError, zlib.error, lzma.LZMAError, zipfile.BadZipFile)
# The suffixes pandas reads as compressed files, and what each is.
COMPRESSED = {".gz": "gzip", ".bz2": "bzip2", ".zip": "zip", ".xz": "xz", ".zst": "zstandard"}
# Share of a numeric column's cells that must be numbers for a headerless file to fit.
NUMERIC_FIT = 0.5


@dataclass
class InputFile:
    """How to read one input file, found from its first line and the detector's reader settings.

    Attributes
    ----------
    path : Path
    header : int or None
        ``0`` when the file starts with a row of column names.
    names : list[str] or None
        Column names for a file without a header row.
    columns : list[str]
        Every column of the file, names stripped.
    ignored : list[str]
        Columns the detector does not use (neither features, labels nor dropped ones).
    """

    path: Path
    header: int | None
    names: list[str] | None
    columns: list[str]
    ignored: list[str]


def open_input(detector: Detector, path: str | Path) -> InputFile:
    """Check that ``path`` holds rows the detector can score, and say how to read them.

    A dataset read without a header row (NSL-KDD) takes its fields in the
    training file's column order: a file may stop after the last feature (no
    label) or carry extra fields (ignored); a first row of column names is
    recognised too.

    Raises
    ------
    FedadError
        When the file is absent, empty, unreadable or lacks a needed column.
    """
    path = Path(path)
    if not path.is_file():
        raise FedadError(f"Input file {path} does not exist (or is a folder): give a CSV file.")
    reader = detector.manifest["reader"]
    first = _first_row(path, reader["sep"])
    stripped = [str(c).strip() for c in first]
    expected = list(reader.get("columns") or [])
    if reader["header"] or set(detector.features) <= set(stripped):
        header, names, columns = 0, None, stripped
    else:
        extra = [f"extra_{i + 1}" for i in range(len(first) - len(expected))]
        header, names = None, expected[: len(first)] + extra
        columns = names
    missing = [c for c in detector.features if c not in columns]
    if missing and not names and looks_like_data(stripped):
        raise FedadError(
            f"Input file {path} has no header row (its first row looks like data: "
            f"{', '.join(stripped[:SHOWN])}, ...), but the detector's training file had one, so "
            "columns are found by name: add a first row naming the columns. The detector "
            f"reads: {', '.join(detector.features)}."
        )
    if missing:
        layout = (
            f" The file has no header row, so its {len(first)} fields per row are read in the "
            f"training file's order ({', '.join(expected)})."
            if names
            else ""
        )
        raise FedadError(
            f"Input file {path} lacks column(s) the detector needs: {', '.join(missing)}.{layout} "
            f"The detector reads: {', '.join(detector.features)}."
        )
    known = set(detector.features) | set(detector.manifest["schema"]["optional"])
    ignored = [c for c in columns if c not in known]
    return InputFile(path, header, names, columns, ignored)


def chunks(detector: Detector, source: InputFile, rows: int = CHUNK_ROWS) -> Iterator[pd.DataFrame]:
    """The rows of ``source`` in frames of at most ``rows``, numeric columns checked.

    Each frame's index is the row number in the file (0 = first data row).
    """
    reader = detector.manifest["reader"]
    categorical = set(detector.preprocessor.categorical)
    try:
        # Categories stay text, whatever a chunk's cells look like.
        raw = source.names or _raw_header(source.path, reader["sep"])
        dtype = {r: str for r, c in zip(raw, source.columns, strict=True) if c in categorical}
        frames = pd.read_csv(
            source.path,
            sep=reader["sep"],
            header=source.header,
            names=source.names,
            skipinitialspace=True,
            dtype=dtype,
            chunksize=rows,
        )
        first = True
        for frame in frames:
            if frame.empty:  # a header without rows still makes one frame
                continue
            frame.columns = source.columns
            if first and source.names:
                check_fit(detector, frame, source)
            first = False
            check_numbers(frame, detector.preprocessor.numeric, source.path)
            yield frame
    except READ_ERRORS as err:
        raise FedadError(unreadable(source.path, err, reader["sep"])) from None


def check_fit(detector: Detector, frame: pd.DataFrame, source: InputFile) -> None:
    """Refuse a headerless file whose fields do not fit the detector's schema.

    Such a file is read by position, so a file of another dataset with as many
    fields would be scored as if it were the right one. It does not fit when a
    numeric column holds mostly text, or when no categorical column holds a
    single category of its training vocabulary.

    Parameters
    ----------
    detector : Detector
    frame : pd.DataFrame
        The file's first rows, named in the training file's order.
    source : InputFile
    """
    misfits = [
        f"'{col}' should hold numbers but holds {_sample(frame[col])}"
        for col in detector.preprocessor.numeric
        if numeric_share(frame[col]) < NUMERIC_FIT
    ]
    vocabulary = detector.categories
    cells = {col: frame[col].astype(str).str.strip() for col in vocabulary}
    if vocabulary and not any(cells[c].isin(v).any() for c, v in vocabulary.items()):
        misfits += [
            f"'{col}' should hold one of {', '.join(words[:5])}{'...' if len(words) > 5 else ''} "
            f"but holds {_sample(cells[col])}"
            for col, words in vocabulary.items()
        ]
    if misfits:
        raise FedadError(
            f"Input file {source.path} has no header row, so its fields are read in the training "
            f"file's order ({', '.join(source.columns)}), but they do not fit the detector's "
            f"schema: {'; '.join(misfits)}. It looks like a file of another dataset, or with its "
            "columns in another order: give rows in the training file's format."
        )


def unreadable(path: Path, err: BaseException, sep: str) -> str:
    """One paragraph for an input file that could not be read: damaged, compressed or not CSV."""
    reason = " ".join(str(err).split()) or type(err).__name__
    kind = COMPRESSED.get(path.suffix.lower())
    if kind and not isinstance(err, CSV_ERRORS):
        return (
            f"Input file {path} could not be decompressed as {kind} ({reason}): it is truncated "
            f"or damaged, or not {kind} data despite its name. Copy it again, or give it "
            "uncompressed."
        )
    return (
        f"Input file {path} could not be read as CSV: {reason}. The detector reads fields "
        f"separated by '{sep}', as its training file."
    )


def check_output(out: str | Path, inputs: list[Path], overwrite: bool, what: str) -> None:
    """Raise FedadError when ``out`` may not be written: see :func:`fedad.rundir.output_problem`.

    ``what`` names the output in the message, e.g. ``the scores``.
    """
    problem = rundir.output_problem(out, inputs, overwrite)
    if problem:
        raise FedadError(f"Cannot write {what} to {out}: {problem}.")


def check_numbers(frame: pd.DataFrame, numeric: list[str], where: str | Path) -> None:
    """Raise FedadError naming each numeric column with a cell that is not a finite number.

    Parameters
    ----------
    frame : pd.DataFrame
        Rows indexed by their position in the input (0 = first data row).
    numeric : list[str]
        The columns that must hold numbers.
    where : str or Path
        The input, as named in the message.
    """
    problems = []
    for col in numeric:
        values = frame[col]
        parsed = values if values.dtype.kind in "iuf" else pd.to_numeric(values, errors="coerce")
        bad = ~np.isfinite(parsed.to_numpy(dtype=np.float64, na_value=np.nan))
        if bad.any():
            shown = [
                f"row {row + 1}: {_describe(cell)}" for row, cell in values[bad].head(SHOWN).items()
            ]
            problems.append(f"'{col}' ({'; '.join(shown)}; {int(bad.sum())} cell(s) in all)")
    if problems:
        raise FedadError(
            f"{where} has cells that are not finite numbers in numeric column(s): "
            f"{', '.join(problems)}. Rows are counted from 1 after any header row. The "
            "detector needs a number in each of these cells: fix or remove those rows."
        )


def _sample(cells: pd.Series) -> str:
    shown = cells.dropna().astype(str).drop_duplicates().head(SHOWN)
    return ", ".join(f"'{c}'" for c in shown) or "empty cells"


def _describe(cell: object) -> str:
    if cell is None or (isinstance(cell, float) and np.isnan(cell)):
        return "empty"
    return f"'{cell}'"


def _first_row(path: Path, sep: str) -> list[str]:
    try:
        first = pd.read_csv(path, sep=sep, header=None, nrows=1, dtype=str)
    except pd.errors.EmptyDataError:
        raise FedadError(
            f"Input file {path} is empty: there are no rows to score. Give a CSV file in the "
            "training file's format, with one row per flow."
        ) from None
    except READ_ERRORS as err:
        raise FedadError(unreadable(path, err, sep)) from None
    return first.iloc[0].fillna("").tolist()


def _raw_header(path: Path, sep: str) -> list[str]:
    return list(pd.read_csv(path, sep=sep, nrows=0).columns)
