"""What a request may hold and how it is read: limits, body, content types, validation."""

from __future__ import annotations

import asyncio
import io
import json
from collections import defaultdict
from dataclasses import dataclass
from typing import Annotated, Any

import pandas as pd
from pydantic import ConfigDict, Field, StrictInt, StrictStr, ValidationError, with_config
from starlette.requests import Request

# pydantic reads a TypedDict of typing_extensions only, on Python < 3.12.
from typing_extensions import TypedDict

MAX_BATCH = 10_000
# Bytes a request body may hold per row allowed: far above a real flow record.
BYTES_PER_ROW = 4096
# A JSON number is a number: true, false and "5" are refused.
JsonNumber = Annotated[float, Field(strict=True, allow_inf_nan=False)]
# A CSV cell is text by nature: a number column's text must read as a finite number.
CsvNumber = Annotated[float, Field(allow_inf_nan=False)]
# A category may arrive as a number (a port, a code); it is matched as text, as in training.
JsonCategory = StrictStr | StrictInt
CONTENT_TYPES = ("application/json", "text/csv")
# Columns a 422 names in its paragraph.
SHOWN_COLUMNS = 8


@dataclass
class Limits:
    """What one request and one connection may take (per worker process).

    Attributes
    ----------
    max_batch : int
        Most rows one request may carry (more: 413).
    max_body : int
        Most bytes a request body may hold (more: 413, read no further); 0 stands
        for ``max_batch`` x :data:`BYTES_PER_ROW`.
    body_timeout : float
        Seconds a client has to send its whole body (longer: 408).
    head_timeout : float
        Seconds a connection has to send a complete request head (longer: closed).
    max_connections : int
        Open connections; past it the oldest one with no request in progress is closed.
    max_head_bytes : int
        Bytes a request head may hold (more: closed).
    """

    max_batch: int = MAX_BATCH
    max_body: int = 0
    body_timeout: float = 30.0
    head_timeout: float = 10.0
    max_connections: int = 2048
    max_head_bytes: int = 64 * 1024

    @property
    def body_bytes(self) -> int:
        """The body limit in bytes."""
        return self.max_body or self.max_batch * BYTES_PER_ROW


class Refused(Exception):
    """A request the service answers with an error status and one paragraph."""

    def __init__(self, status: int, message: str, problems: list[dict] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.problems = status, message, problems or []


def records_type(schema: dict, number: Any, category: Any) -> Any:
    """``list[Record]``: one typed field per feature column of ``schema``, extra columns kept."""
    kinds = {f["name"]: number if f["type"] == "number" else category for f in schema["features"]}
    # Built from the detector's schema at run time, which mypy's TypedDict syntax (literal
    # keys) cannot express: typed as Any.
    typed_dict: Any = TypedDict
    return list[with_config(ConfigDict(extra="allow"))(typed_dict("Record", kinds))]  # type: ignore[misc]


def content_kind(request: Request) -> str:
    """``application/json`` (also when unnamed) or ``text/csv``; anything else: 415."""
    encoding = request.headers.get("content-encoding", "identity").strip().lower()
    if encoding != "identity":
        raise Refused(415, f"Send the body uncompressed: this service does not decode {encoding}.")
    kind = request.headers.get("content-type", CONTENT_TYPES[0]).split(";")[0].strip().lower()
    if kind not in CONTENT_TYPES:
        raise Refused(
            415, f"Send application/json or text/csv (with a header row), not {kind or 'nothing'}."
        )
    return kind


async def read_body(request: Request, limits: Limits) -> bytes:
    """The body, refused (413) as soon as it is known to pass the limit: never read whole.

    Raises starlette's ``ClientDisconnect`` when the client goes away first.
    """
    limit = limits.body_bytes
    too_large = Refused(
        413,
        f"The request body is over {limit} bytes (--max-body-mb). Split the batch, or raise "
        "the limit.",
    )
    declared = request.headers.get("content-length")
    if declared is not None and not declared.isdigit():
        raise Refused(400, f"Content-Length must be a number of bytes, not {declared[:40]!r}.")
    if declared is not None and int(declared) > limit:
        raise too_large
    chunks: list[bytes] = []

    async def read() -> None:
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:  # a chunked body is cut here: the rest is never read
                raise too_large
            chunks.append(chunk)

    try:
        await asyncio.wait_for(read(), limits.body_timeout)
    except TimeoutError:
        raise Refused(
            408, f"The request body took over {limits.body_timeout:g} s to arrive (--body-timeout)."
        ) from None
    return b"".join(chunks)


def csv_rows(raw: bytes, max_batch: int) -> list[dict[str, Any]]:
    """The records of a CSV body with a header row, every cell as text (an empty one NaN)."""
    try:
        frame = pd.read_csv(
            io.BytesIO(raw), dtype=str, keep_default_na=False, na_values=[""], skipinitialspace=True
        )
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise Refused(400, f"The CSV body cannot be read: {' '.join(str(err).split())}") from None
    if len(frame) > max_batch:
        raise too_many(len(frame), max_batch)
    frame.columns = [str(c).strip() for c in frame.columns]
    return frame.to_dict("records")


def too_many(rows: int, max_batch: int) -> Refused:
    """The 413 of a request with more rows than ``max_batch``."""
    return Refused(
        413,
        f"{rows} rows in one request; this service takes at most {max_batch} (--max-batch). "
        "Split the batch.",
    )


def invalid(err: ValidationError) -> Refused:
    """One paragraph naming each column with a missing, mistyped or non-finite value (422).

    A body that is no JSON at all (or not UTF-8) is a 400.
    """
    errors = err.errors(include_url=False)
    if errors and errors[0]["type"] == "json_invalid":
        return Refused(
            400, f'The body is not valid JSON ({errors[0]["msg"]}): send {{"records": [...]}}.'
        )
    by_column: dict[str, dict] = defaultdict(lambda: {"rows": [], "problem": ""})
    problems, seen = [], set()
    for e in errors:
        loc = [p for p in e["loc"] if p != "records"]
        row = loc[0] + 1 if loc and isinstance(loc[0], int) else None
        column = str(loc[1]) if len(loc) > 1 else "records"
        # A value against a union (a category: text or number) fails once per member.
        if (row, column) in seen:
            continue
        seen.add((row, column))
        problem = "missing" if e["type"] == "missing" else e["msg"]
        if e["type"] != "missing" and not isinstance(e["input"], dict | list):
            problem += f", not {json.dumps(e['input'], default=str)[:40]}"
        problems.append({"row": row, "column": column, "problem": problem})
        entry = by_column[column]
        entry["problem"] = entry["problem"] or problem
        if row is not None:
            entry["rows"].append(row)
    parts = [
        f"'{col}' {v['problem'].lower()}"
        + (
            f" (rows {', '.join(map(str, v['rows'][:5]))}{'...' if len(v['rows']) > 5 else ''})"
            if v["rows"]
            else ""
        )
        for col, v in by_column.items()
    ]
    if len(parts) > SHOWN_COLUMNS:  # every one is in ``problems``
        parts[SHOWN_COLUMNS:] = [f"and {len(parts) - SHOWN_COLUMNS} more columns"]
    return Refused(
        422,
        f"The request cannot be scored: {'; '.join(parts)}. See GET /schema for the columns "
        "and their types (numbers must be finite JSON numbers, never true, false or text).",
        problems,
    )
