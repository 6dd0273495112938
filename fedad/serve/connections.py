"""uvicorn's HTTP protocol behind a guard: connections that hold a place and send nothing close."""

from __future__ import annotations

import asyncio
from typing import Any

from fedad.serve.requests import Limits


class Guarded(asyncio.Protocol):
    """One connection: uvicorn's own protocol inside, with a deadline and a place in line.

    uvicorn (0.49) times out only kept-alive connections between requests: one that
    sends half a request head is held for ever, its head may grow without bound
    (httptools), and its ``limit_concurrency`` counts such connections, answering 503 to
    everyone once they fill it. Here a connection must send a complete head within
    ``head_timeout`` s of connecting or of the end of its last request (up to twice that
    between kept-alive requests), a head is at most ``max_head_bytes``, and past
    ``max_connections`` open ones the oldest connection with no request in progress is
    closed, so a new client is always heard. ``limits`` is set per worker process.
    """

    limits = Limits()
    # Every open connection of this process, oldest first.
    opened: dict[Guarded, None] = {}

    def __init__(self, **kwargs: Any) -> None:
        self.inner: Any = http_protocol()(**kwargs)
        self.loop = asyncio.get_running_loop()
        self.transport: Any = None
        self.timer: asyncio.TimerHandle | None = None
        self.seen: object = None
        self.head_bytes = 0

    def idle(self) -> bool:
        """No request in progress: none yet, or the last one answered."""
        cycle = self.inner.cycle
        return cycle is None or cycle.response_complete

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Start the head's deadline; past the limit, close the oldest idle connection."""
        self.transport = transport
        self.inner.connection_made(transport)
        Guarded.opened[self] = None
        self.tick(first=True)
        if len(Guarded.opened) > self.limits.max_connections:
            oldest = next((c for c in Guarded.opened if c.idle() and c is not self), self)
            oldest.transport.close()

    def data_received(self, data: bytes) -> None:
        """Hand ``data`` on; close a connection whose unfinished head passes the limit."""
        self.inner.data_received(data)
        self.head_bytes = self.head_bytes + len(data) if self.idle() else 0
        if self.head_bytes > self.limits.max_head_bytes:
            self.transport.close()

    def tick(self, first: bool = False) -> None:
        """Close the connection if no request started since the last tick and none runs."""
        if not first and self.idle() and self.inner.cycle is self.seen:
            self.transport.close()
            return
        self.seen = self.inner.cycle
        self.timer = self.loop.call_later(self.limits.head_timeout, self.tick)

    def connection_lost(self, exc: Exception | None) -> None:
        """Forget the connection."""
        Guarded.opened.pop(self, None)
        if self.timer is not None:
            self.timer.cancel()
        self.inner.connection_lost(exc)

    def eof_received(self) -> bool | None:
        """As uvicorn's protocol."""
        return self.inner.eof_received()

    def pause_writing(self) -> None:
        """As uvicorn's protocol."""
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        """As uvicorn's protocol."""
        self.inner.resume_writing()


def http_protocol() -> type:
    """The HTTP protocol of uvicorn that runs inside: httptools' when installed, else h11's."""
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

        return HttpToolsProtocol
    except ImportError:
        from uvicorn.protocols.http.h11_impl import H11Protocol

        return H11Protocol
