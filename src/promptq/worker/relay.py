"""The streaming sink: streamed answers' events, relayed to the API as they come.

A chat-lane request with ``"stream": true`` runs like any other (slots, limits, retries)
but its attempt hands each Server-Sent Event to its :class:`StreamRelay` as the upstream
produces it. One :class:`RelayHub` per worker writes the events of all its streams: to
each waiting API replica's reply list (``shared.chatqueue``: the list its final answers
use too, so they arrive in order and the final answer comes last), one element and one
script call per replica per write. While a write is on the wire the next events of
every stream wait and go together: a hundred streams cost a few round trips per tick,
not one per event, and a lone stream adds no delay.

* Retries happen only before the first event: once one has been relayed, a failure ends
  the stream with an error event (the API writes it) instead of starting over.
* A client that disconnects: the API sets ``keys.chat_cancel(id)``; every write checks
  the keys of the streams it carries, and twice a second the hub asks about the streams
  that had nothing to write, so the upstream request is stopped within a second either
  way (:meth:`StreamRelay.watching` cancels the attempt reading it).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator

import orjson

from promptq.shared.chatqueue import ChatQueue
from promptq.shared.sse import StreamSummary

logger = logging.getLogger(__name__)

#: streams silent for this long are asked about (has their client gone?)
CANCEL_CHECK_S = 0.5
#: a failed write is tried again after this long, doubling up to a second
RETRY_S = 0.05


class RelayHub:
    """Writes the events of every stream this worker runs (see the module docstring)."""

    def __init__(self, queue: ChatQueue) -> None:
        self.queue = queue
        self.relays: dict[str, StreamRelay] = {}
        self._pending: dict[str, list[tuple[StreamRelay, bytes]]] = {}
        self._writer: asyncio.Task[None] | None = None
        self._watcher: asyncio.Task[None] | None = None

    def open(self, chat_id: str, replica: str) -> StreamRelay:
        relay = StreamRelay(self, chat_id=chat_id, replica=replica)
        self.relays[chat_id] = relay
        if self._watcher is None or self._watcher.done():
            self._watcher = asyncio.create_task(self._watch(), name="stream cancel checks")
        return relay

    def close(self, relay: StreamRelay) -> None:
        self.relays.pop(relay.chat_id, None)

    def push(self, relay: StreamRelay, line: bytes) -> None:
        self._pending.setdefault(relay.replica, []).append((relay, line))
        relay.unwritten += 1
        relay.flushed.clear()
        if self._writer is None or self._writer.done():
            self._writer = asyncio.create_task(self._write(), name="stream relay")

    async def _write(self) -> None:
        delay = RETRY_S
        while self._pending:
            batches, self._pending = self._pending, {}
            for replica, batch in batches.items():
                live = [(r, line) for r, line in batch if not r.cancelled]
                gone: list[str] = []
                if live:
                    ids = list(dict.fromkeys(r.chat_id for r, _ in live))
                    try:
                        gone = await self.queue.relay(replica, ids, [line for _, line in live])
                    except Exception as exc:  # Redis trouble: keep the events, in order
                        logger.warning("could not relay stream events (%s); retrying", exc)
                        self._pending.setdefault(replica, [])[:0] = batch
                        await asyncio.sleep(delay)
                        delay = min(delay * 2, 1.0)
                        continue
                    delay = RETRY_S
                now = time.monotonic()
                for r, _ in batch:
                    r.last_write = now
                    r.unwritten -= 1
                    if not r.unwritten:
                        r.flushed.set()
                self._cancel(gone)

    def _cancel(self, chat_ids: list[str]) -> None:
        for chat_id in chat_ids:
            relay = self.relays.get(chat_id)
            if relay is not None:
                relay.cancel()

    async def _watch(self) -> None:
        while self.relays:
            await asyncio.sleep(CANCEL_CHECK_S)
            now = time.monotonic()
            silent: dict[str, list[str]] = {}
            for relay in list(self.relays.values()):
                if not relay.cancelled and now - relay.last_write >= CANCEL_CHECK_S:
                    silent.setdefault(relay.replica, []).append(relay.chat_id)
            for replica, ids in silent.items():
                try:
                    self._cancel(await self.queue.relay(replica, ids, []))
                except Exception as exc:
                    logger.debug("stream cancel check failed: %s", exc)


class StreamRelay:
    """One stream's side of the hub: what the attempt reading the upstream talks to."""

    def __init__(self, hub: RelayHub, *, chat_id: str, replica: str) -> None:
        self.hub = hub
        self.chat_id = chat_id
        self.replica = replica
        #: an event has been handed over: no retry from now on
        self.started = False
        #: the client has gone: stop the upstream request
        self.cancelled = False
        self.summary = StreamSummary()
        self.last_write = time.monotonic()
        #: events handed over and not yet in Redis (``flushed`` is set when none)
        self.unwritten = 0
        self.flushed = asyncio.Event()
        self.flushed.set()
        self._watched: asyncio.Task[object] | None = None

    def __repr__(self) -> str:
        return f"StreamRelay({self.chat_id}, events={self.summary.events})"

    def send(self, event: str) -> bool:
        """Relay one event (its text without the blank line that ends it); False once the
        client has gone (the caller stops reading the upstream)."""
        if self.cancelled:
            return False
        self.started = True
        self.summary.add(event)
        self.hub.push(self, orjson.dumps({"custom_id": self.chat_id, "event": event}))
        return True

    def cancel(self) -> None:
        self.cancelled = True
        if self._watched is not None and not self._watched.done():
            self._watched.cancel()

    async def drain(self) -> None:
        """Wait until every event handed over is in Redis (before the final answer), and
        leave the hub."""
        try:
            await self.flushed.wait()
        finally:
            self.hub.close(self)

    @contextlib.asynccontextmanager
    async def watching(self, task: asyncio.Task[object]) -> AsyncIterator[None]:
        """While inside, ``task`` (the attempt reading the upstream) is cancelled when the
        client goes away, even if the upstream sends nothing for a while."""
        self._watched = task
        try:
            yield
        finally:
            self._watched = None
