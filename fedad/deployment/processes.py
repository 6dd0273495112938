"""The Flower processes of one local run: started with logs, watched, and always stopped."""

from __future__ import annotations

import logging
import math
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

from fedad.deployment.prepare import FLOWER_ENV
from fedad.errors import FedadError

log = logging.getLogger("fedad")

STOP_GRACE_SECONDS = 5.0


def flower_env(flwr_home: Path) -> dict[str, str]:
    """Return the environment of this run's Flower processes.

    Parameters
    ----------
    flwr_home : Path
        Their FLWR_HOME, so ``~/.flwr`` is left alone; it also marks every
        process of the run, the ones Flower starts included.

    Returns
    -------
    dict[str, str]
        This process's environment plus :data:`FLOWER_ENV` and FLWR_HOME, with
        this Python's scripts first on PATH, so the processes Flower starts
        (``flower-superexec``, ``flwr-serverapp``, ``flwr-clientapp``) come from
        the same installation as fedad.
    """
    env = {**os.environ, **FLOWER_ENV, "FLWR_HOME": str(flwr_home)}
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    return env


def flower_processes(flwr_home: Path) -> list[int]:
    """Return the ids of the running processes whose FLWR_HOME is ``flwr_home``.

    Parameters
    ----------
    flwr_home : Path
        As given to :func:`flower_env`.

    Returns
    -------
    list[int]
        Empty where ``/proc`` cannot be read (not Linux). Zombies (ended, not
        yet reaped) are left out.
    """
    marker = f"FLWR_HOME={flwr_home}".encode()
    found = []
    for entry in Path("/proc").glob("[0-9]*"):
        pid = int(entry.name)
        if pid == os.getpid():
            continue
        try:
            if marker in (entry / "environ").read_bytes().split(b"\0") and _alive(pid):
                found.append(pid)
        except OSError:
            continue
    return found


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


def _descendants(pid: int) -> set[int]:
    """Ids of the processes below ``pid`` (children, theirs ...), from ``/proc``."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            ppid = int((entry / "stat").read_text().rpartition(")")[2].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry.name))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


class Processes:
    """The Flower processes of one local run: started with logs, watched, always stopped."""

    def __init__(self, flwr_home: Path, logs: Path, cwd: Path) -> None:
        self.flwr_home = flwr_home
        self.logs = logs
        self.cwd = cwd
        self.env = flower_env(flwr_home)
        self.started: list[tuple[str, subprocess.Popen]] = []
        # The SuperLink and SuperNodes, which must run until the end.
        self.servers: list[tuple[str, subprocess.Popen]] = []

    def __enter__(self) -> Processes:
        self.flwr_home.mkdir(parents=True, exist_ok=True)
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def log_of(self, name: str) -> Path:
        """The log file of the process started as ``name``."""
        return self.logs / f"{name}.log"

    def start(self, name: str, command: list[str], capture: bool = False) -> subprocess.Popen:
        """Start ``command`` in a session of its own; its output goes to ``<name>.log``.

        With ``capture``, standard output is a pipe instead (see :meth:`call`).
        """
        executable = Path(sys.executable).parent / command[0]
        if not executable.exists():
            raise FedadError(
                f"Flower's `{command[0]}` command is not installed next to {sys.executable}; "
                "install fedad's dependencies there (pip install -e .)."
            )
        with open(self.log_of(name), "ab") as out:
            # A session of its own: Ctrl-C in the terminal reaches only this process,
            # which then stops the others in order.
            proc = subprocess.Popen(
                [str(executable), *command[1:]],
                stdout=subprocess.PIPE if capture else out,
                stderr=out if capture else subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=self.env,
                cwd=self.cwd,
                start_new_session=True,
                text=capture,
            )
        self.started.append((name, proc))
        return proc

    def serve(self, name: str, command: list[str]) -> subprocess.Popen:
        """Start a process that must run until :meth:`stop` (see :meth:`check_alive`)."""
        proc = self.start(name, command)
        self.servers.append((name, proc))
        return proc

    def call(self, name: str, command: list[str], deadline: float) -> str:
        """Run a ``flwr`` command to its end; return its standard output."""
        proc = self.start(name, command, capture=True)
        try:
            out, _ = proc.communicate(
                timeout=None if deadline == math.inf else max(0.1, deadline - time.monotonic())
            )
        except subprocess.TimeoutExpired:
            raise FedadError(
                f"`{' '.join(command[:2])}` did not return in the time given (--timeout)."
            ) from None
        with open(self.log_of(name), "a") as log_file:
            log_file.write(out)
        return out

    def check_alive(self) -> None:
        """Raise :class:`FedadError` if the SuperLink or a SuperNode has exited."""
        for name, proc in self.servers:
            if proc.poll() is not None:
                raise FedadError(
                    f"{name} exited with status {proc.returncode} during the run: "
                    f"{tail(self.log_of(name))} (log: {self.log_of(name)})."
                )

    def stop(self) -> None:
        """Stop every process started here and everything they started; wait for them."""
        with _signals_held():
            links = [proc for name, proc in self.started if name == "superlink"]
            others = [proc for name, proc in self.started if name != "superlink"]
            # The sites and `flwr` commands first, while the SuperLink can take their goodbye.
            for group in (others, links):
                pids = set()
                for proc in group:
                    if proc.poll() is None:
                        pids |= {proc.pid, *_descendants(proc.pid)}
                self._end(pids, group)
            # What those started and left behind (the SuperLink's detached SuperExec, a
            # ClientApp process), found by the FLWR_HOME they inherited.
            for _ in range(3):
                left = set(flower_processes(self.flwr_home))
                if not left:
                    break
                self._end(left, [])

    def _end(self, pids: set[int], children: list[subprocess.Popen]) -> None:
        """SIGTERM ``pids``, wait, then SIGKILL those left; reap ``children``."""
        _send(pids, signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE_SECONDS
        while time.monotonic() < deadline:
            for proc in children:
                proc.poll()  # reaps it, so it is not counted as alive
            if not any(_alive(pid) for pid in pids):
                break
            time.sleep(0.1)
        _send({pid for pid in pids if _alive(pid)}, signal.SIGKILL)
        for proc in children:
            try:
                proc.wait(timeout=STOP_GRACE_SECONDS)
            except subprocess.TimeoutExpired:
                log.warning("process %d did not end after SIGKILL", proc.pid)


def _send(pids: set[int], sig: signal.Signals) -> None:
    for pid in pids:
        with suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)


@contextmanager
def _signals_held() -> Iterator[None]:
    """Ignore SIGINT and SIGTERM in the block, so a second Ctrl-C cannot cut the clean-up short."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def tail(path: Path, lines: int = 5) -> str:
    """The last `lines` lines of a log, joined with " | " for a one-line message."""
    try:
        text = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return "no log"
    return " | ".join(text[-lines:]) or "empty log"
