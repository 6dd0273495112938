"""Turn raw feature columns into numbers: cleaning, encoding, signed log. Fitted on train only."""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np
import pandas as pd
from sklearn.preprocessing import OneHotEncoder

# A column is categorical when fewer than this share of its non-empty cells parse as numbers.
NUMERIC_SHARE = 0.5
# Every feature ends up float32; a larger magnitude cannot be stored.
FLOAT32_MAX = float(np.finfo(np.float32).max)
# Numbers written with a thousands separator ("32,743", "1.234.567,5", "12 000") or a decimal
# comma ("3,5"): text to a reader that expects "32743" and "3.5".
_THOUSANDS = re.compile(
    r"[+-]?\d{1,3}(?P<mark>[,.' ])\d{3}(?:(?P=mark)\d{3})*(?:(?P<dec>[.,])\d+)?"
)
_DECIMAL_COMMA = re.compile(r"[+-]?\d*,\d+")


def signed_log1p(x: np.ndarray) -> np.ndarray:
    """``sign(x) * log1p(|x|)``: tames heavy-tailed counts, keeps sign, needs no fitting."""
    return np.sign(x) * np.log1p(np.abs(x))


def infer_categorical(frame: pd.DataFrame) -> list[str]:
    """Columns whose non-empty cells are mostly not numbers."""
    found = []
    for col in frame.columns:
        if pd.api.types.is_numeric_dtype(frame[col]) or pd.api.types.is_bool_dtype(frame[col]):
            continue
        if numeric_share(frame[col]) < NUMERIC_SHARE:
            found.append(col)
    return found


def written_numbers(frame: pd.DataFrame) -> dict[str, tuple[int, str, str]]:
    """Text columns holding numbers written with a thousands separator or a decimal comma.

    Parameters
    ----------
    frame : pd.DataFrame
        Raw feature columns.

    Returns
    -------
    dict[str, tuple[int, str, str]]
        Column name to ``(cells, example, setting)``: how many cells are written
        so, the first of them, and the reader setting that reads them as numbers
        (e.g. ``dataset.thousands=','``).
    """
    found = {}
    for col in frame.columns:
        if pd.api.types.is_numeric_dtype(frame[col]) or pd.api.types.is_bool_dtype(frame[col]):
            continue
        cells = frame[col].dropna().astype(str).str.strip()
        # "1.234" is a plain number already; only what the reader left as text counts.
        text = pd.to_numeric(cells, errors="coerce").isna()
        shaped = cells.str.fullmatch(_THOUSANDS.pattern) | cells.str.fullmatch(
            _DECIMAL_COMMA.pattern
        )
        written = cells[text & shaped]
        if written.empty:
            continue
        example = written.iloc[0]
        match = _THOUSANDS.fullmatch(example)
        if match:
            setting = f"dataset.thousands='{match['mark']}'"
            if match["dec"] == ",":
                setting += " dataset.decimal=','"
        else:
            setting = "dataset.decimal=','"
        found[str(col)] = (len(written), example, setting)
    return found


def numeric_share(cells: pd.Series) -> float:
    """Share of the non-empty ``cells`` that parse as numbers (1.0 for none)."""
    cells = cells.dropna()
    if not len(cells):
        return 1.0
    return float(pd.to_numeric(cells, errors="coerce").notna().mean())


class Preprocessor:
    """Numeric cleaning and one-hot encoding, fitted on training rows only.

    Policy for bad numeric cells: text that does not parse as a number, NaN,
    ±inf and values too large for ``float32`` (beyond ±3.4e38 after the
    optional log transform, such as 1e308 sentinels) all become missing and
    are filled with the training median of the column (0 when the column has
    no finite training value). How many cells each rule touched is kept in
    :attr:`cleaned`; :attr:`out_of_range` counts the too-large ones per
    column. Categories unseen in training encode as all zeros (or as the
    column's "infrequent" slot when it has one); :attr:`unseen` counts them
    per column. With ``log_transform`` numeric columns go through
    :func:`signed_log1p` before the median is taken.

    Parameters
    ----------
    categorical : Sequence[str]
        Columns to one-hot encode; every other column is numeric.
    log_transform : bool
        Apply :func:`signed_log1p` to numeric columns.
    max_categories : int
        Rarer categories beyond this many per column share one "infrequent" slot.
    """

    def __init__(
        self, categorical: Sequence[str], log_transform: bool = True, max_categories: int = 64
    ) -> None:
        self.categorical = list(categorical)
        self.log_transform = log_transform
        self.encoder = OneHotEncoder(
            handle_unknown="infrequent_if_exist",
            max_categories=max_categories,
            sparse_output=False,
            dtype=np.float32,
        )
        self.numeric: list[str] = []
        self.medians: np.ndarray = np.empty(0)
        self.cleaned: dict[str, int] = {}
        self.unseen: dict[str, int] = {}
        self.out_of_range: dict[str, int] = {}

    def fit(self, frame: pd.DataFrame) -> Preprocessor:
        """Learn numeric medians and the category vocabulary from training rows."""
        self.numeric = [c for c in frame.columns if c not in self.categorical]
        values, _ = self._bounded(self._parsed(frame)[0])
        with np.errstate(all="ignore"):
            medians = np.nanmedian(values, axis=0) if len(values) else np.zeros(values.shape[1])
        self.medians = np.nan_to_num(medians, nan=0.0)
        if self.categorical:
            self.encoder.fit(self._text(frame))
        return self

    def transform(self, frame: pd.DataFrame) -> np.ndarray:
        """Encode ``frame`` with what :meth:`fit` learned, as a ``float32`` array."""
        values, counts = self._parsed(frame)
        filled, too_large = self.numeric_cells(values)
        counts["out_of_range"] = int(too_large.sum())
        for key, value in counts.items():
            self.cleaned[key] = self.cleaned.get(key, 0) + value
        for col, n in zip(self.numeric, too_large, strict=True):
            if n:
                self.out_of_range[col] = self.out_of_range.get(col, 0) + int(n)
        parts = [filled]
        if self.categorical:
            text = self._text(frame)
            for col, n in self.unseen_in(text).items():
                self.unseen[col] = self.unseen.get(col, 0) + n
            parts.append(self.encoder.transform(text))
        return np.hstack(parts)

    def numeric_cells(self, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Numeric cells encoded as :meth:`transform` encodes them, from parsed numbers.

        Parameters
        ----------
        values : np.ndarray
            ``float64``, rows x numeric columns, NaN where a cell is missing
            (changed in place).

        Returns
        -------
        tuple of np.ndarray
            The ``float32`` cells (signed log when set; too-large and missing
            cells at the training median) and the count of too-large cells per column.
        """
        values, too_large = self._bounded(values)
        missing = np.isnan(values)
        values[missing] = np.broadcast_to(self.medians, values.shape)[missing]
        return values.astype(np.float32), too_large.sum(axis=0)

    def unseen_in(self, text: np.ndarray) -> dict[str, int]:
        """Per categorical column of ``text``, its cells unseen in training (if any)."""
        counts = {
            col: int((~np.isin(text[:, i], known)).sum())
            for i, (col, known) in enumerate(
                zip(self.categorical, self.encoder.categories_, strict=True)
            )
        }
        return {col: n for col, n in counts.items() if n}

    @property
    def feature_names(self) -> list[str]:
        """Output column names; one-hot columns read ``column=value``."""
        names = list(self.numeric)
        if self.categorical:
            names += self._onehot_names()
        return names

    def _onehot_names(self) -> list[str]:
        names = []
        for col, cats, infrequent in zip(
            self.categorical,
            self.encoder.categories_,
            self.encoder.infrequent_categories_,
            strict=True,
        ):
            rare = set(infrequent) if infrequent is not None else set()
            names += [f"{col}={c}" for c in cats if c not in rare]
            if rare:
                names.append(f"{col}=<infrequent>")
        return names

    def _parsed(self, frame: pd.DataFrame) -> tuple[np.ndarray, dict[str, int]]:
        """Numeric columns as float64, bad and infinite cells NaN; how many each rule touched."""
        raw = frame[self.numeric]
        parsed = raw.apply(pd.to_numeric, errors="coerce")
        values = parsed.to_numpy(dtype=np.float64, na_value=np.nan, copy=True)
        counts = {
            "junk_text": int((parsed.isna() & raw.notna()).to_numpy().sum()),
            "missing": int(raw.isna().to_numpy().sum()),
            "infinite": int(np.isinf(values).sum()),
        }
        values[np.isinf(values)] = np.nan
        return values, counts

    def _bounded(self, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The signed log when set, then too-large cells NaN; with where they were."""
        if self.log_transform:
            values = signed_log1p(values)
        too_large = np.abs(values) > FLOAT32_MAX
        values[too_large] = np.nan
        return values, too_large

    def _text(self, frame: pd.DataFrame) -> np.ndarray:
        return frame[self.categorical].astype(str).apply(lambda s: s.str.strip()).to_numpy()


# --- serialisation ---------------------------------------------------------------------------
# A fitted Preprocessor as plain values (JSON-safe), so a saved detector loads without
# unpickling anything. The loaded copy encodes categories with :class:`Vocabulary`, which
# maps values to one-hot slots exactly as the fitted OneHotEncoder does.


def preprocessor_to_dict(pre: Preprocessor) -> dict:
    """The fitted values of ``pre`` as plain lists, numbers and texts.

    Parameters
    ----------
    pre : Preprocessor
        Fitted on training rows.

    Returns
    -------
    dict
        ``numeric``, ``categorical``, ``log_transform``, ``medians`` (one per
        numeric column), ``categories`` (column -> training vocabulary) and
        ``infrequent`` (column -> the categories sharing one slot, or None).
    """
    return {
        "numeric": list(pre.numeric),
        "categorical": list(pre.categorical),
        "log_transform": bool(pre.log_transform),
        "medians": [float(m) for m in pre.medians],
        "categories": {
            col: [str(c) for c in cats]
            for col, cats in zip(pre.categorical, pre.encoder.categories_, strict=True)
        }
        if pre.categorical
        else {},
        "infrequent": {
            col: None if rare is None else [str(c) for c in rare]
            for col, rare in zip(pre.categorical, pre.encoder.infrequent_categories_, strict=True)
        }
        if pre.categorical
        else {},
    }


def preprocessor_from_dict(values: dict) -> Preprocessor:
    """Rebuild a fitted :class:`Preprocessor` from :func:`preprocessor_to_dict` output.

    Parameters
    ----------
    values : dict
        As :func:`preprocessor_to_dict` wrote it.

    Returns
    -------
    Preprocessor
        Transforms like the one that was saved; its categories go through
        :class:`Vocabulary`.
    """
    pre = Preprocessor(values["categorical"], bool(values["log_transform"]))
    pre.numeric = list(values["numeric"])
    pre.medians = np.asarray(values["medians"], dtype=np.float64)
    pre.encoder = Vocabulary(
        [values["categories"][col] for col in pre.categorical],
        [values["infrequent"][col] for col in pre.categorical],
    )
    return pre


class Vocabulary:
    """One-hot encoding from saved vocabularies, as a fitted ``OneHotEncoder`` encodes.

    Each column gets one slot per frequent category (in vocabulary order) and,
    when it has infrequent categories, one shared slot after them; a value
    never seen in training goes to that shared slot, or to no slot at all.

    Parameters
    ----------
    categories : list[list[str]]
        Each column's training vocabulary, sorted.
    infrequent : list[list[str] or None]
        Each column's infrequent categories (None: the column has none).
    """

    def __init__(self, categories: list[list[str]], infrequent: list[list[str] | None]) -> None:
        self.categories_ = [np.asarray(c, dtype=object) for c in categories]
        self.infrequent_categories_ = [
            None if rare is None else np.asarray(rare, dtype=object) for rare in infrequent
        ]
        self._indexes = []
        self._slots = []
        self._widths = []
        for cats, rare in zip(categories, infrequent, strict=True):
            rare_set = set(rare or ())
            frequent = [c for c in cats if c not in rare_set]
            shared = len(frequent) if rare_set else -1
            slot = {c: i for i, c in enumerate(frequent)}
            self._indexes.append(pd.Index(cats))
            # Position len(cats) stands for a value the vocabulary lacks.
            self._slots.append(np.array([slot.get(c, shared) for c in cats] + [shared]))
            self._widths.append(len(frequent) + (1 if rare_set else 0))

    def transform(self, text: np.ndarray) -> np.ndarray:
        """One-hot ``float32`` columns of ``text`` (rows x categorical columns)."""
        out = np.zeros((text.shape[0], sum(self._widths)), dtype=np.float32)
        rows = np.arange(text.shape[0])
        offset = 0
        for i, (index, slots) in enumerate(zip(self._indexes, self._slots, strict=True)):
            found = index.get_indexer(text[:, i])
            slot = slots[np.where(found < 0, len(index), found)]
            hit = slot >= 0
            out[rows[hit], offset + slot[hit]] = 1.0
            offset += self._widths[i]
        return out
