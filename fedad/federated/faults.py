"""Failures injected at sites (simulation.client_failure_rate): which sites fail, and how."""

from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import cast

import numpy as np
from flwr.app import ConfigRecord, Context, Error, Message
from flwr.common.constant import ErrorCode

from fedad import rundir
from fedad.config import Settings
from fedad.federated import shards

# How a site made to fail by `simulation.client_failure_rate` fails its training:
# an error reply, no reply until past `simulation.round_timeout`, or its process dies.
FAILURE_MODES = ("error", "hang", "crash")
# How far past the round's timeout a hanging site replies.
HANG_MARGIN_SECONDS = 2.0


def injected_failure(
    seed: int, server_round: int, partition_id: int, num_partitions: int, rate: float
) -> bool:
    """Whether the site fails in this round under ``simulation.client_failure_rate``.

    Each round, ``floor(rate * num_partitions)`` sites, drawn from the seed and
    the round, are down (for that round's training and evaluation), so the
    outcome is the same in every run and independent of which sites were
    sampled. A rate below 1 always leaves at least one site up. How a down
    site fails its training is ``simulation.failure_mode`` (:data:`FAILURE_MODES`);
    its evaluation always gets an error reply.
    """
    n_down = math.floor(rate * num_partitions)
    if n_down == 0:
        return False
    down = np.random.default_rng((seed, server_round)).permutation(num_partitions)[:n_down]
    return partition_id in down


def fails(settings: Settings, context: Context, config: ConfigRecord) -> bool:
    """Whether this site is made to fail in the message's round (see :func:`injected_failure`)."""
    return injected_failure(
        int(settings["seed"]),
        int(cast(int, config["server-round"])),
        int(context.node_config["partition-id"]),
        int(context.node_config["num-partitions"]),
        float(settings.get("simulation.client_failure_rate", 0.0)),
    )


def act_out_failure(settings: Settings, partition_id: int, server_round: int) -> str:
    """Hang past the round timeout or kill this process, per ``simulation.failure_mode``.

    Returns what to add to the error reply's reason.
    """
    mode = settings.get("simulation.failure_mode", "error")
    if mode == "hang":
        # The late reply finds the server in a later step; it is dropped there.
        time.sleep(float(settings["simulation.round_timeout"]) + HANG_MARGIN_SECONDS)
    elif mode == "crash":
        # Ray restarts the actor and runs the message again: the second time it
        # gets the error reply, so the site counts as failed once, and the crash
        # is not repeated until Ray gives up.
        name = f"crashed_round_{server_round:05d}_{shards.site_reader(partition_id)}"
        marker = Path(cast(str, settings["run-dir"]), rundir.SHARD_DIR, name)
        if not marker.exists():
            marker.touch()
            os._exit(1)
        return " (its process was killed, then restarted)"
    return ""


def failure_reply(msg: Message, partition_id: int, server_round: int, detail: str = "") -> Message:
    """The error reply of a site made to fail, as Flower makes for a ClientApp that raised."""
    # An error reply is what Flower gets from a ClientApp that raised; replying
    # with it directly avoids a logged traceback per injected failure.
    reason = f"injected failure: site {partition_id} is down in round {server_round}{detail}"
    return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason), reply_to=msg)
