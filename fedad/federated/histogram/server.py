"""XGBoost's federated aggregation server for one session, in a child process on a probed port."""

from __future__ import annotations

import atexit
import contextlib
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping

from fedad.errors import FedadError
from fedad.federated.histogram.session import LEAN

# How long the server may take to listen once started (the child imports XGBoost).
READY_SECONDS = 60.0
# What XGBoost's server prints once it listens ("... federated server listening on ...").
LISTENING = "listening on"
# What gRPC prints when the server could not bind its port (XGBoost then crashes).
BIND_ERROR = "Address already in use"
# Ephemeral ports tried before giving up on finding one free on every interface.
PORT_TRIES = 20


def port_free(port: int) -> bool:
    """Whether ``port`` can be bound on every interface, IPv4 and IPv6, as XGBoost binds it."""
    families = [(socket.AF_INET, "0.0.0.0")]
    if socket.has_ipv6:
        families.append((socket.AF_INET6, "::"))
    for family, host in families:
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            try:
                probe.bind((host, port))
            except OSError:
                # No IPv6 on this host is not a taken port.
                if family == socket.AF_INET6 and not _has_ipv6():
                    continue
                return False
    return True


def _has_ipv6() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as probe:
            probe.bind(("::1", 0))
        return True
    except OSError:
        return False


def choose_port(port: int) -> int:
    """``port`` if free, or (``port`` 0) a fresh ephemeral port free on every interface.

    Raises
    ------
    FedadError
        When the configured port is taken, or no free port was found.
    """
    if port:
        if not port_free(port):
            raise FedadError(_taken(port) + ".")
        return port
    for _ in range(PORT_TRIES):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.bind(("127.0.0.1", 0))
            candidate = int(probe.getsockname()[1])
        if port_free(candidate):
            return candidate
    raise FedadError(
        f"No free port was found for XGBoost's federated server in {PORT_TRIES} tries; set "
        "strategy.port to a port that is free on every interface."
    )


def check_port(strategy_cfg: Mapping) -> str | None:
    """A histogram run's fixed ``strategy.port`` found taken now, before Ray starts; else None.

    Each round probes it again (:func:`choose_port`): it may be taken later.
    """
    port = strategy_cfg.get("port")
    if strategy_cfg.get("name") != "fedxgb_histogram" or isinstance(port, bool):
        return None
    # A port out of range is strategy.check_config's to name.
    if not isinstance(port, int) or not 0 < port < 65536 or port_free(port):
        return None
    return _taken(port)


def _taken(port: int) -> str:
    return (
        f"strategy.port={port} is in use on this machine, so XGBoost's federated server "
        "cannot listen there (XGBoost 3.2 would crash on it); stop what holds the port, "
        "choose another strategy.port, or set strategy.port=0 to let fedad probe a free "
        "port for every round"
    )


class AggregationServer:
    """``xgboost.federated.run_federated_server`` for ``world`` sites, in a child process.

    XGBoost's server binds every interface (``0.0.0.0`` / ``[::]``: its API takes
    no host) without TLS, and a server serves one session, so each round starts a
    fresh one on a freshly probed port and :meth:`stop` ends it. A child process,
    because XGBoost crashes the process it runs in when the port is taken.

    Parameters
    ----------
    world : int
        Sites in the session.
    port : int
        The port; 0 probes a free one.
    timeout : float
        XGBoost's own timeout (seconds) for the sites to connect.
    probe : bool
        Probe ``port`` first (:func:`choose_port`); False takes it as it is
        (a caller that probed it), and a taken one kills the server, which
        is reported.
    wait : bool
        Return once it listens (:meth:`wait_ready`); False returns at once,
        for a server started ahead of its session, waited for later.
    """

    def __init__(
        self, world: int, port: int, timeout: float, probe: bool = True, wait: bool = True
    ) -> None:
        self.world = world
        self.port = choose_port(port) if probe else port
        # The server's output, kept while it runs to say why it died (closed by stop()).
        self._log = tempfile.TemporaryFile()  # noqa: SIM115
        command = [sys.executable, "-m", __name__, str(self.port), str(world), str(int(timeout))]
        self.process = subprocess.Popen(command, stdout=self._log, stderr=self._log)
        atexit.register(self.stop)
        if wait:
            self.wait_ready()

    def wait_ready(self) -> None:
        """Wait until the server says it listens; report its death (a port taken) at once.

        XGBoost says it listens before gRPC binds, and a connection alone would
        also reach whatever else holds the port: ready is its line, no bind
        error from gRPC, a connection, and the process still alive after it.
        """
        deadline = time.monotonic() + READY_SECONDS
        while time.monotonic() < deadline:
            output = self._output()
            if self.process.poll() is not None or BIND_ERROR in output:
                self.stop(kill_only=True)
                raise FedadError(self._died(output))
            if LISTENING in output and self._connects():
                time.sleep(0.1)
                if self.process.poll() is None and BIND_ERROR not in self._output():
                    return
            time.sleep(0.05)
        self.stop()
        raise FedadError(
            f"XGBoost's federated server did not listen on port {self.port} within "
            f"{READY_SECONDS:g} s; check that this machine can start Python processes quickly."
        )

    def _connects(self) -> bool:
        try:
            socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
        except OSError:
            return False
        return True

    def _output(self) -> str:
        self._log.seek(0)
        return self._log.read().decode(errors="replace")

    def _died(self, output: str) -> str:
        code = self.process.returncode
        taken = BIND_ERROR in output
        return (
            f"XGBoost's federated server for this round died as it started (exit status {code}; "
            f"-11 is the crash XGBoost 3.2 makes when its port is taken)"
            + (
                f": port {self.port} was taken by another process after it was probed"
                if taken
                else ""
            )
            + ". Free the port or set strategy.port=0, then continue the run with "
            "resume=<its folder>."
        )

    @property
    def alive(self) -> bool:
        """Whether the server process still runs."""
        return self.process.poll() is None

    def stop(self, kill_only: bool = False) -> None:
        """End the server (it serves one session and never exits by itself).

        ``kill_only`` keeps its output readable (for the report of its death).
        """
        if self.process.poll() is None:
            self.process.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=10)
        atexit.unregister(self.stop)
        if not kill_only:
            self._log.close()


def main(argv: list[str]) -> None:
    """Serve one session: ``python -m fedad.federated.histogram.server PORT WORLD TIMEOUT``."""
    for name in LEAN:
        sys.modules.setdefault(name, None)  # type: ignore[arg-type]
    from xgboost import federated

    port, world, timeout = (int(a) for a in argv)
    federated.run_federated_server(n_workers=world, port=port, timeout=timeout)


if __name__ == "__main__":
    main(sys.argv[1:])
