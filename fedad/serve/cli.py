"""The command line: limits checked, the detector loaded, the port bound, uvicorn started."""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import json
import logging
import os
import resource
import socket
from dataclasses import asdict

from fastapi import FastAPI

from fedad.detector import Detector
from fedad.errors import FedadError, exit_with
from fedad.serve.app import create_app
from fedad.serve.connections import Guarded
from fedad.serve.requests import MAX_BATCH, Limits

log = logging.getLogger("fedad")

# Where the settings reach each worker process (``--workers`` above 1).
SETTINGS_VARIABLE = "FEDAD_SERVE_SETTINGS"
# File descriptors kept beyond the connections: the model's files, logs, the threadpool.
SPARE_FILES = 256


def main(argv: list[str] | None = None) -> None:
    """``python -m fedad.serve DETECTOR [--host H] [--port P] [--workers N] [limits]``."""
    default = Limits()
    parser = argparse.ArgumentParser(
        prog="python -m fedad.serve",
        description="Serve a saved detector over HTTP: POST /score (JSON records or a CSV "
        "body), GET /schema, GET /health. Loopback only by default: put TLS and "
        "authentication in front before exposing it (docs/serving.md).",
    )
    add = parser.add_argument
    add("detector", help="a detector folder: <run>/detector/<model>")
    add("--host", default="127.0.0.1", help="address to listen on (127.0.0.1)")
    add("--port", type=int, default=8000, help="port, 1 to 65535 (8000)")
    add("--workers", type=int, default=1, help="processes, each with its own model (1)")
    add("--max-batch", type=int, default=MAX_BATCH, help=f"most rows a request ({MAX_BATCH})")
    add("--max-body-mb", type=float, help="largest request body in MB (4 KB a --max-batch row)")
    add(
        "--body-timeout",
        type=float,
        default=default.body_timeout,
        help="seconds to send a body (30)",
    )
    add(
        "--head-timeout",
        type=float,
        default=default.head_timeout,
        help="seconds to send a request head (10)",
    )
    add(
        "--max-connections",
        type=int,
        default=default.max_connections,
        help="open per worker; past it the oldest idle one closes (2048)",
    )
    add("--rule", help="decision rule: argmax, target_fpr, threshold (default: the detector's)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="fedad: %(levelname)s: %(message)s")
    try:
        limits = checked_limits(args)
        detector = Detector.load(args.detector)
        app = create_app(detector, limits, args.rule)
        sock = listen(args.host, args.port)
    except FedadError as err:
        exit_with(err)
    if not _loopback(args.host):
        log.warning(
            "listening on %s, beyond this machine: the service has no TLS and no "
            "authentication of its own; put a reverse proxy with both in front of it "
            "(docs/serving.md).",
            args.host,
        )
    import uvicorn
    from uvicorn.supervisors import Multiprocess

    Guarded.limits = limits
    settings = {"limits": asdict(limits), "detector": str(args.detector), "rule": args.rule}
    os.environ[SETTINGS_VARIABLE] = json.dumps(settings)
    many = args.workers > 1
    config = uvicorn.Config(
        "fedad.serve.cli:app_from_environment" if many else app,
        factory=many,
        workers=args.workers,
        http=Guarded,
        log_level="warning",
        h11_max_incomplete_event_size=limits.max_head_bytes,
    )
    server = uvicorn.Server(config)
    log.info(
        "serving %s on http://%s:%d (POST /score), %d worker(s)",
        detector.name,
        args.host,
        args.port,
        args.workers,
    )
    # uvicorn re-raises the Ctrl-C it handled once it has shut down: the stop asked for.
    with contextlib.suppress(KeyboardInterrupt):
        if many:
            Multiprocess(config, target=server.run, sockets=[sock]).run()
        else:
            server.run(sockets=[sock])


def app_from_environment() -> FastAPI:
    """A worker's app, from the settings :func:`main` left in ``FEDAD_SERVE_SETTINGS``."""
    settings = json.loads(os.environ[SETTINGS_VARIABLE])
    Guarded.limits = Limits(**settings["limits"])
    return create_app(Detector.load(settings["detector"]), Guarded.limits, settings["rule"])


def checked_limits(args: argparse.Namespace) -> Limits:
    """The port and limits of the command line, checked (FedadError names the first wrong one).

    The process's open-file allowance is raised to hold ``--max-connections``, or that
    limit lowered to fit it.
    """
    if not 1 <= args.port <= 65535:
        raise FedadError(
            f"--port must be a port number from 1 to 65535, got {args.port}; e.g. --port 8000."
        )
    for flag in ("workers", "max_batch", "max_connections"):
        if getattr(args, flag) < 1:
            name = "--" + flag.replace("_", "-")
            raise FedadError(f"{name} must be at least 1, got {getattr(args, flag)}.")
    for flag in ("max_body_mb", "body_timeout", "head_timeout"):
        value = getattr(args, flag)
        if value is not None and not 0 < value < float("inf"):
            name = "--" + flag.replace("_", "-")
            raise FedadError(f"{name} must be a positive number, got {value}.")
    limits = Limits(
        max_batch=args.max_batch,
        max_body=round(args.max_body_mb * 1e6) if args.max_body_mb else 0,
        body_timeout=args.body_timeout,
        head_timeout=args.head_timeout,
        max_connections=args.max_connections,
    )
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = limits.max_connections + SPARE_FILES
    if soft != resource.RLIM_INFINITY and soft < wanted:
        allowed = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (allowed, hard))
        if allowed < wanted:
            limits.max_connections = max(1, allowed - SPARE_FILES)
            log.warning(
                "this process may open %d files (ulimit -Hn): --max-connections lowered to %d.",
                allowed,
                limits.max_connections,
            )
    return limits


def listen(host: str, port: int) -> socket.socket:
    """A socket bound to ``host:port`` (FedadError when it cannot be)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as err:
        sock.close()
        raise FedadError(
            f"Cannot listen on {host}:{port}: {err.strerror or err}. Pick another --port (one "
            "no other program uses; one below 1024 needs privileges) or another --host."
        ) from None
    sock.set_inheritable(True)
    return sock


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
