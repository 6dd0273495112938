"""`python -m fedad.serve DETECTOR`: a REST service scoring raw rows with a saved detector."""

from __future__ import annotations

import argparse
import io
import ipaddress
import json
import logging
from collections import defaultdict
from collections.abc import Callable
from typing import Annotated, Any

import numpy as np
import pandas as pd
from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response
from pydantic import ConfigDict, Field, TypeAdapter, ValidationError, with_config

# pydantic reads a TypedDict of typing_extensions only, on Python < 3.12.
from typing_extensions import TypedDict

from fedad import __version__
from fedad.detector import FORMAT_VERSION, Detector
from fedad.errors import FedadError, exit_with

log = logging.getLogger("fedad")

MAX_BATCH = 10_000
# Bytes a request body may hold per row allowed: far above a real flow record.
BYTES_PER_ROW = 4096
Number = Annotated[float, Field(allow_inf_nan=False)]
# A category may arrive as a number (a port, a code); it is matched as text, as in training.
Category = str | int


class Refused(Exception):
    """A request the service answers with an error status and one paragraph."""

    def __init__(self, status: int, message: str, problems: list[dict] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.problems = status, message, problems or []


def create_app(detector: Detector, max_batch: int = MAX_BATCH, rule: str | None = None) -> FastAPI:
    """The FastAPI app: ``POST /score``, ``GET /schema``, ``GET /health``.

    Parameters
    ----------
    detector : Detector
        The loaded detector.
    max_batch : int
        Most rows one request may carry (more: 413).
    rule : str, optional
        Decision rule used unless a request names another (``?rule=``); default:
        the detector's default rule.

    Returns
    -------
    FastAPI
    """
    rule = rule or detector.default_rule
    detector.check_rule(rule)
    schema = detector.manifest["schema"]
    kinds = {f["name"]: Number if f["type"] == "number" else Category for f in schema["features"]}
    # The record type is built from the detector's schema at run time, which mypy's
    # TypedDict syntax (literal keys) cannot express: both are typed as Any.
    typed_dict: Any = TypedDict
    record: Any = with_config(ConfigDict(extra="allow"))(typed_dict("Record", kinds))
    body = TypeAdapter(typed_dict("Body", {"records": list[record]}))
    records = TypeAdapter(list[record])
    known = set(detector.features) | set(schema["optional"])
    app = FastAPI(title=f"fedad detector {detector.name}", version=__version__)

    @app.exception_handler(Refused)
    async def refused(_: Request, err: Refused) -> JSONResponse:
        return JSONResponse({"detail": err.message, "problems": err.problems}, err.status)

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "model": detector.name, "format_version": FORMAT_VERSION}

    @app.get("/schema")
    async def describe() -> dict:
        return {
            "model": detector.name,
            "class_names": detector.class_names,
            "features": schema["features"],
            "categories": detector.categories,
            "optional_columns": schema["optional"],
            "max_batch": max_batch,
            "default_rule": rule,
            "rules": detector.rules,
            "attack_score": detector.manifest["decision"].get("attack_score", "1 - p(normal)"),
            "test_metrics": {
                k: v for k, v in detector.manifest["test_metrics"].items() if k != "confusion"
            },
        }

    @app.post("/score")
    async def score(request: Request) -> Response:
        chosen = request.query_params.get("rule", rule)
        if chosen not in detector.rules:
            raise Refused(
                422, f"Unknown rule '{chosen}': this detector has {', '.join(detector.rules)}."
            )
        raw = await request.body()
        if len(raw) > max_batch * BYTES_PER_ROW:
            raise Refused(413, f"The request body is over {max_batch * BYTES_PER_ROW} bytes.")
        kind = request.headers.get("content-type", "application/json").split(";")[0].strip()
        rows: bytes | list[dict[str, Any]]
        validate: Callable[[Any], list[Any]]
        if kind == "text/csv":
            rows = _csv_rows(raw, detector, max_batch)
            validate = records.validate_python
        elif kind == "application/json":
            rows, validate = raw, (lambda r: body.validate_json(r)["records"])
        else:
            raise Refused(415, f"Send application/json or text/csv, not {kind}.")
        try:
            valid = validate(rows)
        except ValidationError as err:
            raise _invalid(err) from None
        if len(valid) > max_batch:
            raise Refused(
                413,
                f"{len(valid)} rows in one request; this service takes at most "
                f"{max_batch} (--max-batch). Split the batch.",
            )
        if not valid:
            raise Refused(422, "The request holds no rows to score.")
        # Column by column: much faster than a frame built record by record.
        numeric = set(detector.preprocessor.numeric)
        frame = pd.DataFrame(
            {
                c: np.fromiter((r[c] for r in valid), np.float64, len(valid))
                if c in numeric
                else [str(r[c]) for r in valid]
                for c in detector.features
            }
        )
        scored = await run_in_threadpool(detector.score, frame, chosen)
        extra: set[str] = set().union(*map(dict.keys, valid)) - known
        answer = {
            "model": detector.name,
            "rule": chosen,
            "threshold": detector.threshold_used(chosen),
            "rows": len(frame),
            # One list per field, row i at position i: cheap to build and to read in bulk.
            "predicted": np.asarray(detector.class_names)[scored.predicted].tolist(),
            "attack_score": scored.attack_score.tolist(),
        }
        if not detector.anomaly:  # an anomaly score has no class probabilities
            answer["probabilities"] = {
                name: scored.scores[:, i].tolist() for i, name in enumerate(detector.class_names)
            }
        answer["unseen_categories"] = scored.unseen
        answer["ignored_columns"] = sorted(extra)
        # Serialised here: FastAPI's own encoder walks every value in Python.
        return Response(json.dumps(answer), media_type="application/json")

    return app


def _csv_rows(raw: bytes, detector: Detector, max_batch: int) -> list[dict[str, Any]]:
    """The records of a CSV body with a header row (categories kept as text)."""
    categorical = set(detector.preprocessor.categorical)
    try:
        header = pd.read_csv(io.BytesIO(raw), nrows=0).columns
        dtype = {c: str for c in header if str(c).strip() in categorical}
        frame = pd.read_csv(io.BytesIO(raw), skipinitialspace=True, dtype=dtype)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise Refused(422, f"The CSV body cannot be read: {' '.join(str(err).split())}") from None
    if len(frame) > max_batch:
        raise Refused(
            413,
            f"{len(frame)} rows in one request; this service takes at most "
            f"{max_batch} (--max-batch). Split the batch.",
        )
    frame.columns = [str(c).strip() for c in frame.columns]
    return frame.to_dict("records")


def _invalid(err: ValidationError) -> Refused:
    """One 422 paragraph naming each column with a missing, mistyped or non-finite value."""
    by_column: dict[str, dict] = defaultdict(lambda: {"rows": [], "problem": ""})
    problems, seen = [], set()
    for e in err.errors(include_url=False):
        loc = [p for p in e["loc"] if p != "records"]
        row = loc[0] + 1 if loc and isinstance(loc[0], int) else None
        column = str(loc[1]) if len(loc) > 1 else "records"
        # A value against a union (a category: text or number) fails once per member.
        if (row, column) in seen:
            continue
        seen.add((row, column))
        problem = "missing" if e["type"] == "missing" else e["msg"]
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
    return Refused(
        422,
        f"The request cannot be scored: {'; '.join(parts)}. See GET /schema for the columns "
        "and their types (numbers must be finite).",
        problems,
    )


def main(argv: list[str] | None = None) -> None:
    """``python -m fedad.serve DETECTOR [--host 127.0.0.1] [--port 8000] [--max-batch N]``."""
    parser = argparse.ArgumentParser(
        prog="python -m fedad.serve",
        description="Serve a saved detector over HTTP: POST /score (JSON records or a CSV "
        "body), GET /schema, GET /health. Loopback only by default: put TLS and "
        "authentication in front before exposing it (docs/detector.md).",
    )
    parser.add_argument("detector", help="a detector folder: <run>/detector/<model>")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="port (8000)")
    parser.add_argument("--max-batch", type=int, default=MAX_BATCH, help="most rows a request")
    parser.add_argument(
        "--rule", help="decision rule: argmax, target_fpr, threshold (default: the detector's)"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="fedad: %(levelname)s: %(message)s")
    try:
        if args.max_batch < 1:
            raise FedadError(f"--max-batch must be at least 1, got {args.max_batch}.")
        detector = Detector.load(args.detector)
        app = create_app(detector, args.max_batch, args.rule)
    except FedadError as err:
        exit_with(err)
    if not _loopback(args.host):
        log.warning(
            "listening on %s, beyond this machine: the service has no TLS and no "
            "authentication of its own; put a reverse proxy with both in front of it.",
            args.host,
        )
    import uvicorn

    log.info("serving %s on http://%s:%d (POST /score)", detector.name, args.host, args.port)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


if __name__ == "__main__":
    main()
