"""Flower ServerApp: pooled scaling statistics, the strategy's rounds and the run's outputs."""

from __future__ import annotations

import json
import logging
import math
import random
import threading
import time
import warnings
from collections import Counter
from collections.abc import Iterable, Mapping
from pathlib import Path

import keras
import numpy as np
import pandas as pd
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
    UserConfigValue,
)
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import Strategy

from fedad.errors import FedadError
from fedad.federated import checkpoint, scaling, shards
from fedad.federated.client_app import evaluation_metrics, run_settings
from fedad.federated.strategies import build_strategy
from fedad.models import build_model

log = logging.getLogger(__name__)

Settings = Mapping[str, UserConfigValue]

HISTORY_FILE = "history.csv"
CLIENTS_FILE = "clients.csv"
MODEL_FILE = "global_model.keras"
SCALING_FILE = "scaling.npz"
# Flower's own default for how long a round waits for replies.
DEFAULT_ROUND_TIMEOUT = 3600.0
POLL_SECONDS = 0.1
# Replies are looked for every 5 ms, or 20 times as long as one look took if that is
# longer (1,000 replies pending, a network in between), up to POLL_SECONDS: a round ends
# soon after its last reply, and looking never takes more than 5 % of a core.
MIN_POLL_SECONDS = 0.005
POLL_COST_SHARE = 0.05


def server_app(settings: Settings | None = None, stop: threading.Event | None = None) -> ServerApp:
    """Return the ServerApp, configured by ``settings`` and the run config.

    Parameters
    ----------
    settings : Mapping, optional
        Flat run settings (see :func:`run_server`). The Simulation Engine has
        no run config, so it passes them here; under ``flwr run`` the same keys
        come from ``context.run_config`` and take precedence.
    stop : threading.Event, optional
        Set when the simulation is interrupted; the ServerApp then stops
        waiting for replies, saves its checkpoint and ends (see :class:`SiteGrid`).

    Returns
    -------
    ServerApp
    """
    defaults = dict(settings or {})
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        values = run_settings(defaults, context.run_config)
        if not defaults:
            # Under `flwr run` this is a process of its own, whose output `flwr log`
            # shows; without a handler fedad's per-round line would be dropped there.
            _log_to_stderr()
        if "run-dir" not in values:
            raise FedadError(
                "The ServerApp got no run-dir in its run config. Prepare the run with "
                "`python -m fedad.deployment` and pass the run_config.toml it writes to "
                "`flwr run --run-config` (see docs/deployment.md)."
            )
        run_server(grid, values, stop)

    return app


def _log_to_stderr() -> None:
    logger = logging.getLogger("fedad")
    if not logger.handlers and not logging.getLogger().handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s fedad: %(message)s", "%H:%M:%S"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)


# Entry point for `flwr run` (Deployment Engine): settings come from the run config.
app = server_app()


class Stopped(Exception):
    """The simulation is being interrupted (Ctrl-C, SIGTERM) while the ServerApp waits."""


class SiteGrid(Grid):
    """A view of a Grid that lists sites in partition order and counts failed replies.

    Flower samples with ``random.sample`` over ``get_node_ids()``, whose order
    (a set of random node ids) changes from run to run; listing nodes by
    partition id makes a seed pick the same sites every time. Replies come
    back sorted the same way, so aggregation sums in a fixed order. Error
    replies and replies missing at the timeout are counted per message type
    and logged with the site's partition id and the reason. Once ``stop`` is
    set, waiting raises :class:`Stopped`, so the ServerApp thread ends with
    the process instead of waiting out the round. Everything else is
    delegated to the wrapped Grid.
    """

    def __init__(self, grid: Grid, stop: threading.Event | None = None) -> None:
        self._grid = grid
        self.stop = stop
        self.partition_of: dict[int, int] = {}
        self.failures: Counter[str] = Counter()

    def set_run(self, run) -> None:
        self._grid.set_run(run)

    @property
    def run(self):
        return self._grid.run

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):
        return self._grid.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> list[int]:
        """Return the connected node ids, ordered by partition id."""
        return sorted(self._grid.get_node_ids(), key=self._order)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self._grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self._grid.pull_messages(message_ids)

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> list[Message]:
        """Send, wait ``timeout`` s at most, count and log failures, return replies by site."""
        messages = list(messages)
        pending = set(self._grid.push_messages(messages))
        deadline = math.inf if timeout is None else time.monotonic() + timeout
        replies: list[Message] = []
        while True:
            self.check_stop()
            asked = time.monotonic()
            arrived = list(self._grid.pull_messages(pending))
            cost = time.monotonic() - asked
            replies += arrived
            pending -= {m.metadata.reply_to_message_id for m in arrived}
            if not pending or time.monotonic() >= deadline:
                break
            time.sleep(min(POLL_SECONDS, max(MIN_POLL_SECONDS, cost / POLL_COST_SHARE)))
        replies.sort(key=lambda m: self._order(m.metadata.src_node_id))
        self._count_failures(messages, replies, timeout)
        return replies

    def check_stop(self) -> None:
        """Raise :class:`Stopped` once the simulation is being interrupted."""
        if self.stop is not None and self.stop.is_set():
            raise Stopped("the simulation was interrupted")

    def _count_failures(
        self, messages: list[Message], replies: list[Message], timeout: float | None
    ) -> None:
        answers = {m.metadata.reply_to_message_id: m for m in replies}
        for message in messages:
            reply = answers.get(message.metadata.message_id)
            if reply is not None and not reply.has_error():
                continue
            kind = message.metadata.message_type
            self.failures[kind] += 1
            reason = f"no reply within {timeout:g} s" if reply is None else reply.error.reason
            config = message.content.config_records.get("config") or {}
            step = f"round {config['server-round']} {kind}" if "server-round" in config else kind
            node = message.metadata.dst_node_id
            log.warning(
                "site %s failed (%s): %s",
                self.partition_of.get(node, f"at node {node}"),
                step,
                # An actor's death comes with a page of Ray internals; its first line says it.
                reason.strip().splitlines()[0][:300] if reason.strip() else "no reason given",
            )

    def take_failures(self) -> tuple[int, int]:
        """Return and reset the ``(train, evaluate)`` failures counted so far."""
        counts = (self.failures[MessageType.TRAIN], self.failures[MessageType.EVALUATE])
        self.failures.clear()
        return counts

    def _order(self, node_id: int) -> tuple[float, int]:
        return (self.partition_of.get(node_id, float("inf")), node_id)


class Rounds(Strategy):
    """A strategy wrapper: absolute round numbers, per-round sampling seeds, a minimum of replies.

    Flower's ``start`` counts rounds from 1. A run resumed after round ``done``
    hands ``done + round`` to the wrapped strategy, so that the clients (their
    seeds, the injected failures) and FedAdam's bias correction see the round
    numbers of an uninterrupted run; site sampling is seeded with the seed and
    that round for the same reason. A training round with fewer good replies
    than ``min_replies`` raises :class:`FedadError`. The aggregated client
    metrics of each round are kept for the history.
    """

    def __init__(self, strategy: Strategy, done: int, seed: int, min_replies: int) -> None:
        self.strategy = strategy
        self.done = done
        self.seed = seed
        self.min_replies = min_replies
        self.sampled = 0
        self.train_metrics: dict[int, MetricRecord] = {}
        self.evaluate_metrics: dict[int, MetricRecord] = {}

    def absolute(self, server_round: int) -> int:
        """Return the run's round number for Flower's ``server_round``."""
        return self.done + server_round

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> list[Message]:
        server_round = self.absolute(server_round)
        random.seed(f"{self.seed}/train/{server_round}")
        messages = list(self.strategy.configure_train(server_round, arrays, config, grid))
        self.sampled = len(messages)
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        server_round = self.absolute(server_round)
        replies = list(replies)
        good = sum(not m.has_error() for m in replies)
        if good < self.min_replies:
            raise FedadError(
                f"Round {server_round} got training replies from only {good} of the "
                f"{self.sampled} sampled sites, fewer than simulation.min_clients="
                f"{self.min_replies}; the failing sites and their reasons are logged above."
            )
        arrays, metrics = self.strategy.aggregate_train(server_round, replies)
        if metrics is not None:
            self.train_metrics[server_round] = metrics
        return arrays, metrics

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        server_round = self.absolute(server_round)
        random.seed(f"{self.seed}/evaluate/{server_round}")
        return self.strategy.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        server_round = self.absolute(server_round)
        metrics = self.strategy.aggregate_evaluate(server_round, replies)
        if metrics is not None:
            self.evaluate_metrics[server_round] = metrics
        return metrics

    def summary(self) -> None:
        self.strategy.summary()


class ServerEvaluator:
    """Flower ``evaluate_fn``: score the global model on the global test set each round.

    Also times the rounds, collects the failures the :class:`SiteGrid`
    counted and the client metrics :class:`Rounds` kept into one history row
    per round, keeps the latest global arrays, logs one line per round and
    hands the round's state to the :class:`~fedad.federated.checkpoint.Checkpointer`.
    ``history`` holds the rows of the rounds a resumed run already has.
    """

    def __init__(
        self,
        model: keras.Model,
        X_test: np.ndarray,
        y_test: np.ndarray,
        class_names: list[str],
        num_rounds: int,
        grid: SiteGrid,
        rounds: Rounds,
        checkpointer: checkpoint.Checkpointer,
        history: list[dict],
    ) -> None:
        self.model = model
        self.X_test, self.y_test = X_test, y_test
        self.class_names = class_names
        self.num_rounds = num_rounds
        self.grid = grid
        self.rounds = rounds
        self.checkpointer = checkpointer
        self.rows: list[dict] = list(history)
        self.arrays: ArrayRecord | None = None
        self._last = time.perf_counter()
        self._started_at = time.time()

    def __call__(self, server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        """Evaluate ``arrays``; return the metrics Flower stores for ``server_round``."""
        self.arrays = arrays
        server_round = self.rounds.absolute(server_round)
        if self.rows and self.rows[-1]["round"] == server_round:
            # Flower first evaluates the initial arrays: resumed, they are the
            # checkpoint's model, evaluated in its own round already.
            return None
        self.model.set_weights(arrays.to_numpy_ndarrays())
        scores = self.model.predict(self.X_test, batch_size=4096, verbose=0)
        metrics = evaluation_metrics(self.y_test, scores, self.class_names)
        train_failures, eval_failures = self.grid.take_failures()
        now = time.perf_counter()
        seconds, self._last = now - self._last, now
        started_at, self._started_at = self._started_at, time.time()
        client = self.rounds.evaluate_metrics.get(server_round, {})
        self.rows.append(
            {
                "round": server_round,
                **metrics,
                **self.rounds.train_metrics.get(server_round, {}),
                **{f"client_{k}": v for k, v in client.items()},
                "failures": train_failures,
                "eval_failures": eval_failures,
                "seconds": seconds,
                "started_at": started_at,
            }
        )
        log.info(
            "round %d/%d  loss %.3f  macro-F1 %.3f  ROC-AUC %.3f  failures %d  %.1f s",
            server_round,
            self.num_rounds,
            metrics["loss"],
            metrics["macro_f1"],
            metrics["roc_auc"],
            train_failures,
            seconds,
        )
        self.checkpointer.round_done(server_round, arrays.to_numpy_ndarrays(), self.rows)
        return MetricRecord(metrics)


def run_server(grid: Grid, settings: Settings, stop: threading.Event | None = None) -> None:
    """Run the whole federated job and write its outputs to ``run-dir``.

    Steps: a ``query`` round collects each site's row count and feature sums
    and pools them into a global mean and standard deviation (no raw row
    leaves a site); the strategy then runs ``num_rounds`` rounds of training,
    client evaluation and server evaluation on the global test set; a final
    evaluation pass over every site measures the final model per site.

    Scaling: with ``simulation.scaling = federated`` the pooled statistics go
    to the sites in every train/evaluate config; with ``local`` each site
    scales with its own shard's statistics. The server always scales the
    global test set with the pooled statistics: it holds no site's data, and
    the pooled statistics are the best estimate of the population the global
    model serves.

    Checkpoints and faults: after every ``simulation.checkpoint_every`` rounds
    (round 0 and the last included) the global model, the strategy's state and
    the history go to ``run-dir/checkpoint`` (see :mod:`fedad.federated.checkpoint`);
    with ``resume`` set the run continues from there. Each exchange waits
    ``simulation.round_timeout`` seconds at most; failed sites are logged and
    counted, and a training round with fewer good replies than
    ``simulation.min_clients`` stops the run with :class:`FedadError` after
    the last complete round is checkpointed.

    Parameters
    ----------
    grid : Grid
        From Flower.
    settings : Mapping
        ``run-dir``, ``seed``, ``num-clients``, ``num-features``,
        ``class-names`` (JSON list), ``model.*``, ``train.*``, ``strategy.*``,
        ``simulation.*`` (``num_rounds``, ``fraction_train``,
        ``fraction_evaluate``, ``min_clients``, ``scaling``, ``round_timeout``,
        ``checkpoint_every``), ``resume`` (bool) and ``fingerprint`` (JSON,
        stored with each checkpoint).
    stop : threading.Event, optional
        See :class:`SiteGrid`.

    Notes
    -----
    Writes ``history.csv`` (one row per round, round 0 = initial model),
    ``clients.csv`` (per-site metrics of the final model), ``global_model.keras``
    and ``scaling.npz`` (the pooled ``mean``/``std`` the model's inputs need).
    """
    run_dir = Path(str(settings["run-dir"]))
    seed = int(settings["seed"])
    num_rounds = int(settings["simulation.num_rounds"])
    timeout = float(settings.get("simulation.round_timeout", DEFAULT_ROUND_TIMEOUT))
    class_names = json.loads(str(settings["class-names"]))
    previous = checkpoint.load(run_dir) if settings.get("resume", False) else None
    done = previous.round if previous else 0
    sites = SiteGrid(grid, stop)

    node_ids = _wait_for_nodes(sites, int(settings["num-clients"]))
    counts, mean, std = _pooled_statistics(sites, node_ids)
    np.savez(run_dir / SCALING_FILE, mean=mean, std=std)
    config = ConfigRecord()
    if settings["simulation.scaling"] == "federated":
        config = ConfigRecord({"scale-mean": mean.tolist(), "scale-std": std.tolist()})

    keras.utils.set_random_seed(seed)
    model = global_model(settings)
    X_test, y_test = shards.read_shard(shards.test_path(run_dir), "server")
    strategy_cfg = {
        k.removeprefix("strategy."): v for k, v in settings.items() if k.startswith("strategy.")
    }
    strategy = build_strategy(
        strategy_cfg,
        float(settings["simulation.fraction_train"]),
        float(settings["simulation.fraction_evaluate"]),
        int(settings["simulation.min_clients"]),
    )
    if previous:
        checkpoint.restore_strategy_state(strategy, previous.strategy_state)
        log.info("resuming after round %d of %d from %s", done, num_rounds, run_dir)
    rounds = Rounds(strategy, done, seed, int(settings["simulation.min_clients"]))
    checkpointer = checkpoint.Checkpointer(
        run_dir,
        int(settings.get("simulation.checkpoint_every", 1)),
        num_rounds,
        json.loads(str(settings.get("fingerprint", "{}"))),
        strategy,
        saved_round=done if previous else None,
    )
    evaluator = ServerEvaluator(
        model,
        scaling.standardize(X_test, mean, std),
        y_test,
        class_names,
        num_rounds,
        sites,
        rounds,
        checkpointer,
        previous.history if previous else [],
    )
    try:
        rounds.start(
            grid=sites,
            initial_arrays=ArrayRecord(previous.arrays if previous else model.get_weights()),
            num_rounds=num_rounds - done,
            timeout=timeout,
            train_config=ConfigRecord(dict(config)),
            evaluate_config=ConfigRecord(dict(config)),
            evaluate_fn=evaluator,
        )
    except Exception as error:
        # Whatever stopped the run, the last complete round is still worth keeping.
        saved = checkpointer.flush()
        if isinstance(error, FedadError) and saved is not None:
            raise FedadError(
                f"{error} The run stopped; its state after round {saved} is checkpointed in "
                f"{run_dir}: continue it with the same settings plus resume={run_dir} once the "
                "sites are back (or with a lower simulation.min_clients)."
            ) from None
        raise

    final_config = ConfigRecord({**config, "server-round": num_rounds, "final": True})
    clients = _final_site_metrics(sites, evaluator.arrays, final_config, counts, timeout)
    clients.to_csv(run_dir / CLIENTS_FILE, index=False)
    _history(evaluator.rows).to_csv(run_dir / HISTORY_FILE, index=False)
    model.set_weights(evaluator.arrays.to_numpy_ndarrays())
    # A built optimizer is saved with all its slots, so loading the file with
    # compile=True does not warn about missing optimizer variables.
    model.optimizer.build(model.trainable_variables)
    with warnings.catch_warnings():
        # Keras 3.15 converts TF variables with a NumPy-2-deprecated call; harmless.
        warnings.filterwarnings(
            "ignore", message="__array__ implementation", category=DeprecationWarning
        )
        model.save(run_dir / MODEL_FILE)


def global_model(settings: Settings) -> keras.Model:
    """Build and compile the server's copy of the model the sites train, from ``settings``.

    Parameters
    ----------
    settings : Mapping
        Flat run settings with ``model.*``, ``num-features``, ``class-names``,
        ``train.learning_rate`` and ``train.optimizer``.

    Returns
    -------
    keras.Model
        Fresh weights drawn from Keras's current random state.
    """
    model_cfg = {k.removeprefix("model."): v for k, v in settings.items() if k.startswith("model.")}
    return build_model(
        model_cfg,
        int(settings["num-features"]),
        len(json.loads(str(settings["class-names"]))),
        float(settings["train.learning_rate"]),
        str(settings["train.optimizer"]),
    )


def _wait_for_nodes(sites: SiteGrid, expected: int, timeout: float = 300.0) -> list[int]:
    """Return the node ids once all ``expected`` sites are connected.

    Simulated sites are there at once; under `flwr run` the SuperNodes may
    connect after the run starts, so a missing one gets a message naming the fix.
    """
    deadline = time.monotonic() + timeout
    while len(node_ids := sites.get_node_ids()) < expected:
        sites.check_stop()
        if time.monotonic() > deadline:
            raise FedadError(
                f"Only {len(node_ids)} of the {expected} sites connected within {timeout:g} s. "
                "Every site needs a SuperNode connected to this SuperLink, started with "
                f'--node-config "partition-id=<i> num-partitions={expected}" for i = 0 .. '
                f"{expected - 1} (see docs/deployment.md)."
            )
        time.sleep(POLL_SECONDS)
    return node_ids


def _pooled_statistics(
    sites: SiteGrid, node_ids: list[int]
) -> tuple[dict[int, int], np.ndarray, np.ndarray]:
    """Query every site's sums; return rows per partition, pooled mean and std.

    Also teaches ``sites`` which node holds which partition. No timeout: the
    replies wait for the sites' start-up (Ray actors importing TensorFlow).
    """
    messages = [
        Message(
            RecordDict({"config": ConfigRecord()}), dst_node_id=n, message_type=MessageType.QUERY
        )
        for n in node_ids
    ]
    replies = sites.send_and_receive(messages)
    errors = [m.error.reason for m in replies if m.has_error()]
    if errors or len(replies) != len(node_ids):
        raise RuntimeError(f"the scaling-statistics query failed at some sites: {errors}")
    counts, sums = {}, []
    for reply in replies:
        stats = reply.content["stats"]
        pid = int(stats["partition-id"])
        sites.partition_of[reply.metadata.src_node_id] = pid
        counts[pid] = int(stats["count"])
        sums.append((counts[pid], np.asarray(stats["sum"]), np.asarray(stats["sumsq"])))
    mean, std = scaling.pooled_moments(sums)
    return counts, mean, std


def _final_site_metrics(
    sites: SiteGrid,
    arrays: ArrayRecord,
    config: ConfigRecord,
    counts: dict[int, int],
    timeout: float,
) -> pd.DataFrame:
    """Evaluate the final global model at every site; one row per site that replied."""
    messages = [
        Message(
            RecordDict({"arrays": arrays, "config": config}),
            dst_node_id=n,
            message_type=MessageType.EVALUATE,
        )
        for n in sites.get_node_ids()
    ]
    rows = []
    for reply in sites.send_and_receive(messages, timeout=timeout):
        pid = sites.partition_of[reply.metadata.src_node_id]
        row = {"client": pid, "n_examples": counts[pid]}
        if reply.has_error():
            row["error"] = reply.error.reason
        else:
            metrics = dict(reply.content["metrics"])
            row["n_test"] = metrics.pop("num-examples")
            row.update(metrics)
        rows.append(row)
    return pd.DataFrame(rows)


def _history(rows: list[dict]) -> pd.DataFrame:
    """The rows as a table, with the failure counts and timings last."""
    history = pd.DataFrame(rows)
    tail = ["failures", "eval_failures", "seconds", "started_at"]
    return history[[c for c in history.columns if c not in tail] + tail]
