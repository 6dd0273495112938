"""Flower messages as a site receives them from the server, for tests of one app or mod."""

from __future__ import annotations

import time

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, Metadata, RecordDict


def server_message(arrays: list[np.ndarray], kind: str, config: dict, pid: int) -> Message:
    """A ``kind`` message (``MessageType.TRAIN``, ...) as site ``pid`` (node ``pid + 1``) gets it.

    Its content is the model ``arrays`` and the ``config``.
    """
    metadata = Metadata(
        run_id=1,
        message_id=f"{kind}-{pid}-{time.monotonic_ns()}",
        src_node_id=0,
        dst_node_id=pid + 1,
        reply_to_message_id="",
        group_id="1",
        created_at=time.time(),
        ttl=3600.0,
        message_type=kind,
    )
    content = {"arrays": ArrayRecord(arrays), "config": ConfigRecord(config)}
    return Message(metadata=metadata, content=RecordDict(content))
