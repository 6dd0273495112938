"""SiteGrid: Flower's Grid seen in partition order, with failed replies counted and logged."""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import Counter
from collections.abc import Iterable, Mapping
from itertools import islice
from typing import Any, cast

from flwr.app import Message, MessageType
from flwr.serverapp import Grid

log = logging.getLogger(__name__)

POLL_SECONDS = 0.1
# Replies are looked for every 5 ms, or 20 times as long as one look took if that is
# longer (1,000 replies pending, a network in between), up to POLL_SECONDS: a round ends
# soon after its last reply, and looking never takes more than 5 % of a core.
MIN_POLL_SECONDS = 0.005
POLL_COST_SHARE = 0.05
# Replies asked about per look: Flower's check costs as much per id asked as per reply,
# and a query to 10,000 sites spent most of its time asking about replies not yet due.
POLL_WINDOW = 256


# Payload counters, in bytes: model arrays and everything else (metrics, configs), each way.
PAYLOAD = ("bytes_down_arrays", "bytes_down_other", "bytes_up_arrays", "bytes_up_other")


def payload(message: Message) -> tuple[int, int]:
    """``(array bytes, other bytes)`` of a message's content, as its records count them.

    The records' own counts (``count_bytes``): array data and metric/config values
    plus their keys, without Flower's framing. An error reply carries none.
    """
    if message.has_error():
        return 0, 0
    content = message.content
    arrays = sum(r.count_bytes() for r in content.array_records.values())
    other = sum(r.count_bytes() for r in content.metric_records.values())
    other += sum(config_bytes(r) for r in content.config_records.values())
    return arrays, other


def config_bytes(record: Mapping[str, Any]) -> int:
    """The bytes of a ConfigRecord as ``ConfigRecord.count_bytes`` counts them, for any value.

    Flower's count (flwr 1.42) raises on an empty string or list, which SecAgg+'s records
    hold (a FitRes status message, an empty list of dropped sites); its masked vectors and
    key shares are lists of bytes, counted by their length as Flower counts them.
    """
    total = 0
    for key, value in record.items():
        values = value if isinstance(value, list) else [value]
        total += len(key) + sum(_value_bytes(v) for v in values)
    return total


def _value_bytes(value: Any) -> int:
    if isinstance(value, str | bytes):
        return len(value)
    # Booleans take a byte; ints and floats 64 bits, as Flower's protobuf holds them.
    return 1 if isinstance(value, bool) else 8


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
    the process instead of waiting out the round. The payload of every
    message sent and every reply received is counted (:data:`PAYLOAD`), for
    the round's history row. Everything else is delegated to the wrapped Grid.
    """

    def __init__(self, grid: Grid, stop: threading.Event | None = None) -> None:
        self._grid = grid
        self.stop = stop
        self.partition_of: dict[int, int] = {}
        self.failures: Counter[str] = Counter()
        self.payload: Counter[str] = Counter()

    def set_run(self, run) -> None:
        """Set the run on the wrapped Grid."""
        self._grid.set_run(run)

    @property
    def run(self):
        """The wrapped Grid's run."""
        return self._grid.run

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):
        """Create a message with the wrapped Grid."""
        return self._grid.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> list[int]:
        """Return the connected node ids, ordered by partition id."""
        return sorted(self._grid.get_node_ids(), key=self._order)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Push messages through the wrapped Grid; return their ids."""
        return self._grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        """Pull the replies that have arrived through the wrapped Grid."""
        return self._grid.pull_messages(message_ids)

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> list[Message]:
        """Send, wait ``timeout`` s at most, count and log failures, return replies by site."""
        messages = list(messages)
        # In push order, which is the order the engine hands them to the sites.
        pending = dict.fromkeys(self._grid.push_messages(messages))
        deadline = math.inf if timeout is None else time.monotonic() + timeout
        replies: list[Message] = []
        while True:
            self.check_stop()
            asked = time.monotonic()
            last = asked >= deadline
            # A look costs time in proportion to the ids asked about: the oldest few
            # suffice until the last look, which gathers every reply that came.
            ids = list(pending) if last else list(islice(pending, POLL_WINDOW))
            arrived = list(self._grid.pull_messages(ids))
            cost = time.monotonic() - asked
            replies += arrived
            for reply in arrived:
                pending.pop(reply.metadata.reply_to_message_id, None)
            if not pending or last:
                break
            time.sleep(min(POLL_SECONDS, max(MIN_POLL_SECONDS, cost / POLL_COST_SHARE)))
        replies.sort(key=lambda m: self._order(m.metadata.src_node_id))
        self._count_failures(messages, replies, timeout)
        for direction, batch in (("down", messages), ("up", replies)):
            for message in batch:
                arrays, other = payload(message)
                self.payload[f"bytes_{direction}_arrays"] += arrays
                self.payload[f"bytes_{direction}_other"] += other
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
            # An error reply carries its reason (Flower types it as optional).
            reason = (
                f"no reply within {timeout:g} s" if reply is None else cast(str, reply.error.reason)
            )
            config: Mapping[str, Any] = message.content.config_records.get("config") or {}
            step = f"round {config['server-round']} {kind}" if "server-round" in config else kind
            node = message.metadata.dst_node_id
            log.warning(
                "site %s failed (%s): %s",
                self.partition_of.get(node, f"at node {node}"),
                step,
                _said(reason),
            )

    def take_payload(self) -> dict[str, int]:
        """Return and reset the payload bytes counted so far, by :data:`PAYLOAD` key."""
        counts = {key: int(self.payload[key]) for key in PAYLOAD}
        self.payload.clear()
        return counts

    def take_failures(self) -> tuple[int, int]:
        """Return and reset the ``(train, evaluate)`` failures counted so far."""
        counts = (self.failures[MessageType.TRAIN], self.failures[MessageType.EVALUATE])
        self.failures.clear()
        return counts

    def _order(self, node_id: int) -> tuple[float, int]:
        return (self.partition_of.get(node_id, float("inf")), node_id)


def _said(reason: str) -> str:
    """One line of a failure's reason: a Python error's own, not Ray's wrapper around it.

    An actor's death comes with a page of Ray internals whose first line says it; an error
    raised in the ClientApp comes as a RayTaskError whose first line names only the actor,
    and whose last line is the error itself.
    """
    lines = [line.strip() for line in reason.strip().splitlines() if line.strip()]
    if not lines:
        return "no reason given"
    return (lines[-1] if "RayTaskError" in lines[0] else lines[0])[:300]
