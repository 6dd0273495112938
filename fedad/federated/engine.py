"""The one place that starts Flower's Simulation Engine on Ray."""

from __future__ import annotations

import atexit
import copy
import logging
import os
import signal
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from functools import partial
from typing import TYPE_CHECKING, Any, cast

import ray
from flwr.clientapp import ClientApp
from flwr.serverapp import ServerApp
from flwr.supercore.date import now

from fedad.federated.histogram.cohort import LEAN_ACTOR_HOOK, ray_cpus

if TYPE_CHECKING:
    from flwr.simulation.ray_transport.ray_actor import BasicActorPool

# Flower's simulation modules import TensorFlow (flwr.simulation.ray_transport.utils does, for
# GPU memory growth): seconds that EngineStart spends in its own thread, beside the data
# preparation, so they are imported where they are used.

log = logging.getLogger(__name__)
# Ray's notice of a future default, printed by every ray.init.
warnings.filterwarnings("ignore", message="Tip: In future versions of Ray")


class _DropMessage(logging.Filter):
    def __init__(self, text: str) -> None:
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


# EngineStart's thread starts Ray; simulate() sets the signal handlers (see _Interrupts).
logging.getLogger("ray._private.worker").addFilter(_DropMessage("SIGTERM handler is not set"))
# How often Ray retries a client task whose actor died or was restarting.
ACTOR_TASK_RETRIES = 2
# The engine a Hydra multirun's job ended with (EngineStart.keep), left to the next job.
_kept: list[EngineStart] = []


def simulate(
    server_app: ServerApp,
    client_app: ClientApp,
    num_clients: int,
    client_resources: Mapping[str, float],
    ray_init_args: Mapping | None = None,
    address: str | None = None,
    stop: threading.Event | None = None,
    started: EngineStart | None = None,
    partitions: Future | None = None,
    cohort: int = 0,
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
    started : EngineStart, optional
        Ray and the actors, started earlier with the same settings (while the
        data was prepared); without it, both start here.
    partitions : concurrent.futures.Future, optional
        Given the engine's ``{node id: partition id}`` as soon as it has
        registered the sites, so the ServerApp need not ask each site.
    cohort : int
        Sites that must run at once (a histogram session's,
        :func:`fedad.federated.histogram.cohort.actors_needed`); 0: no need.
        See :func:`ray_options`.

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
    simulation and the next run in the same process starts clean, except
    where ``started.keep`` is set (a Hydra multirun's job): a simulation that
    ends normally, with every actor idle, then leaves Ray and the actors
    running (Flower's backend ends neither) for :meth:`EngineStart.close` to
    keep for the next job. An actor whose process dies (a crashed site) is
    restarted by Ray; the message it was running comes back as an error reply.
    """
    init_args, resources = ray_options(client_resources, ray_init_args, address, cohort)
    backend_config = {"client_resources": resources, "init_args": init_args}
    # Flower logs every step at INFO (the per-round line comes from the ServerApp),
    # and alembic, which it uses for its state, logs its plugins.
    quiet = {name: logging.getLogger(name) for name in ("flwr", "alembic")}
    levels = {name: logger.level for name, logger in quiet.items()}
    for logger in quiet.values():
        logger.setLevel(logging.WARNING)
    deprecation = _DropMessage("DEPRECATED FEATURE")  # run_simulation will give way to `flwr run`
    quiet["flwr"].addFilter(deprecation)
    if stop is None:
        stop = threading.Event()
    interrupts = _Interrupts(stop)
    keep = started is not None and started.keep
    pool, ended = None, False
    try:
        pool = started.take() if started is not None else None
        from flwr.simulation import run_simulation

        _start_ray(init_args)
        # After ray.init, which sets a SIGTERM handler of its own (kill Ray, exit).
        interrupts.install()
        with (
            _pickup_from_waiting_nodes(partitions),
            _actors_killed_at_the_end(),
            _backend_adopts(pool, keep),
            _a_worker_per_actor(pool),
        ):
            run_simulation(
                server_app=server_app,
                client_app=client_app,
                num_supernodes=num_clients,
                backend_config=backend_config,
            )
        ended = not interrupts.count
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
        if not (keep and ended and cast("EngineStart", started).hold()):
            if keep and pool is not None:  # Flower's backend left them (_backend_adopts)
                _kill_actors(pool)
            ray.shutdown()
        if interrupts.count > 1:
            sys.stdout.flush()
            logging.shutdown()
            os._exit(130)


class EngineStart:
    """Ray and the actor pool, started in a thread while the driver prepares the run's data.

    Starting Ray and an actor per CPU, each importing the model's framework
    (TensorFlow: seconds), need nothing of the data: started first, they
    overlap its preparation, and :func:`simulate` hands the ready pool to
    Flower's Ray backend instead of letting it build one. :meth:`close` ends
    them when no simulation does (the preparation failed).

    Parameters
    ----------
    client_resources, ray_init_args, address
        As :func:`simulate` gets them.
    warm_up : callable, optional
        Run by each actor as it starts (Flower's ``on_actor_init_fn``): the
        imports its first message would otherwise wait for.
    cohort : int
        As :func:`simulate` gets it.

    Notes
    -----
    A Hydra multirun sets ``keep`` (``fedad.simulate``): a job whose
    simulation ended normally then keeps Ray and the actors (``kept``) when it
    closes, and the next job's start adopts them if its settings define the
    same actors (``defines``), else ends them and starts afresh. The
    process's exit ends a kept engine. ``pids`` are its actors' process ids.
    """

    def __init__(
        self,
        client_resources: Mapping[str, float],
        ray_init_args: Mapping | None = None,
        address: str | None = None,
        warm_up: Callable[[], object] | None = None,
        cohort: int = 0,
    ) -> None:
        self.init_args, self.resources = ray_options(
            client_resources, ray_init_args, address, cohort
        )
        self.warm_up = warm_up
        # What defines the actors: Ray's and their options, the cohort and the warm-up (a new
        # partial each job: equal when its parts are). A copy: ray.init adds to _system_config.
        warm = (w.func, w.args, w.keywords) if isinstance(w := warm_up, partial) else w
        self.defines = copy.deepcopy((self.init_args, self.resources, cohort, warm))
        self.pool: BasicActorPool | None = None
        self.error: BaseException | None = None
        self.taken = self.keep = self.kept = False
        self.pids: list[int] = []
        self.started_at = time.perf_counter()
        self._started = threading.Event()
        self.closed = threading.Event()
        self.thread = threading.Thread(target=self._run, name="fedad-engine-start", daemon=True)
        previous = _kept.pop() if _kept else None
        if previous is not None:
            atexit.unregister(previous.end)
            if previous.defines == self.defines and ray.is_initialized():
                # The previous job's Ray, actors and the thread that holds Ray's daemons.
                self.pool, self.closed = previous.pool, previous.closed
                self.thread = previous.thread
                self._started.set()
                log.info("engine reused from the previous job: actor pids %s", previous.pids)
                return
            log.info("engine settings changed: ending the previous job's Ray and actors")
            previous.end()
        self.thread.start()

    def _run(self) -> None:
        try:
            from flwr.simulation.ray_transport.ray_actor import BasicActorPool, ClientAppActor

            _start_ray(self.init_args)
            # flower-internal: test_ray_backend
            pool = BasicActorPool(
                ClientAppActor,
                client_resources=self.resources,
                actor_kwargs={"on_actor_init_fn": self.warm_up} if self.warm_up else {},
            )
            pool.add_actors_to_pool(pool.actors_capacity)
            self.pool = pool
        except BaseException as error:  # raised in the driver's thread by take()
            self.error = error
        finally:
            self._started.set()
        # Ray's daemons are started to die with the thread that started them
        # (PR_SET_PDEATHSIG), not with the process: this one lives until close() or end().
        self.closed.wait()

    def take(self) -> BasicActorPool:
        """Wait for the start; the pool for :func:`simulate` (an error in the start is raised)."""
        self._started.wait()
        if self.error is not None:
            raise self.error
        self.taken = True
        # Set by the start, which raised otherwise.
        return cast("BasicActorPool", self.pool)

    def wait_ready(self) -> float:
        """Wait until every actor has started; seconds since this start began (benchmarks)."""
        self._started.wait()
        if self.error is not None:
            raise self.error
        # The pool holds Ray actor handles (Flower types them as the actor class).
        ray.get([actor.__ray_ready__.remote() for actor in cast(Any, self.pool).pool])
        return time.perf_counter() - self.started_at

    def close(self, keep: bool = True) -> None:
        """End the actors and Ray unless a simulation took them (it ends them itself) or kept them.

        ``keep=False`` (the job failed after its simulation) ends kept ones too.
        """
        self._started.wait()
        if self.kept and keep:
            _kept.append(self)
            atexit.register(self.end)  # after Ray's own exit handler (ray.shutdown): runs first
            return
        self.end(engine=self.kept or not self.taken)

    def end(self, engine: bool = True) -> None:
        """End the thread that holds Ray's daemons; with ``engine``, the actors and Ray first."""
        if engine:
            if self.pool is not None and ray.is_initialized():
                _kill_actors(self.pool)
            ray.shutdown()
        self.closed.set()
        self.thread.join()

    def hold(self) -> bool:
        """Keep the actors of a simulation that ended normally if all are idle (``kept``).

        Their process ids go to ``pids`` and the log, where a later job's show
        whether it reused them.
        """
        pool: Any = self.pool  # Flower types its Ray actor handles as the actor class
        # flower-internal: test_actor_pool
        if pool._future_to_actor or len(pool.pool) != pool.num_actors:
            return False
        try:
            calls = [actor.__ray_call__.remote(lambda _: os.getpid()) for actor in pool.pool]
            self.pids = ray.get(calls, timeout=60)
        except Exception as error:
            log.warning("the engine is not kept for the next job: %s", error)
            return False
        log.info("engine kept for the next job: actor pids %s", self.pids)
        self.kept = True
        return True


@contextmanager
def _backend_adopts(pool: BasicActorPool | None, keep: bool = False) -> Iterator[None]:
    """Let Flower's Ray backend use ``pool`` (an :class:`EngineStart`'s) instead of building one.

    With ``keep`` (a multirun's job) the backend ends neither the actors nor
    Ray when the simulation ends: :func:`simulate` keeps or ends them.
    """
    if pool is None:
        yield
        return
    from flwr.server.superlink.fleet.vce.backend.raybackend import RayBackend

    flower_build, flower_terminate = RayBackend.build, RayBackend.terminate

    def adopt(backend, app_fn) -> None:
        # flower-internal: test_ray_backend
        backend.pool = pool
        backend.app_fn = app_fn

    # A patched method: mypy allows no assignment to a method, hence the cast.
    cast(Any, RayBackend).build = adopt
    # flower-internal: test_ray_backend_terminate
    cast(Any, RayBackend).terminate = (lambda backend: None) if keep else flower_terminate
    try:
        yield
    finally:
        cast(Any, RayBackend).build = flower_build
        cast(Any, RayBackend).terminate = flower_terminate


@contextmanager
def _a_worker_per_actor(pool: BasicActorPool | None) -> Iterator[None]:
    """Let Flower's engine run as many messages at once as ``pool`` has actors.

    Flower's engine (``vce_api.run_api``, flwr 1.42) runs its
    per-actor workers in a ``ThreadPoolExecutor()``, at most ``min(32, CPUs + 4)``
    threads: more actors than that (a histogram session's cohort: every site
    at once, :mod:`fedad.federated.histogram.cohort`) would leave the rest idle
    and the session blocked.
    """
    if pool is None:
        yield
        return
    from flwr.server.superlink.fleet.vce import vce_api

    flower_executor = vce_api.ThreadPoolExecutor
    workers = max(min(32, (os.cpu_count() or 1) + 4), pool.num_actors)
    # flower-internal: test_flowers_engine_runs_its_workers_in_a_default_thread_pool
    cast(Any, vce_api).ThreadPoolExecutor = partial(ThreadPoolExecutor, max_workers=workers)
    try:
        yield
    finally:
        cast(Any, vce_api).ThreadPoolExecutor = flower_executor


def ray_options(
    client_resources: Mapping[str, float],
    ray_init_args: Mapping | None = None,
    address: str | None = None,
    cohort: int = 0,
) -> tuple[dict, dict]:
    """``ray.init``'s arguments and each actor's options, for :func:`simulate` and its start.

    With a ``cohort`` (sites that must run at once) a local Ray gets enough
    logical CPUs for that many actors, unless ``ray_init_args`` sets
    ``num_cpus`` (:func:`fedad.federated.histogram.cohort.check` refused a
    cohort that does not fit, before Ray starts).
    """
    init_args = dict(ray_init_args or {})
    if address:
        init_args["address"] = address
    elif cohort:
        per_actor = float(client_resources.get("num_cpus", 1))
        init_args.setdefault("num_cpus", ray_cpus(cohort, per_actor))
    if cohort:
        # A cohort's actors run XGBoost alone: without TensorFlow, which Flower's actor module
        # imports, each holds about 0.35 GB instead of 0.85 (cohort.SITE_BYTES).
        hook = {"worker_process_setup_hook": LEAN_ACTOR_HOOK}
        init_args["runtime_env"] = {**init_args.get("runtime_env", {}), **hook}
    # Actor output is TensorFlow's start-up chatter; client errors still reach
    # this process as error replies. `ray_init_args.log_to_driver: true` shows it.
    init_args.setdefault("log_to_driver", False)
    init_args.setdefault("logging_level", "WARNING")
    init_args.setdefault("include_dashboard", False)
    if not address:
        # Ray prestarts an idle worker per CPU, but the actors need this job's runtime
        # env (the PYTHONPATH _start_ray sets), so Ray starts other workers for them
        # and the prestarted ones only take CPU from the actors while they start.
        prestart = {"enable_worker_prestart": False, "prestart_worker_first_driver": False}
        init_args.setdefault("_system_config", prestart)
    resources = {k: float(v) for k, v in client_resources.items()}
    # Flower hands these to Ray's actor options. Without restarts a dead actor
    # stays in Flower's pool and fails every message it gets afterwards; without
    # retries so does every message sent to it while it restarts. The message
    # that was running when it died is retried too (see client_app's crash mode).
    resources["max_restarts"] = -1
    resources["max_task_retries"] = ACTOR_TASK_RETRIES
    return init_args, resources


@contextmanager
def _pickup_from_waiting_nodes(partitions: Future | None = None) -> Iterator[None]:
    """Let Flower's engine hand a message to the actors as soon as the ServerApp stores it.

    Flower's loop (``vce_api.add_messages_to_queue``, internal to flwr 1.42)
    asks every site ten times a second, and each question scans every stored
    message: with 1,000 sites it about doubled the driver's CPU per round,
    however few sites were sampled, and a message waited 50 ms on average
    before an actor saw it, twice a round. This loop wakes when the ServerApp
    stores messages (at the latest every 0.1 s, as Flower's does) and hands
    out each site's oldest waiting message in one pass over the store. For a
    state it does not know, Flower's loop runs instead. The loop is the one
    place that gets the engine's ``{node id: partition id}``: it goes to
    ``partitions``.
    """
    from flwr.server.superlink.fleet.vce import vce_api

    flower_loop = vce_api.add_messages_to_queue

    def loop(state, queue, nodes_mapping, f_stop) -> None:
        if partitions is not None and not partitions.done():
            partitions.set_result(dict(nodes_mapping))
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
                # One pass over the stored messages for every site's oldest undelivered one,
                # the one get_message_ins(node, limit=1) would hand out: a call per site scans
                # them all, and a query to 10,000 sites took minutes that way.
                oldest: dict[int, str] = {}
                for message_id, message in state.message_ins_store.items():
                    node = message.metadata.dst_node_id
                    if message.metadata.delivered_at == "" and node in nodes_mapping:
                        oldest.setdefault(node, message_id)
                # Deletes the expired ones, as get_message_ins does before handing one out.
                # flower-internal: test_in_memory_state
                state._check_stored_messages(set(oldest.values()))
                delivered_at = now().isoformat()
                for message_id in oldest.values():
                    if (message := state.message_ins_store.get(message_id)) is not None:
                        message.metadata.delivered_at = delivered_at
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
    from flwr.simulation.ray_transport.ray_actor import BasicActorPool

    flower_terminate = BasicActorPool.terminate_all_actors

    # A patched method: mypy allows no assignment to a method, hence the cast.
    cast(Any, BasicActorPool).terminate_all_actors = _kill_actors
    try:
        yield
    finally:
        cast(Any, BasicActorPool).terminate_all_actors = flower_terminate


def _kill_actors(pool: BasicActorPool) -> None:
    """End every actor of ``pool``, idle or busy, with no task to retry (see above)."""
    # Ray actor handles (Flower types them as the actor class), idle and busy.
    # flower-internal: test_actor_pool
    actors: list[Any] = [*pool.pool, *pool._future_to_actor.values()]
    for actor in actors:
        ray.kill(actor, no_restart=True)


def _start_ray(init_args: Mapping) -> None:
    """Start (or attach to) Ray here rather than in Flower's backend, which then reuses it."""
    if ray.is_initialized():
        return
    # As Flower does: the actors import the apps' modules from this process's path.
    pythonpath = os.pathsep.join([*sys.path, *filter(None, [os.environ.get("PYTHONPATH")])])
    args = dict(init_args)
    runtime_env = dict(args.pop("runtime_env", {}))
    runtime_env["env_vars"] = {**runtime_env.get("env_vars", {}), "PYTHONPATH": pythonpath}
    ray.init(runtime_env=runtime_env, **args)


class _Interrupts:
    """SIGINT and SIGTERM handlers: the first sets ``stop``, the second raises KeyboardInterrupt."""

    def __init__(self, stop: threading.Event) -> None:
        self.stop = stop
        self.count = 0
        self.name = ""
        self.previous: dict[signal.Signals, Any] = {}  # the handlers install() replaced

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
