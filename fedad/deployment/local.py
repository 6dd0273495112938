"""Run a prepared deployment on this machine: a SuperLink, one SuperNode per site, `flwr run`."""

from __future__ import annotations

import json
import logging
import math
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from fedad.deployment.prepare import (
    CONNECTION,
    DEPLOYMENT_DIR,
    PreparedRun,
    write_connection,
)
from fedad.deployment.processes import Processes, tail
from fedad.errors import FedadError

log = logging.getLogger("fedad")

STARTUP_TIMEOUT = 60.0
STOP_GRACE_SECONDS = 5.0
# How often the run's status is asked once its log stream has ended.
STATUS_POLL_SECONDS = 5.0


@dataclass
class LocalRun:
    """What :func:`run_local` did.

    Attributes
    ----------
    run_id : int
        Flower's id of the run.
    status : str
        Its final status, ``finished:completed``.
    seconds : float
        Wall time from starting the SuperLink to the run's end.
    """

    run_id: int
    status: str
    seconds: float


def run_local(run: PreparedRun, timeout: float | None = None, echo: bool = True) -> LocalRun:
    """Run ``run`` on this machine: a SuperLink, one SuperNode per site and ``flwr run``.

    Every process comes from Flower's own commands (``flower-superlink``,
    ``flower-supernode``, ``flwr run``, ``flwr log``, ``flwr ls``) and talks
    to the others over localhost on free ports; Flower carries every message.
    Whatever happens (the run fails, ``timeout`` passes, Ctrl-C, SIGTERM),
    every process started here is stopped by its id before this returns,
    together with the processes those started (SuperExec, ServerApp and
    ClientApp processes), found by their FLWR_HOME.

    Parameters
    ----------
    run : PreparedRun
        From :func:`prepare_run`.
    timeout : float, optional
        Seconds the run may take; default: no limit.
    echo : bool
        Print the run's log (the ServerApp's output) as it comes.

    Returns
    -------
    LocalRun

    Raises
    ------
    FedadError
        If a Flower process fails to start or dies, the run does not finish
        ``completed``, or ``timeout`` passes. Logs: ``<run-dir>/deployment/*.log``.
    """
    logs = run.run_dir / DEPLOYMENT_DIR
    logs.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    deadline = math.inf if timeout is None else time.monotonic() + timeout
    with Processes(run.flwr_home, logs, run.run_dir) as procs:
        link_port, *node_ports = _free_ports(1 + run.num_sites)
        address = f"127.0.0.1:{link_port}"
        superlink = procs.serve(
            "superlink",
            ["flower-superlink", "--insecure", "--host", "127.0.0.1", "--port", str(link_port)],
        )
        _wait_until_serving(link_port, superlink, procs.log_of("superlink"))
        for i, port in enumerate(node_ports):
            procs.serve(
                f"supernode_{i}",
                [
                    "flower-supernode",
                    "--insecure",
                    "--superlink",
                    address,
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(port),
                    "--node-config",
                    f"partition-id={i} num-partitions={run.num_sites}",
                ],
            )
        write_connection(run.flwr_home, address)
        run_id = _submit(procs, run, deadline)
        log.info("run %d started on the local SuperLink at %s", run_id, address)
        stream = procs.start("flwr_log", ["flwr", "log", str(run_id), CONNECTION, "--stream"])
        status, details = _wait_for_end(procs, stream, run_id, deadline, echo)
    if not status.endswith(":completed"):
        raise FedadError(
            f"Flower run {run_id} ended {status}: {details or 'no details given'}. Its log is "
            f"{logs / 'flwr_log.log'}; the sites' logs are {logs}/supernode_<i>.log."
        )
    return LocalRun(run_id, status, time.perf_counter() - started)


def _submit(procs: Processes, run: PreparedRun, deadline: float) -> int:
    """Start the run with ``flwr run``; return its id."""
    out = procs.call(
        "flwr_run",
        [
            "flwr",
            "run",
            str(run.app_dir),
            CONNECTION,
            "--run-config",
            str(run.run_config),
            "--format",
            "json",
        ],
        deadline,
    )
    try:
        payload = json.loads(out)
        if payload.get("success") and payload.get("run-id"):
            return int(payload["run-id"])
        reason = payload.get("error-message") or payload
    except ValueError:
        reason = " ".join(out.split())[-500:]
    raise FedadError(
        f"`flwr run` did not start the run: {reason}. See {procs.log_of('flwr_run')} and "
        f"{procs.log_of('superlink')}."
    )


def _wait_for_end(
    procs: Processes, stream: subprocess.Popen, run_id: int, deadline: float, echo: bool
) -> tuple[str, str]:
    """Follow ``flwr log --stream`` until the run ends; return its final status and details."""
    log_file = procs.log_of("flwr_log")
    with _echo(log_file, enabled=echo):
        # The stream ends when the run finishes: the status is asked then. Each `flwr ls`
        # costs a second of CPU, so while the stream runs it is asked once a minute only
        # (in case the stream hangs), and every few seconds if the stream broke off.
        asked = time.monotonic() - STATUS_POLL_SECONDS
        while True:
            procs.check_alive()
            if time.monotonic() > deadline:
                raise FedadError(
                    f"Flower run {run_id} did not finish within the time given (--timeout). "
                    f"The logs are in {log_file.parent}."
                )
            since = time.monotonic() - asked
            if since > 60 or (stream.poll() is not None and since >= STATUS_POLL_SECONDS):
                asked = time.monotonic()
                status, details = _status(procs, run_id, deadline)
                if status.startswith("finished"):
                    return status, details
            time.sleep(0.5)


@contextmanager
def _echo(log_file: Path, enabled: bool) -> Iterator[None]:
    """Print what is appended to ``log_file`` while the block runs."""
    if not enabled:
        yield
        return
    done = threading.Event()

    def follow() -> None:
        with open(log_file, errors="replace") as f:
            while True:
                line = f.readline()
                if line:
                    print(line, end="", flush=True)
                elif done.is_set():
                    return
                else:
                    time.sleep(0.2)

    thread = threading.Thread(target=follow, daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join(timeout=2)


def _status(procs: Processes, run_id: int, deadline: float) -> tuple[str, str]:
    out = procs.call(
        "flwr_ls", ["flwr", "ls", CONNECTION, "--run-id", str(run_id), "--format", "json"], deadline
    )
    try:
        record = json.loads(out)["runs"][0]
    except (ValueError, KeyError, IndexError):
        raise FedadError(
            f"`flwr ls` gave no status for run {run_id}: {' '.join(out.split())[-300:]}"
        ) from None
    return str(record.get("status", "")), str(record.get("status-details") or "")


def _wait_until_serving(port: int, proc: subprocess.Popen, log_file: Path) -> None:
    """Wait until the SuperLink answers on ``port``."""
    deadline = time.monotonic() + STARTUP_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise FedadError(
                f"flower-superlink exited with status {proc.returncode} at start: "
                f"{tail(log_file)} (log: {log_file})."
            )
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as reply:
                if reply.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.2)
    raise FedadError(
        f"flower-superlink did not answer on port {port} within {STARTUP_TIMEOUT:g} s "
        f"(log: {log_file})."
    )


def _free_ports(count: int) -> list[int]:
    """Return ``count`` distinct ports that nothing listens on now."""
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()
