"""The SecAgg+ round loop: Flower's legacy ``SecAggPlusWorkflow`` per round, fedad's rows kept."""

from __future__ import annotations

import random
import time
from collections import defaultdict
from collections.abc import Iterable, Mapping
from typing import Any, cast

import numpy as np
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.common import FitRes, Parameters, Scalar, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Stage
from flwr.common.secure_aggregation.secaggplus_constants import Key as SecAggKey
from flwr.compat.common import recorddict_compat as compat
from flwr.server import LegacyContext, ServerConfig, SimpleClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.strategy import FedAvg
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD, Key
from flwr.serverapp import Grid

from fedad.config import section
from fedad.errors import FedadError
from fedad.federated.grid import SiteGrid, payload
from fedad.federated.rounds import Rounds, ServerEvaluator
from fedad.federated.stopping import StopTraining
from fedad.federated.task import Settings

# History columns per stage: seconds, bytes each way (every record: the masked vectors and
# keys travel in ConfigRecords) and failed sites.
STAGE_FIELDS = ("seconds", "bytes_down", "bytes_up", "failures")


class MaskedMean(FedAvg):
    """Flower's legacy FedAvg as SecAgg+ drives it; keeps what its aggregate step receives.

    Under SecAgg+ every result's parameters are the unmasked weighted mean
    (the workflow puts the same aggregate in each), so the weighted mean of
    them is that aggregate; the example counts and metrics arrive in the
    clear. ``received`` holds the round and the results of the last call of
    :meth:`aggregate_fit` (a round that halted never calls it), ``distinct``
    how many different arrays they held, ``metrics`` its metrics.

    Parameters
    ----------
    fraction_fit : float
        Share of sites sampled for training.
    min_clients : int
        Least sites sampled and connected.
    train_config : Mapping
        fedad's train config (the pooled scaling statistics, ...); the round and
        FedProx's ``proximal-mu`` are added per round.
    proximal_mu : float, optional
        FedProx's proximal weight; None under FedAvg.
    """

    def __init__(
        self,
        fraction_fit: float,
        min_clients: int,
        train_config: Mapping[str, Any],
        proximal_mu: float | None = None,
    ) -> None:
        super().__init__(
            fraction_fit=fraction_fit,
            fraction_evaluate=0.0,
            min_fit_clients=min_clients,
            min_evaluate_clients=0,
            min_available_clients=min_clients,
            on_fit_config_fn=self.fit_config,
            fit_metrics_aggregation_fn=weighted_metrics,
        )
        self.train_config = dict(train_config)
        self.proximal_mu = proximal_mu
        self.received: tuple[int, list[FitRes]] | None = None
        # How many different arrays those results held: 1 under SecAgg+ (the sum alone).
        self.distinct = 0
        self.metrics: dict[str, Scalar] = {}

    def fit_config(self, server_round: int) -> dict[str, Scalar]:
        """The FitIns config of a round: fedad's train config, the round, FedProx's mu."""
        config = {**self.train_config, "server-round": server_round}
        if self.proximal_mu is not None:
            config["proximal-mu"] = self.proximal_mu
        # Lists (the scaling statistics) go into the ConfigRecord as they are.
        return cast(dict[str, Scalar], config)

    def aggregate_fit(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, FitRes]],
        failures: list[tuple[ClientProxy, FitRes] | BaseException],
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
        """Keep what arrived, then average it as FedAvg does."""
        self.received = (server_round, [res for _, res in results])
        self.distinct = len({b"".join(res.parameters.tensors) for _, res in results})
        parameters, self.metrics = super().aggregate_fit(server_round, results, failures)
        return parameters, self.metrics


def weighted_metrics(results: list[tuple[int, dict[str, Scalar]]]) -> dict[str, Scalar]:
    """The sites' training metrics averaged by their examples (the ``train_*`` columns)."""
    total = sum(n for n, _ in results)
    keys = results[0][1] if results and total else {}
    return {k: sum(n * float(cast(float, m[k])) for n, m in results) / total for k in keys}


class StageGrid(Grid):
    """The SiteGrid the workflow talks through, counting each SecAgg+ stage on its own.

    Every stage is one ``send_and_receive`` of train messages, named by the
    stage key of their SecAgg+ ConfigRecord: its seconds, the bytes of every
    record each way (the keys, shares and masked vectors travel in
    ConfigRecords, which the SiteGrid files under ``bytes_*_other``) and the
    sites that failed it. A site that fails a stage is not asked in the later
    ones, so it counts once. The SiteGrid still counts the failures and bytes
    of the usual columns.
    """

    def __init__(self, sites: SiteGrid) -> None:
        self.sites = sites
        self.stats: defaultdict[str, float] = defaultdict(float)
        self.last_stage = ""
        self.last_good = 0

    def set_run(self, run: Any) -> None:
        """Set the run on the wrapped Grid."""
        self.sites.set_run(run)

    @property
    def run(self) -> Any:
        """The wrapped Grid's run."""
        return self.sites.run

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):
        """Create a message with the wrapped Grid."""
        return self.sites.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> list[int]:
        """The sites' node ids, in partition order."""
        return self.sites.get_node_ids()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Push through the wrapped Grid."""
        return self.sites.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        """Pull through the wrapped Grid."""
        return self.sites.pull_messages(message_ids)

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> list[Message]:
        """Send one stage's messages through the SiteGrid; count the stage."""
        messages = list(messages)
        stage = stage_of(messages[0]) if messages else "none"
        failed = self.sites.failures[MessageType.TRAIN]
        start = time.perf_counter()
        replies = self.sites.send_and_receive(messages, timeout=timeout)
        self.stats[f"secagg_{stage}_seconds"] += time.perf_counter() - start
        self.stats[f"secagg_{stage}_bytes_down"] += sum(sum(payload(m)) for m in messages)
        self.stats[f"secagg_{stage}_bytes_up"] += sum(sum(payload(m)) for m in replies)
        self.stats[f"secagg_{stage}_failures"] += self.sites.failures[MessageType.TRAIN] - failed
        self.last_stage = stage
        self.last_good = sum(not m.has_error() for m in replies)
        return replies

    def take(self) -> dict[str, float]:
        """Return and reset the counts, every stage's columns present (0 if it did not run)."""
        counts: dict[str, float] = {
            f"secagg_{stage}_{field}": self.stats[f"secagg_{stage}_{field}"]
            for stage in Stage.all()
            for field in STAGE_FIELDS
        }
        counts["secagg_results"] = self.stats["secagg_results"]
        counts["secagg_distinct_arrays"] = self.stats["secagg_distinct_arrays"]
        self.stats.clear()
        return counts


def stage_of(message: Message) -> str:
    """The SecAgg+ stage a workflow message asks for."""
    return str(message.content.config_records[RECORD_KEY_CONFIGS][SecAggKey.STAGE])


def run_rounds(
    rounds: Rounds,
    settings: Settings,
    *,
    grid: SiteGrid,
    initial_arrays: ArrayRecord,
    num_rounds: int,
    timeout: float,
    train_config: ConfigRecord,
    evaluate_config: ConfigRecord,
    evaluate_fn: ServerEvaluator,
) -> None:
    """Run ``num_rounds`` rounds with SecAgg+ training, as ``Strategy.start`` runs them.

    Each round: Flower's ``SecAggPlusWorkflow`` (setup, share keys, masked
    training, unmask) on a legacy context holding the round and the global
    model, whose strategy (:class:`MaskedMean`) gets only the unmasked mean;
    then fedad's client evaluation (``rounds``' strategy on the Message API)
    and the server's (``evaluator``, which writes the history row, the
    checkpoint and the per-round log). Each row gains the stages' columns
    (:class:`StageGrid`). The round numbers, sampling seeds, early stopping
    and the minimum of replies are :class:`~fedad.federated.rounds.Rounds`'.

    Parameters
    ----------
    rounds : Rounds
        The run's round bookkeeping around its (Message API) strategy.
    settings : Mapping
        The run's flat settings (``secure_aggregation.*``, ``strategy.*``, ``simulation.*``).
    grid : SiteGrid
        The run's grid.
    initial_arrays : ArrayRecord
        The model to start from.
    num_rounds : int
        Rounds to run.
    timeout : float
        Seconds an evaluation waits for replies; a stage waits
        ``secure_aggregation.timeout``, by default this.
    train_config, evaluate_config : ConfigRecord
        As ``Strategy.start`` takes them.
    evaluate_fn : ServerEvaluator
        The server's evaluation.

    Raises
    ------
    FedadError
        When a round's protocol halts (too few sites left for the reconstruction
        threshold) or fewer than ``simulation.min_clients`` sites' updates are in the sum.
    StopTraining
        When early stopping ends training before a round.
    """
    sites, evaluator = grid, evaluate_fn
    secagg = section(settings, "secure_aggregation")
    strategy_cfg = section(settings, "strategy")
    mu = strategy_cfg.get("proximal_mu")
    strategy = MaskedMean(
        float(settings["simulation.fraction_train"]),
        rounds.min_replies,
        dict(train_config),
        None if strategy_cfg.get("name") != "fedprox" else float(cast(float, mu)),
    )
    stages = StageGrid(sites)
    context = LegacyContext(
        Context(run_id=0, node_id=0, node_config={}, state=RecordDict(), run_config={}),
        config=ServerConfig(num_rounds=num_rounds),
        strategy=strategy,
        client_manager=SimpleClientManager(),
    )
    # Registered in partition order, so a seeded round samples the same sites every run.
    for node in sites.get_node_ids():
        context.client_manager.register(GridClientProxy(node, stages, sites.run.run_id))
    shares = secagg["num_shares"]
    workflow = SecAggPlusWorkflow(
        num_shares=float(shares) if isinstance(shares, float) else int(shares),
        reconstruction_threshold=int(secagg["reconstruction_threshold"]),
        max_weight=float(secagg["max_weight"]),
        clipping_range=float(secagg["clipping_range"]),
        quantization_range=int(secagg["quantization_range"]),
        timeout=timeout if secagg.get("timeout") in (None, "") else float(secagg["timeout"]),
    )
    fields = evaluator.fields
    evaluator.fields = lambda: {**(fields() if fields else {}), **stages.take()}
    dtypes = [a.dtype for a in initial_arrays.to_numpy_ndarrays()]
    evaluator(0, initial_arrays)
    arrays = initial_arrays
    for server_round in range(1, num_rounds + 1):
        absolute = rounds.absolute(server_round)
        if rounds.stopping is not None and rounds.stopping.exhausted:
            raise StopTraining(f"early stopping before round {absolute}")
        random.seed(f"{rounds.seed}/train/{absolute}")
        context.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord(
            {Key.CURRENT_ROUND: absolute, Key.START_TIME: time.time()}
        )
        # flower-internal: test_secaggplus_workflow_state
        context.state.array_records[MAIN_PARAMS_RECORD] = compat.parameters_to_arrayrecord(
            ndarrays_to_parameters(arrays.to_numpy_ndarrays()), keep_input=True
        )
        strategy.received = None
        workflow(stages, context)
        _check_round(strategy, stages, rounds, secagg, absolute)
        # What the server's aggregation step received: how many results, how many different
        # arrays among them (1: the unmasked sum in each, never a site's own update).
        stages.stats["secagg_results"] += len(cast(tuple, strategy.received)[1])
        stages.stats["secagg_distinct_arrays"] += strategy.distinct
        mean = parameters_to_ndarrays(
            compat.arrayrecord_to_parameters(
                context.state.array_records[MAIN_PARAMS_RECORD], keep_input=True
            )
        )
        arrays = ArrayRecord([np.asarray(a, dtype=d) for a, d in zip(mean, dtypes, strict=True)])
        rounds.train_metrics[absolute] = MetricRecord(cast(dict[str, Any], strategy.metrics))
        messages = rounds.configure_evaluate(server_round, arrays, evaluate_config, sites)
        replies = sites.send_and_receive(messages, timeout=timeout)
        rounds.aggregate_evaluate(server_round, replies)
        evaluator(server_round, arrays)


def _check_round(
    strategy: MaskedMean, grid: StageGrid, rounds: Rounds, secagg: Mapping, absolute: int
) -> None:
    """Raise if the round's protocol halted (Flower only logs it) or summed too few sites."""
    if strategy.received is None or strategy.received[0] != absolute:
        raise FedadError(
            f"Round {absolute}: secure aggregation halted at the SecAgg+ stage "
            f"{grid.last_stage}, where {grid.last_good} sites replied (Flower keeps the previous "
            "model). SecAgg+ rebuilds the masks only while at least secure_aggregation."
            f"reconstruction_threshold={secagg['reconstruction_threshold']} sites remain, and in "
            "flwr 1.42 a site lost before its key shares went out (setup, share_keys) halts "
            "the round whatever the threshold; the failing sites and their reasons are logged "
            "above."
        )
    # The strategy samples at least min_clients sites, so this many can always reply.
    summed = len(strategy.received[1])
    if summed < rounds.min_replies:
        raise FedadError(
            f"Round {absolute}: the secure sum holds the updates of only {summed} sites, fewer "
            f"than simulation.min_clients={rounds.min_replies}; the failing sites and their "
            "reasons are logged above."
        )
