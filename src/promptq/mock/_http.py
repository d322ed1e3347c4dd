"""The mock's HTTP layer: aiohttp behind a gate that counts and can ration connections.

``llama-server`` (cpp-httplib) gives each accepted connection one thread of a fixed pool
(``--threads-http``) from its first byte until it closes, idle keep-alive time included
(``Keep-Alive: timeout=5, max=100``); a connection beyond the pool waits, unread, until a
thread is free. A client that holds more keep-alive connections than there are threads
therefore stalls for up to the keep-alive timeout. :class:`ConnectionGate` reproduces
that in front of aiohttp's low-level :class:`aiohttp.web.Server` (a protocol factory for
``loop.create_server``): a :class:`GatedProtocol` hands its transport to aiohttp's
protocol only once the gate admits it, and frees its place when the connection closes.
Without a thread limit the gate only counts connections (``MockStats.connections``).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Callable

from promptq.mock._models import MockStats

__all__ = ["ConnectionGate", "GatedProtocol"]


class ConnectionGate:
    """At most ``threads`` connections served at once (None: no limit), FIFO after that."""

    def __init__(self, threads: int | None, stats: MockStats) -> None:
        self.threads = threads
        self.stats = stats
        self.serving = 0
        self.waiting: deque[GatedProtocol] = deque()

    def arrive(self, protocol: GatedProtocol) -> None:
        stats = self.stats
        stats.connections += 1
        stats.max_connections = max(stats.max_connections, stats.connections)
        if self.threads is None or self.serving < self.threads:
            self.serving += 1
            protocol.admit()
        else:
            stats.connections_waited += 1
            protocol.waiting_since = time.monotonic()
            self.waiting.append(protocol)

    def leave(self, protocol: GatedProtocol) -> None:
        self.stats.connections -= 1
        if not protocol.admitted:
            with contextlib.suppress(ValueError):
                self.waiting.remove(protocol)
            return
        self.serving -= 1
        while self.waiting and (self.threads is None or self.serving < self.threads):
            nxt = self.waiting.popleft()
            self.stats.connection_wait_s += time.monotonic() - nxt.waiting_since
            self.serving += 1
            nxt.admit()

    def close_waiting(self) -> None:
        """Shutdown: close the connections no thread has picked up."""
        for protocol in list(self.waiting):
            if protocol.transport is not None:
                protocol.transport.close()


class GatedProtocol(asyncio.Protocol):
    """Holds a connection unread until the gate admits it, then is aiohttp's protocol."""

    def __init__(self, gate: ConnectionGate, factory: Callable[[], asyncio.Protocol]) -> None:
        self._gate = gate
        self._factory = factory
        self._inner: asyncio.Protocol | None = None
        self.transport: asyncio.Transport | None = None
        self.admitted = False
        self.waiting_since = 0.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        transport.pause_reading()
        self._gate.arrive(self)

    def admit(self) -> None:
        transport = self.transport
        assert transport is not None
        self.admitted = True
        if transport.is_closing():
            return
        self._inner = self._factory()
        self._inner.connection_made(transport)
        transport.resume_reading()

    def data_received(self, data: bytes) -> None:
        if self._inner is not None:
            self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        if self._inner is not None:
            return self._inner.eof_received()
        return None

    def pause_writing(self) -> None:
        if self._inner is not None:
            self._inner.pause_writing()

    def resume_writing(self) -> None:
        if self._inner is not None:
            self._inner.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._inner is not None:
            self._inner.connection_lost(exc)
        self._gate.leave(self)
