"""FedXgbHistogram: one Flower round is one XGBoost federated session of the sampled sites."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterable
from typing import Any, cast

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from flwr.serverapp.strategy.strategy_utils import sample_nodes

from fedad.errors import FedadError
from fedad.federated.histogram import pinning, session
from fedad.federated.histogram.server import AggregationServer

log = logging.getLogger(__name__)

# The history column of the bytes the histogram allreduces moved (pinning.collective_bytes).
COLLECTIVE_BYTES = "bytes_collective"


class FedXgbHistogram(FedAvg):
    """Exact horizontal federated XGBoost: the sites sum gradient histograms, not trees.

    Each round the sampled sites join one session of XGBoost's federated
    communicator (:class:`AggregationServer`, started for the round on a
    probed port and stopped after it; the next round's starts as this one
    ends, so its start-up overlaps the evaluation) and boost
    ``model.local_rounds`` iterations from the global booster together
    (:mod:`~fedad.federated.histogram.session`): XGBoost merges their quantile
    sketches into one set of bin edges and sums their histograms at every tree
    level, so every site grows the same trees, those ``xgb.train`` grows on
    the pooled rows under the same edges. Before the first session the sites
    report their training rows' class counts once (a count query); the pooled
    counts of the sampled sites go to every site, so class weights are equal.
    Every site replies with the booster; they must agree byte for byte.

    Parameters
    ----------
    host : str
        The host the sites reach the server at (``localhost`` in simulation;
        under the Deployment Engine the server's address, with TLS in front).
    port : int
        The server's port; 0 probes a fresh free one every round.
    session_timeout : float
        Seconds a session may take at a site: past them the site ends its
        blocked session (a peer died) and replies with an error.
    """

    def __init__(
        self,
        fraction_train: float = 1.0,
        fraction_evaluate: float = 1.0,
        min_train_nodes: int = 2,
        min_evaluate_nodes: int = 2,
        min_available_nodes: int = 2,
        weighted_by_key: str = "num-examples",
        train_metrics_aggr_fn: Callable[[list[RecordDict], str], MetricRecord] | None = None,
        evaluate_metrics_aggr_fn: Callable[[list[RecordDict], str], MetricRecord] | None = None,
        host: str = "localhost",
        port: int = 0,
        session_timeout: float = 300.0,
    ) -> None:
        super().__init__(
            fraction_train=fraction_train,
            fraction_evaluate=fraction_evaluate,
            min_train_nodes=min_train_nodes,
            min_evaluate_nodes=min_evaluate_nodes,
            min_available_nodes=min_available_nodes,
            weighted_by_key=weighted_by_key,
            train_metrics_aggr_fn=train_metrics_aggr_fn,
            evaluate_metrics_aggr_fn=evaluate_metrics_aggr_fn,
        )
        self.host, self.port, self.session_timeout = host, int(port), float(session_timeout)
        self.counts: dict[int, list[int]] = {}
        self.server: AggregationServer | None = None
        # The next round's server, started as the last one ended, for a cohort of its size.
        self.upcoming: AggregationServer | None = None
        self.sampled: list[int] = []
        # The last session's bin edges (rank 0's) and pooled class counts: the twin's pins.
        self.cuts: tuple[np.ndarray, np.ndarray] | None = None
        self.pooled_counts: list[int] = []
        self._bytes = 0

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Sample the cohort, pool its class counts, start the round's server, rank the sites."""
        self._stop_server()
        order = list(grid.get_node_ids())
        size = max(int(len(order) * self.fraction_train), self.min_train_nodes)
        nodes, _ = sample_nodes(grid, self.min_available_nodes, size)
        # Ranks follow the grid's order (fedad's SiteGrid: partition order), not the draw's.
        nodes = sorted(nodes, key=order.index)
        upcoming, self.upcoming = self.upcoming, None
        if upcoming is not None and upcoming.world != len(nodes):
            upcoming.stop()
            upcoming = None
        # Started before the count query, it starts up while the sites count.
        self.server = upcoming or self._start(len(nodes))
        pooled = self._pooled_counts(nodes, config, grid)
        self.server.wait_ready()
        self.sampled, self.pooled_counts = nodes, pooled
        log.info(
            "round %d: histogram session of %d sites on port %d",
            server_round,
            len(nodes),
            self.server.port,
        )
        messages = []
        for rank, node in enumerate(nodes):
            entries = {
                **config,
                "server-round": server_round,
                session.ADDRESS: f"{self.host}:{self.server.port}",
                session.WORLD: len(nodes),
                session.RANK: rank,
                session.COUNTS: pooled,
                session.DEADLINE: self.session_timeout,
            }
            content = RecordDict({"arrays": arrays, "config": ConfigRecord(entries)})
            messages.append(Message(content, dst_node_id=node, message_type=MessageType.TRAIN))
        return messages

    def _pooled_counts(self, nodes: list[int], config: ConfigRecord, grid: Grid) -> list[int]:
        """The sites' training class counts, asked once per site (a count query), summed."""
        asking = [n for n in nodes if n not in self.counts]
        if asking:
            entries = {**config, session.COUNT_QUERY: True}
            queries = [
                Message(
                    RecordDict({"config": ConfigRecord(entries)}),
                    dst_node_id=n,
                    message_type=MessageType.QUERY,
                )
                for n in asking
            ]
            replies = list(grid.send_and_receive(queries, timeout=self.session_timeout))
            failed = len(asking) - sum(not m.has_error() for m in replies)
            if failed:
                raise FedadError(
                    f"{failed} of the {len(asking)} sites asked for their class counts (which "
                    "set the class weights every site of a histogram session shares) did not "
                    "answer; their reasons are logged above. Continue the run with "
                    "resume=<its folder> once the sites are back."
                )
            for reply in replies:
                record = cast(MetricRecord, reply.content["counts"])
                self.counts[reply.metadata.src_node_id] = [
                    int(c) for c in cast(list, record[session.CLASS_COUNTS])
                ]
        width = max(len(self.counts[n]) for n in nodes)
        total = np.zeros(width, dtype=np.int64)
        for n in nodes:
            total[: len(self.counts[n])] += self.counts[n]
        return [int(c) for c in total]

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Stop the server; the booster every site grew (checked equal), the bytes moved.

        The next round's server starts here, for a cohort of this one's size.
        """
        self._stop_server()
        with contextlib.suppress(FedadError):
            # A fixed port taken now is probed again, and reported, as the next round starts.
            self.upcoming = self._start(len(self.sampled))
        good = [m for m in replies if not m.has_error()]
        if not good:
            return None, None
        contents = [m.content for m in good]
        models = [cast(ArrayRecord, c["arrays"]).to_numpy_ndarrays() for c in contents]
        raw = models[0][0].tobytes()
        if any(m[0].tobytes() != raw for m in models[1:]):
            raise FedadError(
                f"Round {server_round}: the sites of the histogram session grew different "
                "boosters, so their settings differ (model.*, the class counts). Run every site "
                "from the same run config, then continue with resume=<its folder>."
            )
        cuts = next((m[1:3] for m in models if len(m) == 3), None)
        if cuts is not None:
            self.cuts = (cuts[0], cuts[1])
            # Every site counted the histograms of the session's trees alike.
            built = int(cast(float, contents[0]["metrics"][session.HISTOGRAMS]))
            sites = len(self.sampled)
            self._bytes = pinning.collective_bytes(sites, built, pinning.bins_of(cuts[0]))
        metrics = self.train_metrics_aggr_fn(contents, self.weighted_by_key)
        return ArrayRecord([models[0][0]]), metrics

    def history_fields(self) -> dict[str, Any]:
        """The bytes the last session's allreduces moved (once: then 0 until the next)."""
        moved, self._bytes = self._bytes, 0
        return {COLLECTIVE_BYTES: moved}

    def _start(self, world: int) -> AggregationServer:
        """A server for ``world`` sites on a probed port, starting up (not waited for)."""
        return AggregationServer(world, self.port, self.session_timeout, wait=False)

    def _stop_server(self) -> None:
        """Stop the round's server if one runs (its session is over)."""
        if self.server is not None:
            self.server.stop()
            self.server = None

    def close(self) -> None:
        """Stop the round's server and the next round's (when the run ends)."""
        self._stop_server()
        if self.upcoming is not None:
            self.upcoming.stop()
            self.upcoming = None
