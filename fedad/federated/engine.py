"""The one place that starts Flower's Simulation Engine on Ray."""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import ray
from flwr.clientapp import ClientApp
from flwr.server.superlink.fleet.vce import vce_api
from flwr.serverapp import ServerApp
from flwr.simulation import run_simulation
from flwr.simulation.ray_transport.ray_actor import BasicActorPool

log = logging.getLogger(__name__)
# How often Ray retries a client task whose actor died or was restarting.
ACTOR_TASK_RETRIES = 2


def simulate(
    server_app: ServerApp,
    client_app: ClientApp,
    num_clients: int,
    client_resources: Mapping[str, float],
    ray_init_args: Mapping | None = None,
    address: str | None = None,
    stop: threading.Event | None = None,
) -> None:
    """Run ``server_app`` against ``num_clients`` virtual sites on Ray, then stop Ray.

    Parameters
    ----------
    server_app, client_app : ServerApp, ClientApp
        The apps; the ServerApp runs in a thread of this process and writes
        the outputs, the ClientApp runs in Ray actors.
    num_clients : int
        Number of virtual SuperNodes; partition ids are ``0 .. num_clients-1``.
    client_resources : Mapping
        Ray resources per actor (``num_cpus``, ``num_gpus``); the actor pool
        holds as many actors as the cluster fits.
    ray_init_args : Mapping, optional
        Extra keyword arguments for ``ray.init``.
    address : str, optional
        Attach to this Ray cluster (``"auto"``, ``"ray://head:10001"``)
        instead of starting a local one.
    stop : threading.Event, optional
        Set on the first SIGINT (Ctrl-C) or SIGTERM, and when the simulation
        ends; the ServerApp watches it (see ``server_app.SiteGrid``).

    Raises
    ------
    KeyboardInterrupt
        After SIGINT or SIGTERM, once Ray is shut down.

    Notes
    -----
    The first SIGINT or SIGTERM stops the run gracefully: the ServerApp stops
    waiting for replies, saves its checkpoint and ends, the client tasks
    already running finish, then Ray shuts down. A second signal stops at
    once: Ray shuts down and the process exits (status 130), since Flower's
    threads still waiting on a client task would never return.
    ``ray.shutdown()`` runs in every case, so no Ray process outlives the
    simulation and the next run in the same process (a Hydra multirun) starts
    clean. An actor whose process dies (a crashed site) is restarted by Ray;
    the message it was running comes back as an error reply.
    """
    init_args = dict(ray_init_args or {})
    if address:
        init_args["address"] = address
    # Actor output is TensorFlow's start-up chatter; client errors still reach
    # this process as error replies. `ray_init_args.log_to_driver: true` shows it.
    init_args.setdefault("log_to_driver", False)
    init_args.setdefault("logging_level", "WARNING")
    init_args.setdefault("include_dashboard", False)
    if not address:
        # Ray prestarts an idle worker per CPU, but the actors need this job's runtime
        # env (the PYTHONPATH _start_ray sets), so Ray starts other workers for them
        # and the prestarted ones only take CPU from the actors while they start.
        init_args.setdefault(
            "_system_config",
            {"enable_worker_prestart": False, "prestart_worker_first_driver": False},
        )
    resources = {k: float(v) for k, v in client_resources.items()}
    # Flower hands these to Ray's actor options. Without restarts a dead actor
    # stays in Flower's pool and fails every message it gets afterwards; without
    # retries so does every message sent to it while it restarts. The message
    # that was running when it died is retried too (see client_app's crash mode).
    resources["max_restarts"] = -1
    resources["max_task_retries"] = ACTOR_TASK_RETRIES
    backend_config = {"client_resources": resources, "init_args": init_args}
    # Flower logs every step at INFO (the per-round line comes from the ServerApp),
    # and alembic, which it uses for its state, logs its plugins.
    quiet = {name: logging.getLogger(name) for name in ("flwr", "alembic")}
    levels = {name: logger.level for name, logger in quiet.items()}
    for logger in quiet.values():
        logger.setLevel(logging.WARNING)
    deprecation = _DropDeprecationNotice()
    quiet["flwr"].addFilter(deprecation)
    if stop is None:
        stop = threading.Event()
    interrupts = _Interrupts(stop)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Tip: In future versions of Ray")
            _start_ray(init_args)
            # After ray.init, which sets a SIGTERM handler of its own (kill Ray, exit).
            interrupts.install()
            with _pickup_from_waiting_nodes(), _actors_killed_at_the_end():
                run_simulation(
                    server_app=server_app,
                    client_app=client_app,
                    num_supernodes=num_clients,
                    backend_config=backend_config,
                )
    except Exception:
        if not interrupts.count:
            raise
        raise KeyboardInterrupt(f"{interrupts.name}: the simulation stopped") from None
    finally:
        stop.set()
        interrupts.uninstall()
        quiet["flwr"].removeFilter(deprecation)
        for name, logger in quiet.items():
            logger.setLevel(levels[name])
        ray.shutdown()
        if interrupts.count > 1:
            sys.stdout.flush()
            logging.shutdown()
            os._exit(130)


@contextmanager
def _pickup_from_waiting_nodes() -> Iterator[None]:
    """Let Flower's engine hand a message to the actors as soon as the ServerApp stores it.

    Flower's loop (``vce_api.add_messages_to_queue``, internal to flwr 1.42)
    asks every site ten times a second, and each question scans every stored
    message: with 1,000 sites it about doubled the driver's CPU per round,
    however few sites were sampled, and a message waited 50 ms on average
    before an actor saw it, twice a round. This loop wakes when the ServerApp
    stores messages (at the latest every 0.1 s, as Flower's does) and asks
    only the sites that have one waiting. For a state it does not know,
    Flower's loop runs instead.
    """
    flower_loop = vce_api.add_messages_to_queue

    def loop(state, queue, nodes_mapping, f_stop) -> None:
        if not hasattr(state, "message_ins_store"):  # not the in-memory state it reads
            log.warning(
                "Flower's state %s holds no message_ins_store: using Flower's own message loop, "
                "which asks every site 10 times a second (slower with many sites); see "
                "tests/test_flower_contracts.py",
                type(state).__name__,
            )
            flower_loop(state, queue, nodes_mapping, f_stop)
            return
        stored = threading.Event()
        store = state.store_message_ins

        def store_and_wake(message):
            message_id = store(message)
            stored.set()
            return message_id

        # The ServerApp's grid stores through this same state object.
        state.store_message_ins = store_and_wake
        while not f_stop.is_set():
            # Cleared before the scan, so a message stored during it wakes the next wait.
            stored.clear()
            with state.lock:
                waiting = {
                    m.metadata.dst_node_id
                    for m in state.message_ins_store.values()
                    if m.metadata.delivered_at == ""
                }
            for node_id in waiting & nodes_mapping.keys():
                for message in state.get_message_ins(node_id=node_id, limit=1):
                    queue.put(message)
            stored.wait(0.1)

    vce_api.add_messages_to_queue = loop
    try:
        yield
    finally:
        vce_api.add_messages_to_queue = flower_loop


@contextmanager
def _actors_killed_at_the_end() -> Iterator[None]:
    """Stop the actors with ``ray.kill`` when the simulation ends, not with a task.

    Flower ends each actor with a ``terminate`` task that calls ``exit_actor()``.
    With the task retries this engine asks for, Ray reports each such exit as
    a failed task and retries it, and when ``ray.shutdown()`` stops the raylet
    while a retry is in flight, Ray's I/O thread ends the whole process at
    once (``raylet_ipc_client.cc``: "Exiting because ... the local Raylet is
    dead"): no traceback, no outputs after that point. A multirun then
    vanished after a job's last round. ``ray.kill(no_restart=True)`` ends an
    actor, idle or still busy, without a task to retry.
    """
    flower_terminate = BasicActorPool.terminate_all_actors

    def kill_all(pool: BasicActorPool) -> None:
        # flower-internal: test_actor_pool
        for actor in [*pool.pool, *pool._future_to_actor.values()]:
            ray.kill(actor, no_restart=True)

    BasicActorPool.terminate_all_actors = kill_all
    try:
        yield
    finally:
        BasicActorPool.terminate_all_actors = flower_terminate


def _start_ray(init_args: Mapping) -> None:
    """Start (or attach to) Ray here rather than in Flower's backend, which then reuses it."""
    if ray.is_initialized():
        return
    # As Flower does: the actors import the apps' modules from this process's path.
    pythonpath = os.pathsep.join([*sys.path, *filter(None, [os.environ.get("PYTHONPATH")])])
    ray.init(runtime_env={"env_vars": {"PYTHONPATH": pythonpath}}, **init_args)


class _Interrupts:
    """SIGINT and SIGTERM handlers: the first sets ``stop``, the second raises KeyboardInterrupt."""

    def __init__(self, stop: threading.Event) -> None:
        self.stop = stop
        self.count = 0
        self.name = ""
        self.previous: dict[signal.Signals, object] = {}

    def install(self) -> None:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.previous[sig] = signal.signal(sig, self)

    def uninstall(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        self.previous.clear()

    def __call__(self, signum: int, frame: object) -> None:
        self.count += 1
        self.name = signal.Signals(signum).name
        self.stop.set()
        if self.count > 1:
            raise KeyboardInterrupt(self.name)
        log.warning(
            "%s: stopping after the running client tasks; the last complete round is "
            "checkpointed. Send it again to stop at once.",
            self.name,
        )


class _DropDeprecationNotice(logging.Filter):
    """Drop Flower's notice that `run_simulation` will give way to `flwr run`."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "DEPRECATED FEATURE" not in record.getMessage()
