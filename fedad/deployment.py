"""`python -m fedad.deployment`: one federated run on Flower's Deployment Engine (`flwr run`)."""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10; Flower depends on tomli
    import tomli as tomllib

import tomli_w
from omegaconf import DictConfig, OmegaConf

from fedad.errors import FedadError, exit_with

log = logging.getLogger("fedad")

# The checkout whose pyproject.toml declares the Flower App that `flwr run` bundles.
APP_DIR = Path(__file__).resolve().parent.parent
RUN_CONFIG_FILE = "run_config.toml"
# Inside the run folder: the commands, the Flower processes' logs and their FLWR_HOME.
DEPLOYMENT_DIR = "deployment"
COMMANDS_FILE = "commands.sh"
# The SuperLink connection's name in FLWR_HOME/config.toml, for `flwr run`, `flwr log`, `flwr ls`.
CONNECTION = "fedad-superlink"
# Flower's own default for the SuperLink's one HTTP port (Fleet, Control and Runtime APIs).
DEFAULT_SUPERLINK = "127.0.0.1:8000"
FLOWER_ENV = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
}
STARTUP_TIMEOUT = 60.0
STOP_GRACE_SECONDS = 5.0
# How often the run's status is asked once its log stream has ended.
STATUS_POLL_SECONDS = 5.0
# Sites listed one command each in the printed instructions; more get one template line.
LISTED_SITES = 10


@dataclass
class PreparedRun:
    """A run folder ready for ``flwr run``.

    Attributes
    ----------
    run_dir : Path
        Holds ``shards/`` (one file per site and the global test set),
        ``config.yaml``, ``partition.csv``/``.png`` and ``run_config.toml``; the
        ServerApp writes the outputs here.
    num_sites, num_rounds : int
        Sites (SuperNodes with partition ids ``0 .. num_sites-1``) and rounds.
    run_config : Path
        The run's settings for ``flwr run --run-config``.
    """

    run_dir: Path
    num_sites: int
    num_rounds: int
    run_config: Path

    @property
    def flwr_home(self) -> Path:
        """FLWR_HOME of this run's Flower processes: connection config, installed app copies."""
        return self.run_dir / DEPLOYMENT_DIR / "flwr_home"


def compose_config(overrides: Sequence[str]) -> DictConfig:
    """Compose ``conf/config.yaml`` with Hydra overrides, as ``python -m fedad.simulate`` does.

    Parameters
    ----------
    overrides : Sequence[str]
        ``key=value``, ``group=option``, ``+key=value`` ...

    Returns
    -------
    DictConfig

    Raises
    ------
    FedadError
        If an override names no config key or option.
    """
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException

    from fedad.simulate import CONF

    try:
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            return compose("config", overrides=list(overrides))
    except HydraException as error:
        raise FedadError(f"Cannot compose the config from {list(overrides)}: {error}") from None


def prepare_run(cfg: DictConfig, run_dir: Path) -> PreparedRun:
    """Prepare the data, partition it and write the shards and run config, as the simulation does.

    The steps are the simulation's own functions (:func:`fedad.data.prepare.prepare`,
    the partition of :mod:`fedad.simulate`, :func:`fedad.federated.prepare_sites`),
    so one seed gives the same shards and settings on both engines.

    Parameters
    ----------
    cfg : DictConfig
        The composed config (see :func:`compose_config`).
    run_dir : Path
        A new or empty folder.

    Returns
    -------
    PreparedRun

    Raises
    ------
    FedadError
        For a setting the Deployment Engine cannot honour (``federated=false``,
        ``resume``, ``failure_mode=crash``), a folder that already holds files,
        a run setting pyproject.toml does not declare, and every data or
        setting error the simulation raises.
    """
    from hydra.utils import to_absolute_path

    from fedad.data.prepare import prepare
    from fedad.federated import prepare_sites
    from fedad.simulate import _partition

    _check_supported(cfg)
    run_dir = Path(run_dir).resolve()
    if run_dir.is_dir() and any(run_dir.iterdir()):
        raise FedadError(
            f"{run_dir} already holds files; fedad.deployment prepares a new run folder. "
            "Pass another --run-dir, or delete this one."
        )
    declared = declared_keys()
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    data = prepare(
        cfg.dataset, cfg.preprocess, cfg.task, to_absolute_path(cfg.data_dir), int(cfg.seed)
    )
    parts, _ = _partition(cfg, data, run_dir)
    settings = prepare_sites(cfg, data, parts, run_dir)
    undeclared = sorted(set(settings) - declared)
    if undeclared:
        raise FedadError(
            f"This run has settings that {APP_DIR / 'pyproject.toml'} does not declare, so "
            f"`flwr run` would refuse them: {', '.join(undeclared)}. Add each under "
            '[tool.flwr.app.config] with the value "" (not set).'
        )
    run_config = run_dir / RUN_CONFIG_FILE
    write_run_config(settings, run_config)
    return PreparedRun(run_dir, len(parts), int(cfg.simulation.num_rounds), run_config)


def _check_supported(cfg: DictConfig) -> None:
    sim = cfg.simulation
    if not cfg.federated:
        raise FedadError("federated=false leaves nothing to deploy; drop that override.")
    if cfg.resume:
        raise FedadError(
            "fedad.deployment cannot resume a run: drop resume=. To continue a run, use the "
            "Simulation Engine (python -m fedad.simulate resume=...)."
        )
    if float(sim.client_failure_rate) > 0 and sim.failure_mode == "crash":
        raise FedadError(
            "simulation.failure_mode=crash relies on Ray restarting the killed site's actor, "
            "which the Deployment Engine does not do. Use failure_mode=error or hang, or the "
            "Simulation Engine."
        )


def declared_keys(pyproject: Path | None = None) -> set[str]:
    """Return the run-config keys that ``[tool.flwr.app.config]`` declares, dotted.

    Parameters
    ----------
    pyproject : Path, optional
        Default: the fedad checkout's ``pyproject.toml``.

    Returns
    -------
    set[str]

    Raises
    ------
    FedadError
        If the file is missing or declares no Flower App.
    """
    path = pyproject or APP_DIR / "pyproject.toml"
    try:
        app = tomllib.loads(path.read_text())["tool"]["flwr"]["app"]
    except (OSError, KeyError, tomllib.TOMLDecodeError):
        raise FedadError(
            f"{path} does not declare the Flower App ([tool.flwr.app]). fedad.deployment needs "
            "a fedad source checkout (pip install -e .), whose pyproject.toml declares it."
        ) from None
    return set(_flatten(app.get("config", {})))


def _flatten(values: Mapping, prefix: str = "") -> dict:
    flat = {}
    for key, value in values.items():
        if isinstance(value, Mapping):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def write_run_config(settings: Mapping[str, bool | int | float | str], path: Path) -> Path:
    """Write ``settings`` (dotted keys) as a TOML file for ``flwr run --run-config``.

    Parameters
    ----------
    settings : Mapping
        Flat settings, e.g. from :func:`fedad.federated.make_settings`.
    path : Path
        The file to write.

    Returns
    -------
    Path
        ``path``. Flower flattens the file's tables back into the same dotted keys.
    """
    nested: dict = {}
    for key, value in settings.items():
        *tables, leaf = key.split(".")
        node = nested
        for table in tables:
            node = node.setdefault(table, {})
        node[leaf] = value
    header = "# fedad run settings: flwr run <fedad checkout> --run-config <this file>\n"
    path.write_text(header + tomli_w.dumps(nested))
    return path


def write_connection(flwr_home: Path, superlink: str) -> Path:
    """Write the Flower config naming the SuperLink for ``flwr run``, ``flwr log``, ``flwr ls``.

    Parameters
    ----------
    flwr_home : Path
        FLWR_HOME of the ``flwr`` commands.
    superlink : str
        ``host:port`` of the SuperLink as this machine reaches it.

    Returns
    -------
    Path
        ``flwr_home/config.toml``, whose default connection is :data:`CONNECTION`
        (insecure: no TLS).
    """
    flwr_home.mkdir(parents=True, exist_ok=True)
    config = {
        "superlink": {"default": CONNECTION, CONNECTION: {"address": superlink, "insecure": True}}
    }
    path = flwr_home / "config.toml"
    path.write_text(tomli_w.dumps(config))
    return path


def deployment_commands(run: PreparedRun, superlink: str = DEFAULT_SUPERLINK) -> str:
    """Return the shell commands that run ``run`` with a SuperLink and one SuperNode per site.

    Parameters
    ----------
    run : PreparedRun
        From :func:`prepare_run`.
    superlink : str
        ``host:port`` of the SuperLink as the sites and this machine reach it.

    Returns
    -------
    str
        Commented commands for the SuperLink host, each site and this checkout.
    """
    q = shlex.quote
    _, port = _split_address(superlink)
    n = run.num_sites
    env = " ".join(f"{k}={v}" for k, v in FLOWER_ENV.items())
    shard = run.run_dir / "shards" / "client_<i>.npz"

    def supernode(i: int | str) -> str:
        node_config = q(f"partition-id={i} num-partitions={n}")
        return f"flower-supernode --insecure --superlink {superlink} --node-config {node_config}"

    sites = [supernode(i) for i in range(n)] if n <= LISTED_SITES else [supernode("<i>")]
    return "\n".join(
        [
            f"# fedad on Flower's Deployment Engine: {_count(n, 'site')}, "
            f"{_count(run.num_rounds, 'round')}.",
            "# Every machine: fedad's dependencies installed (pip install -e <fedad checkout>),",
            "# then this environment (FLWR_HOME keeps Flower's files out of ~/.flwr):",
            f"export {env} FLWR_HOME={q(str(run.flwr_home))}",
            "",
            f"# 1. SuperLink host. Needs {run.run_dir}/shards/test.npz; the ServerApp writes",
            f"#    the outputs to {run.run_dir}.",
            f"flower-superlink --insecure --host 0.0.0.0 --port {port}",
            "",
            f"# 2. Each site i = 0 .. {n - 1}, holding only its own shard {shard}",
            "#    (partition ids as 4 digits: client_0000.npz ...). SuperNodes sharing a",
            "#    machine need --port values of their own (default 9094).",
            *sites,
            "",
            "# 3. In the fedad checkout: start the run and follow its log.",
            f"flwr run {q(str(APP_DIR))} {CONNECTION} --run-config {q(str(run.run_config))} "
            "--stream",
            "",
        ]
    )


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _split_address(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise FedadError(f"--superlink {address}: expected host:port, such as {DEFAULT_SUPERLINK}.")
    return host, int(port)


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
    with _Processes(run.flwr_home, logs, run.run_dir) as procs:
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


def _submit(procs: _Processes, run: PreparedRun, deadline: float) -> int:
    """Start the run with ``flwr run``; return its id."""
    out = procs.call(
        "flwr_run",
        [
            "flwr",
            "run",
            str(APP_DIR),
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
    procs: _Processes, stream: subprocess.Popen, run_id: int, deadline: float, echo: bool
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


def _status(procs: _Processes, run_id: int, deadline: float) -> tuple[str, str]:
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
                f"{_tail(log_file)} (log: {log_file})."
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


def _tail(path: Path, lines: int = 5) -> str:
    try:
        text = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return "no log"
    return " | ".join(text[-lines:]) or "empty log"


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


class _Processes:
    """The Flower processes of one local run: started with logs, watched, always stopped."""

    def __init__(self, flwr_home: Path, logs: Path, cwd: Path) -> None:
        self.flwr_home = flwr_home
        self.logs = logs
        self.cwd = cwd
        self.env = flower_env(flwr_home)
        self.started: list[tuple[str, subprocess.Popen]] = []
        # The SuperLink and SuperNodes, which must run until the end.
        self.servers: list[tuple[str, subprocess.Popen]] = []

    def __enter__(self) -> _Processes:
        self.flwr_home.mkdir(parents=True, exist_ok=True)
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def log_of(self, name: str) -> Path:
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
                    f"{_tail(self.log_of(name))} (log: {self.log_of(name)})."
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


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


def _summary(run: PreparedRun) -> str:
    import pandas as pd

    from fedad.federated.server_app import HISTORY_FILE

    history = pd.read_csv(run.run_dir / HISTORY_FILE)
    last = history.iloc[-1]
    return (
        f"round {int(last['round'])}: macro-F1 {last['macro_f1']:.4f}, ROC-AUC "
        f"{last['roc_auc']:.4f}, FPR {last['fpr']:.4f}; outputs in {run.run_dir}"
    )


def main(argv: Sequence[str] | None = None) -> PreparedRun:
    """Command line: prepare a run for the Deployment Engine; print its commands or run it here.

    Parameters
    ----------
    argv : Sequence[str], optional
        Default: ``sys.argv[1:]``. See ``python -m fedad.deployment --help``.

    Returns
    -------
    PreparedRun
        A user error ends the process with one paragraph (status 2); Ctrl-C
        or SIGTERM with status 130, after every Flower process is stopped.
    """
    parser = argparse.ArgumentParser(
        prog="python -m fedad.deployment",
        description=(
            "Prepare a federated run of fedad for Flower's Deployment Engine: the data, one "
            "shard file per site and the run config, exactly as python -m fedad.simulate "
            "prepares them. Then print the commands for a SuperLink, one SuperNode per site "
            "and `flwr run`, or (--local) run them all on this machine."
        ),
    )
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, as for fedad.simulate")
    parser.add_argument(
        "--run-dir", type=Path, help="new run folder (default: outputs/<date>/<time>)"
    )
    parser.add_argument(
        "--local",
        action="store_true",
        help="start a SuperLink and the SuperNodes here, run, wait, stop them all",
    )
    parser.add_argument(
        "--superlink",
        default=DEFAULT_SUPERLINK,
        help=f"host:port of the SuperLink in the printed commands (default {DEFAULT_SUPERLINK})",
    )
    parser.add_argument(
        "--timeout", type=float, help="with --local: seconds the run may take (default: no limit)"
    )
    args = parser.parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="[%(asctime)s] %(message)s")
    for name in ("alembic", "tensorflow"):
        logging.getLogger(name).setLevel(logging.WARNING)
    run_dir = args.run_dir or Path("outputs") / datetime.now().strftime("%Y-%m-%d/%H-%M-%S")
    in_main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _interrupt) if in_main else None
    try:
        _split_address(args.superlink)
        run = prepare_run(compose_config(args.overrides), run_dir)
        write_connection(run.flwr_home, args.superlink)
        commands = deployment_commands(run, args.superlink)
        (run.run_dir / DEPLOYMENT_DIR / COMMANDS_FILE).write_text(commands)
        if not args.local:
            print(f"Prepared {run.run_dir}. To run it (also in {DEPLOYMENT_DIR}/{COMMANDS_FILE}):")
            print()
            print(commands)
            return run
        result = run_local(run, timeout=args.timeout)
        print(f"Flower run {result.run_id} {result.status} in {result.seconds:.0f} s.")
        print(_summary(run))
        return run
    except FedadError as error:
        exit_with(error)
        raise  # exit_with has raised SystemExit already
    except KeyboardInterrupt:
        print("fedad: interrupted; every Flower process of the run is stopped.", file=sys.stderr)
        raise SystemExit(130) from None
    finally:
        if in_main:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    main()
