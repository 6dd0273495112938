"""Flower ServerApp: pooled scaling statistics, the strategy's rounds and the run's outputs."""

from __future__ import annotations

import json
import logging
import random
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
from flwr.serverapp.strategy import Result

from fedad.federated import scaling, shards
from fedad.federated.client_app import evaluation_metrics
from fedad.federated.strategies import build_strategy
from fedad.models import build_model

log = logging.getLogger(__name__)

Settings = Mapping[str, UserConfigValue]

HISTORY_FILE = "history.csv"
CLIENTS_FILE = "clients.csv"
MODEL_FILE = "global_model.keras"
SCALING_FILE = "scaling.npz"


def server_app(settings: Settings | None = None) -> ServerApp:
    """Return the ServerApp, configured by ``settings`` and the run config.

    Parameters
    ----------
    settings : Mapping, optional
        Flat run settings (see :func:`run_server`). The Simulation Engine has
        no run config, so it passes them here; under ``flwr run`` the same keys
        come from ``context.run_config`` and take precedence.

    Returns
    -------
    ServerApp
    """
    defaults = dict(settings or {})
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        run_server(grid, {**defaults, **context.run_config})

    return app


# Entry point for `flwr run` (Deployment Engine): settings come from the run config.
app = server_app()


class SiteGrid(Grid):
    """A view of a Grid that lists sites in partition order and counts failed replies.

    Flower samples with ``random.sample`` over ``get_node_ids()``, whose order
    (a set of random node ids) changes from run to run; listing nodes by
    partition id makes a seed pick the same sites every time. Replies come
    back sorted the same way, so aggregation sums in a fixed order. Error
    replies and missing replies are counted per message type. Everything
    else is delegated to the wrapped Grid.
    """

    def __init__(self, grid: Grid) -> None:
        self._grid = grid
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
        """Send, wait for the replies, count the failed ones, return them in site order."""
        messages = list(messages)
        replies = sorted(
            self._grid.send_and_receive(messages, timeout=timeout),
            key=lambda m: self._order(m.metadata.src_node_id),
        )
        for message_type in {m.metadata.message_type for m in messages}:
            sent = sum(m.metadata.message_type == message_type for m in messages)
            ok = sum(m.metadata.message_type == message_type and not m.has_error() for m in replies)
            self.failures[message_type] += sent - ok
        return replies

    def take_failures(self) -> tuple[int, int]:
        """Return and reset the ``(train, evaluate)`` failures counted so far."""
        counts = (self.failures[MessageType.TRAIN], self.failures[MessageType.EVALUATE])
        self.failures.clear()
        return counts

    def _order(self, node_id: int) -> tuple[float, int]:
        return (self.partition_of.get(node_id, float("inf")), node_id)


class ServerEvaluator:
    """Flower ``evaluate_fn``: score the global model on the global test set each round.

    Also times the rounds, collects the failures the :class:`SiteGrid`
    counted, keeps the latest global arrays and logs one line per round.
    """

    def __init__(
        self,
        model: keras.Model,
        X_test: np.ndarray,
        y_test: np.ndarray,
        class_names: list[str],
        num_rounds: int,
        grid: SiteGrid,
    ) -> None:
        self.model = model
        self.X_test, self.y_test = X_test, y_test
        self.class_names = class_names
        self.num_rounds = num_rounds
        self.grid = grid
        self.rows: list[dict] = []
        self.arrays: ArrayRecord | None = None
        self._last = time.perf_counter()

    def __call__(self, server_round: int, arrays: ArrayRecord) -> MetricRecord:
        """Evaluate ``arrays``; return the metrics Flower stores for ``server_round``."""
        self.model.set_weights(arrays.to_numpy_ndarrays())
        self.arrays = arrays
        scores = self.model.predict(self.X_test, batch_size=4096, verbose=0)
        metrics = evaluation_metrics(self.y_test, scores, self.class_names)
        train_failures, eval_failures = self.grid.take_failures()
        now = time.perf_counter()
        seconds, self._last = now - self._last, now
        self.rows.append(
            {
                "round": server_round,
                **metrics,
                "failures": train_failures,
                "eval_failures": eval_failures,
                "seconds": seconds,
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
        return MetricRecord(metrics)


def run_server(grid: Grid, settings: Settings) -> None:
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

    Parameters
    ----------
    grid : Grid
        From Flower.
    settings : Mapping
        ``run-dir``, ``seed``, ``num-clients``, ``num-features``,
        ``class-names`` (JSON list), ``model.*``, ``train.*``, ``strategy.*``
        and ``simulation.*`` (``num_rounds``, ``fraction_train``,
        ``fraction_evaluate``, ``min_clients``, ``scaling``).

    Notes
    -----
    Writes ``history.csv`` (one row per round, round 0 = initial model),
    ``clients.csv`` (per-site metrics of the final model), ``global_model.keras``
    and ``scaling.npz`` (the pooled ``mean``/``std`` the model's inputs need).
    """
    run_dir = Path(str(settings["run-dir"]))
    seed = int(settings["seed"])
    num_rounds = int(settings["simulation.num_rounds"])
    class_names = json.loads(str(settings["class-names"]))
    # Flower samples sites with the global `random` module.
    random.seed(seed)
    sites = SiteGrid(grid)

    node_ids = _wait_for_nodes(grid, int(settings["num-clients"]))
    counts, mean, std = _pooled_statistics(sites, node_ids)
    np.savez(run_dir / SCALING_FILE, mean=mean, std=std)
    config = ConfigRecord()
    if settings["simulation.scaling"] == "federated":
        config = ConfigRecord({"scale-mean": mean.tolist(), "scale-std": std.tolist()})

    keras.utils.set_random_seed(seed)
    model_cfg = {k.removeprefix("model."): v for k, v in settings.items() if k.startswith("model.")}
    model = build_model(
        model_cfg,
        int(settings["num-features"]),
        len(class_names),
        float(settings["train.learning_rate"]),
        str(settings["train.optimizer"]),
    )
    X_test, y_test = shards.read_shard(shards.test_path(run_dir), "server")
    evaluator = ServerEvaluator(
        model, scaling.standardize(X_test, mean, std), y_test, class_names, num_rounds, sites
    )
    strategy_cfg = {
        k.removeprefix("strategy."): v for k, v in settings.items() if k.startswith("strategy.")
    }
    strategy = build_strategy(
        strategy_cfg,
        float(settings["simulation.fraction_train"]),
        float(settings["simulation.fraction_evaluate"]),
        int(settings["simulation.min_clients"]),
    )
    result = strategy.start(
        grid=sites,
        initial_arrays=ArrayRecord(model.get_weights()),
        num_rounds=num_rounds,
        train_config=ConfigRecord(dict(config)),
        evaluate_config=ConfigRecord(dict(config)),
        evaluate_fn=evaluator,
    )

    final_config = ConfigRecord({**config, "server-round": num_rounds, "final": True})
    clients = _final_site_metrics(sites, evaluator.arrays, final_config, counts)
    clients.to_csv(run_dir / CLIENTS_FILE, index=False)
    _history(evaluator.rows, result).to_csv(run_dir / HISTORY_FILE, index=False)
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


def _wait_for_nodes(grid: Grid, expected: int, timeout: float = 300.0) -> list[int]:
    """Return the node ids once all ``expected`` simulated sites are connected."""
    deadline = time.monotonic() + timeout
    while len(node_ids := list(grid.get_node_ids())) < expected:
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {len(node_ids)} of {expected} sites connected")
        time.sleep(0.1)
    return node_ids


def _pooled_statistics(
    sites: SiteGrid, node_ids: list[int]
) -> tuple[dict[int, int], np.ndarray, np.ndarray]:
    """Query every site's sums; return rows per partition, pooled mean and std.

    Also teaches ``sites`` which node holds which partition.
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
) -> pd.DataFrame:
    """Evaluate the final global model at every site; one row per site."""
    messages = [
        Message(
            RecordDict({"arrays": arrays, "config": config}),
            dst_node_id=n,
            message_type=MessageType.EVALUATE,
        )
        for n in sites.get_node_ids()
    ]
    rows = []
    for reply in sites.send_and_receive(messages):
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


def _history(rows: list[dict], result: Result) -> pd.DataFrame:
    """Join server-side rows with the strategy's aggregated client metrics."""
    for row in rows:
        row.update(result.train_metrics_clientapp.get(row["round"], {}))
        client = result.evaluate_metrics_clientapp.get(row["round"], {})
        row.update({f"client_{k}": v for k, v in client.items()})
    history = pd.DataFrame(rows)
    tail = ["failures", "eval_failures", "seconds"]
    return history[[c for c in history.columns if c not in tail] + tail]
