"""Round bookkeeping around a Flower strategy: round numbers, sampling seeds, history rows."""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, cast

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedad.errors import FedadError
from fedad.federated import checkpoint
from fedad.federated.families.base import Family
from fedad.federated.grid import SiteGrid
from fedad.federated.stopping import BEST_ROUND, EarlyStopping, StopTraining
from fedad.federated.task import ASK_VALIDATION, POOLED, validation_metrics
from fedad.progress import clock

log = logging.getLogger(__name__)


class Rounds(Strategy):
    """A strategy wrapper: absolute round numbers, per-round sampling seeds, a minimum of replies.

    Flower's ``start`` counts rounds from 1. A run resumed after round ``done``
    hands ``done + round`` to the wrapped strategy, so that the clients (their
    seeds, the injected failures) and FedAdam's bias correction see the round
    numbers of an uninterrupted run; site sampling is seeded with the seed and
    that round for the same reason. A training round with fewer good replies
    than ``min_replies`` raises :class:`FedadError`. The aggregated client
    metrics of each round are kept for the history. A model ``family`` adds
    its entries to each evaluate config and hears what the sites' aggregated
    evaluation says (the autoencoder's threshold).

    Pooled counts: a metric of an evaluate reply whose key starts with
    :data:`~fedad.federated.task.POOLED` (``sum-``) is a count, and counts
    add up where averages do not. Such entries are summed over the round's
    good replies (numbers as numbers, lists elementwise), taken out of the
    replies before the strategy's weighted mean sees them (an average of
    counts means nothing, and they would otherwise appear as ``client_*``
    columns), kept in :attr:`pooled` by round and handed to the family's
    ``after_evaluate`` with the aggregated metrics, under their own keys. A
    site sends only counts there, never a row. Federated early stopping
    uses them (the validation slices' summed loss, rows and confusion
    matrix: :func:`~fedad.federated.task.validation_counts`); any other
    exact pooling (histograms of validation scores) needs only a ``sum-``
    key in the family's ``site_metrics`` and a reader in its ``after_evaluate``.

    Early stopping (``stopping``, when on): each evaluate config asks the
    sites for their validation counts; after a round's evaluation the rule
    (:class:`~fedad.federated.stopping.EarlyStopping`) takes the pooled
    metric and keeps that round's arrays if it improved; once it is
    exhausted, the next :meth:`configure_train` raises
    :class:`~fedad.federated.stopping.StopTraining`. Flower 1.42's
    ``Strategy.start`` has no stop hook, and fedad pins flwr < 1.43, whose
    ``should_stop`` would be one; an exception from the first step of a
    round ends ``start`` cleanly there, with every earlier round complete,
    evaluated and checkpointed, and leaves the ServerApp
    (:func:`~fedad.federated.server_app.run_server`) to finish with the
    best round's arrays.

    The privacy budget ends training the same way: under
    ``privacy.target_epsilon`` the wrapped
    :class:`~fedad.federated.privacy.Private` raises ``StopTraining`` from
    its ``configure_train`` when one more release would overspend it (the
    rule above is asked first, so a round both would end is the rule's).
    """

    def __init__(
        self,
        strategy: Strategy,
        done: int,
        seed: int,
        min_replies: int,
        family: Family | None = None,
        stopping: EarlyStopping | None = None,
    ) -> None:
        self.strategy = strategy
        self.family = family
        self.stopping = stopping if stopping is not None and stopping.on else None
        self.done = done
        self.seed = seed
        self.min_replies = min_replies
        self.sampled = 0
        self.train_metrics: dict[int, MetricRecord] = {}
        self.evaluate_metrics: dict[int, MetricRecord] = {}
        self.pooled: dict[int, dict[str, Any]] = {}
        # Per round, what early stopping adds to its history row: the pooled validation
        # metrics and the best round so far.
        self.validation: dict[int, dict[str, Any]] = {}
        self._evaluated: ArrayRecord | None = None
        # The arrays this round's training started from: what a reply leaves out stays so.
        self._sent: ArrayRecord | None = None

    def absolute(self, server_round: int) -> int:
        """Return the run's round number for Flower's ``server_round``."""
        return self.done + server_round

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> list[Message]:
        """Sample and configure this round's training, seeded by the absolute round.

        Raises
        ------
        StopTraining
            When early stopping decided, after the last round's evaluation,
            that training is over.
        """
        server_round = self.absolute(server_round)
        if self.stopping is not None and self.stopping.exhausted:
            raise StopTraining(f"early stopping before round {server_round}")
        random.seed(f"{self.seed}/train/{server_round}")
        self._sent = arrays
        messages = list(self.strategy.configure_train(server_round, arrays, config, grid))
        self.sampled = len(messages)
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Aggregate the training replies; refuse a round with too few good ones.

        Replies that carry some of the model's arrays only (the body, under
        ``personalize=fedper`` or ``fedrep``) are completed from the arrays
        the round sent before the strategy sees them
        (:func:`complete_replies`), so every strategy aggregates whole models;
        the arrays no reply carried stay the sent ones, bit for bit.
        """
        server_round = self.absolute(server_round)
        replies = list(replies)
        good = sum(not m.has_error() for m in replies)
        # FedXgbCyclic samples one site a round: its reply is all a round can have.
        if good < min(self.min_replies, self.sampled):
            raise FedadError(
                f"Round {server_round} got training replies from only {good} of the "
                f"{self.sampled} sampled sites, fewer than simulation.min_clients="
                f"{self.min_replies}; the failing sites and their reasons are logged above."
            )
        carried = complete_replies(replies, self._sent)
        arrays, metrics = self.strategy.aggregate_train(server_round, replies)
        if arrays is not None and carried is not None and self._sent is not None:
            arrays = keep_unsent(arrays, self._sent, carried)
        if metrics is not None:
            self.train_metrics[server_round] = metrics
        return arrays, metrics

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Sample and configure this round's client evaluation, seeded by the absolute round."""
        server_round = self.absolute(server_round)
        random.seed(f"{self.seed}/evaluate/{server_round}")
        if self.family is not None:
            config = ConfigRecord({**config, **self.family.evaluate_config()})
        if self.stopping is not None:
            config = ConfigRecord({**config, ASK_VALIDATION: True})
        # The arrays the sites evaluate: the model early stopping keeps if the round improves.
        self._evaluated = arrays
        return self.strategy.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """Pool the replies' counts, aggregate the rest, keep both for the history; decide.

        Early stopping decides here, once the round's pooled validation
        counts are in (see the class docstring).
        """
        server_round = self.absolute(server_round)
        replies = list(replies)
        pooled = pool_counts(replies)
        self.pooled[server_round] = pooled
        metrics = self.strategy.aggregate_evaluate(server_round, replies)
        if self.family is not None and (metrics is not None or pooled):
            self.family.after_evaluate({**(metrics or {}), **pooled})
        if metrics is not None:
            # Lists are per-bin counts (the autoencoder's): what the history keeps is scalars.
            scalars: dict[str, Any] = {k: v for k, v in metrics.items() if not isinstance(v, list)}
            self.evaluate_metrics[server_round] = MetricRecord(scalars)
        if self.stopping is not None:
            self._decide(server_round, validation_metrics(pooled))
        return metrics

    def _decide(self, server_round: int, values: dict[str, float]) -> None:
        """Let the rule take the round's pooled validation metric; record it for the history."""
        rule = cast(EarlyStopping, self.stopping)
        evaluated = self._evaluated
        rule.update(
            server_round,
            values[rule.column],
            lambda: evaluated.to_numpy_ndarrays() if evaluated is not None else [],
        )
        self.validation[server_round] = {**values, BEST_ROUND: rule.best_round}

    def summary(self) -> None:
        """Log the wrapped strategy's summary."""
        self.strategy.summary()


def complete_replies(replies: list[Message], sent: ArrayRecord | None) -> set[str] | None:
    """Fill in the arrays the good replies leave out from ``sent``; the keys they carried.

    A site that keeps part of the model (its head) replies with the rest, under
    the keys the arrays have in the model sent. The strategies, Flower's
    included, aggregate whole models, some against the arrays they sent
    (FedAdam's and FedAvgM's update), so each reply's ``arrays`` is made whole,
    in the sent order, in place: a left-out array's update is zero. The bytes
    were counted as the replies arrived (:class:`SiteGrid`), so what travelled.

    Returns
    -------
    set[str] or None
        The keys the replies carry; None unless they leave some of the sent
        arrays out (or nothing was sent to compare with).
    """
    if sent is None:
        return None
    good = [m for m in replies if not m.has_error() and "arrays" in m.content]
    if not good:
        return None
    carried = set(cast(ArrayRecord, good[0].content["arrays"]).keys())
    # Only a reply that leaves some of the sent arrays out is completed: one that carries
    # more (the histogram strategy's rank 0 adds the run's bin edges) is the strategy's own.
    if not carried < set(sent.keys()):
        return None
    for reply in good:
        own = cast(ArrayRecord, reply.content["arrays"])
        reply.content["arrays"] = ArrayRecord({k: (own if k in own else sent)[k] for k in sent})
    return carried


def keep_unsent(arrays: ArrayRecord, sent: ArrayRecord, carried: set[str]) -> ArrayRecord:
    """The aggregated ``arrays`` under the ``carried`` keys, the ``sent`` ones under the others.

    A mean of equal arrays may differ from them in the last bit; the arrays no
    reply carried are the server's own, kept as they were.
    """
    return ArrayRecord({k: (arrays if k in carried else sent)[k] for k in sent})


def pool_counts(replies: list[Message]) -> dict[str, Any]:
    """Sum the :data:`~fedad.federated.task.POOLED` metrics of the good replies; remove them.

    Parameters
    ----------
    replies : list[Message]
        A round's evaluate replies; their ``sum-`` entries are deleted in place,
        so that the strategy averages only the rest.

    Returns
    -------
    dict
        ``{key: sum}``: a number, or a list summed elementwise; empty when no
        good reply holds such a key.
    """
    pooled: dict[str, Any] = {}
    for reply in replies:
        if reply.has_error():
            continue
        for record in reply.content.metric_records.values():
            for key in [k for k in record if k.startswith(POOLED)]:
                value = record.pop(key)
                if isinstance(value, list):
                    total = pooled.get(key, [0] * len(value))
                    pooled[key] = [a + b for a, b in zip(total, value, strict=True)]
                else:
                    pooled[key] = pooled.get(key, 0) + value
    return pooled


class ServerEvaluator:
    """Flower ``evaluate_fn``: score the global model on the global test set each round.

    Also times the rounds, collects the failures the :class:`SiteGrid`
    counted and the client metrics :class:`Rounds` kept into one history row
    per round, keeps the latest global arrays, logs one line per round and
    hands the round's state to the :class:`~fedad.federated.checkpoint.Checkpointer`.
    ``history`` holds the rows of the rounds a resumed run already has.
    ``targets`` (the classes a targeted attack relabels as normal) adds each
    round's ``attack_success``; ``fields`` adds what it returns to each row
    (the privacy budget spent so far), and an ``epsilon`` there is logged.

    The test-set scoring of a round runs in a thread of its own while the
    next round's sites train: everything else the row holds is taken when
    Flower calls, the rows are appended in round order, and a round's
    checkpoint is written once its evaluation is done. :meth:`finish` waits
    for the last one.
    """

    def __init__(
        self,
        family: Family,
        X_test: np.ndarray,
        y_test: np.ndarray,
        num_rounds: int,
        grid: SiteGrid,
        rounds: Rounds,
        checkpointer: checkpoint.Checkpointer,
        history: list[dict],
        targets: list[int] | None = None,
        fields: Callable[[], dict] | None = None,
    ) -> None:
        self.family = family
        self.targets = targets
        self.fields = fields
        self.X_test, self.y_test = X_test, y_test
        self.num_rounds = num_rounds
        self.grid = grid
        self.rounds = rounds
        self.checkpointer = checkpointer
        self.rows: list[dict] = list(history)
        self.arrays: ArrayRecord | None = None
        self._last = time.perf_counter()
        self._started_at = time.time()
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fedad-evaluate")
        self._pending: list[Future] = []
        self._queued: int | None = None
        self._round_seconds: list[float] = []

    def __call__(self, server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        """Take the round's row, then score ``arrays`` on the test set in the background."""
        self.arrays = arrays
        server_round = self.rounds.absolute(server_round)
        done = self.rows[-1]["round"] if self.rows else None
        if server_round == done or (self._pending and server_round == self._queued):
            # Flower first evaluates the initial arrays: resumed, they are the
            # checkpoint's model, evaluated in its own round already.
            return None
        config = self.family.evaluate_config()
        if self.targets is not None:
            config = {**config, "attack-targets": self.targets}
        train_failures, eval_failures = self.grid.take_failures()
        now = time.perf_counter()
        seconds, self._last = now - self._last, now
        started_at, self._started_at = self._started_at, time.time()
        client: Mapping[str, Any] = self.rounds.evaluate_metrics.get(server_round, {})
        row = {
            "round": server_round,
            **self.rounds.train_metrics.get(server_round, {}),
            **{f"client_{k}": v for k, v in client.items()},
            **self.rounds.validation.get(server_round, {}),
            **self.family.history_fields(),
            **self.grid.take_payload(),
            **(self.fields() if self.fields else {}),
            "failures": train_failures,
            "eval_failures": eval_failures,
            "seconds": seconds,
            "started_at": started_at,
        }
        self._queued = server_round
        weights = arrays.to_numpy_ndarrays()
        # The rule and the strategy's state as this round left them: the next round's
        # aggregation may change both before this round's checkpoint is written.
        stopping = self.rounds.stopping.snapshot() if self.rounds.stopping else None
        state = checkpoint.strategy_state(self.checkpointer.strategy)
        self._pending.append(
            self._worker.submit(self._evaluate, row, weights, config, state, stopping)
        )
        return None

    def finish(self) -> None:
        """Wait for every round's evaluation; raise what one of them raised."""
        pending, self._pending = self._pending, []
        for future in pending:
            future.result()

    def close(self) -> None:
        """Wait for the evaluations, then end the evaluation thread."""
        try:
            self.finish()
        finally:
            self._worker.shutdown(wait=True)

    def _evaluate(
        self,
        row: dict,
        weights: list[np.ndarray],
        config: dict,
        state: dict,
        stopping: EarlyStopping | None = None,
    ) -> None:
        metrics = self.family.metrics(weights, self.X_test, self.y_test, config)
        # The metrics come first in the row, as they always have.
        row = {"round": row["round"], **metrics, **row}
        self.rows.append(row)
        if row["round"] > 0:  # round 0 scores the initial model: no training to time
            self._round_seconds.append(row["seconds"])
        left = self.num_rounds - row["round"]
        eta = np.mean(self._round_seconds) * left if self._round_seconds else None
        log.info(
            "round %d/%d  loss %.3f  macro-F1 %.3f  ROC-AUC %.3f  failures %d  %.1f s%s  ETA %s",
            row["round"],
            self.num_rounds,
            metrics["loss"],
            metrics["macro_f1"],
            metrics["roc_auc"],
            row["failures"],
            row["seconds"],
            "".join(
                f"  {name} {row[key]:.3g}"
                for key, name in (
                    ("val_loss", "val loss"),
                    ("val_macro_f1", "val macro-F1"),
                    ("attack_success", "attack success"),
                    ("epsilon", "ε"),
                )
                if key in row
            ),
            "?" if eta is None else clock(eta),
        )
        self.checkpointer.round_done(row["round"], weights, self.rows, stopping, state)
