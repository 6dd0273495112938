"""The FastAPI app: ``POST /score``, ``GET /schema``, ``GET /health``."""

from __future__ import annotations

import json
import logging
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response
from pydantic import StrictStr, TypeAdapter, ValidationError
from starlette.requests import ClientDisconnect

# pydantic reads a TypedDict of typing_extensions only, on Python < 3.12.
from typing_extensions import TypedDict

from fedad import __version__
from fedad.detector import FORMAT_VERSION, Detector
from fedad.serve.requests import (
    CsvNumber,
    JsonCategory,
    JsonNumber,
    Limits,
    Refused,
    content_kind,
    csv_rows,
    invalid,
    read_body,
    records_type,
    too_many,
)
from fedad.serve.rows import RowScorer

log = logging.getLogger("fedad")


def create_app(
    detector: Detector, limits: Limits | None = None, rule: str | None = None
) -> FastAPI:
    """The FastAPI app of ``detector``.

    Parameters
    ----------
    detector : Detector
        The loaded detector.
    limits : Limits, optional
        Rows and bytes a request may hold, how long its body may take.
    rule : str, optional
        Decision rule used unless a request names another (``?rule=``); default:
        the detector's default rule.

    Returns
    -------
    FastAPI
    """
    limits = limits or Limits()
    rule = rule or detector.default_rule
    detector.check_rule(rule)
    schema = detector.manifest["schema"]
    typed_dict: Any = TypedDict  # keys known at run time only: see records_type
    body = TypeAdapter(
        typed_dict("Body", {"records": records_type(schema, JsonNumber, JsonCategory)})
    )
    csv_records = TypeAdapter(records_type(schema, CsvNumber, StrictStr))
    score_rows = RowScorer(detector)
    known = set(detector.features) | set(schema["optional"])
    app = FastAPI(title=f"fedad detector {detector.name}", version=__version__)

    @app.exception_handler(Refused)
    async def refused(_: Request, err: Refused) -> JSONResponse:
        # The rest of a body too large or too slow is not read: the connection closes.
        close = {"connection": "close"} if err.status in (408, 413) else None
        return JSONResponse({"detail": err.message, "problems": err.problems}, err.status, close)

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
            "max_batch": limits.max_batch,
            "max_body_bytes": limits.body_bytes,
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
        kind = content_kind(request)
        try:
            raw = await read_body(request, limits)
        except ClientDisconnect:
            client = request.client
            log.info(
                "a client (%s) went away before sending its whole request; nothing was scored.",
                f"{client.host}:{client.port}" if client else "unknown",
            )
            return Response(status_code=400)  # nobody is left to read it
        try:
            if kind == "text/csv":
                valid = csv_records.validate_python(csv_rows(raw, limits.max_batch))
            else:
                valid = body.validate_json(raw)["records"]
        except ValidationError as err:
            raise invalid(err) from None
        if len(valid) > limits.max_batch:
            raise too_many(len(valid), limits.max_batch)
        if not valid:
            raise Refused(422, "The request holds no rows to score.")
        scored = await run_in_threadpool(score_rows, valid, chosen)
        extra: set[str] = set().union(*map(dict.keys, valid)) - known
        answer = {
            "model": detector.name,
            "rule": chosen,
            "threshold": detector.threshold_used(chosen),
            "rows": len(valid),
            # One list per field, row i at position i: cheap to build and to read in bulk.
            "predicted": np.asarray(detector.class_names)[scored.predicted].tolist(),
            "attack_score": scored.attack_score.tolist(),
        }
        if not detector.anomaly:  # an anomaly score has no class probabilities
            answer["probabilities"] = {
                name: scored.scores[:, i].tolist() for i, name in enumerate(detector.class_names)
            }
        answer["unseen_categories"] = scored.unseen
        # Cells scored though too large for float32 (as the median) or beyond any training value.
        answer["too_large"] = scored.too_large
        answer["beyond_training"] = scored.beyond_training
        answer["ignored_columns"] = sorted(extra)
        # Serialised here: FastAPI's own encoder walks every value in Python.
        return Response(json.dumps(answer), media_type="application/json")

    return app
