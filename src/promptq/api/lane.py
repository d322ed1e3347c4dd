"""The chat lane: chat completion requests through the queue, without batches.

A batch costs a claim ticket, an aggregator job and a handful of keys: noise next to
bulk work, most of the cost of one interactive request. So ``POST
/v1/chat/completions`` goes through a lighter path (``shared.chatqueue``):

1. the handler's request becomes one entry of the chat queue (``promptq:{chat}:queue``);
   one submitter task pushes whatever arrived meanwhile in one round trip (once, even
   when redis-py sends it again), so groups grow with load and nothing waits for a timer;
2. a worker blocked on the queue with a free slot takes it (Redis wakes exactly one),
   before any batch work, and sends it with the same retries and cluster-wide rate
   limits as bulk requests;
3. the worker pushes the result line to this replica's reply list
   (``promptq:{chat}:replies:<replica id>``); one listener task moves answers into
   the replica's delivery list as it hands each line to its waiting handler, and
   deletes that list when idle: an answer is never lost to a dropped connection.

Every endpoint of the HTTP API's lane goes this way (chat completions, responses,
embeddings, completions, moderations, ``GET /v1/models``). A streamed request
(``open_stream``) gets its events through the same reply list, ahead of its final
answer (``worker.relay``); a client that leaves is told to the worker (``cancel``).

Nothing lives only in this process: if it dies, queued entries still run and their
answers expire with the reply list. An entry carries its handler's deadline, so
workers do not send requests whose handler already answered 504. See
``shared.chatqueue`` for every step.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from typing import Any

import orjson

from promptq.producer import Producer
from promptq.producer.parsing import parse_one
from promptq.shared.chatqueue import ChatEntry, ChatQueue, new_chat_id
from promptq.shared.connection import RedisHealth, is_redis_outage, redis_clock_offset
from promptq.shared.models import CHAT_ENDPOINT, QueuedRequest

logger = logging.getLogger(__name__)

#: at most this many requests per push
MAX_GROUP = 1000
#: the listener blocks this long for an answer, then asks again
LISTEN_BLOCK_S = 1.0
#: the delivery list is deleted after this many takes were handed out (or when idle)
DELIVERED_EVERY = 256
#: while streams run, at most this many more answer elements are taken per round trip
MORE_MAX = 256


class LaneClosed(Exception):
    """The API process is shutting down; the request was not answered."""


class ChatLane:
    """Queues chat requests and routes their answers back to the waiting handlers."""

    def __init__(self, producer: Producer) -> None:
        self._producer = producer
        self._queue = ChatQueue(producer.redis)
        self._health = RedisHealth()
        self._pushes = 0  # this replica's pushes so far (each push carries its number)
        #: this replica's id: workers push its answers to ``keys.chat_replies(id)``
        self.replica_id = new_chat_id()
        self._queued: list[tuple[ChatEntry, asyncio.Future[dict[str, Any]]]] = []
        self._waiting: dict[str, asyncio.Future[dict[str, Any]]] = {}
        #: streamed requests: their events and final answer, in order
        self._streams: dict[str, LaneStream] = {}
        self._arrived = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._closed = False
        #: Redis' clock minus this machine's: deadlines are on Redis' clock, which
        #: workers on other machines share (measured on the first request)
        self._clock_offset_s: float | None = None

    def validate(self, body: dict[str, Any], endpoint: str = CHAT_ENDPOINT) -> QueuedRequest:
        """The request as it will be queued; raises ``InputError`` if the body is invalid.
        (``stream`` is the lane's business, not the batch form's: it is kept.)"""
        stream = body.get("stream") is True
        checked = {k: v for k, v in body.items() if k != "stream"} if stream else body
        item = {"custom_id": "chat", "method": "POST", "url": endpoint, "body": checked}
        request, _endpoint = parse_one(item, default_model=self._producer.settings.model)
        if stream:
            request = QueuedRequest(
                custom_id=request.custom_id, body={**request.body, "stream": True}, line=1
            )
        return request

    async def send(
        self, request: QueuedRequest, *, timeout_s: float, endpoint: str = CHAT_ENDPOINT
    ) -> tuple[dict[str, Any], str]:
        """Queue ``request`` and wait for its result line; returns (line, request id).

        Raises ``TimeoutError`` after ``timeout_s`` (workers then drop the request if
        they have not started it), ``QueueFull`` (PROMPTQ_MAX_QUEUED), ``LaneClosed``,
        or the Redis error that kept it from being queued.
        """
        entry = await self._entry(request, timeout_s=timeout_s, endpoint=endpoint)
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._waiting[entry.id] = future
        self._queued.append((entry, future))
        self._arrived.set()
        try:
            async with asyncio.timeout(timeout_s):
                return await future, entry.id  # a timeout cancels it: it is not pushed
        finally:
            self._waiting.pop(entry.id, None)

    async def open_stream(
        self, request: QueuedRequest, *, timeout_s: float, endpoint: str
    ) -> LaneStream:
        """Queue a streamed request; read its events and final answer from the result."""
        entry = await self._entry(request, timeout_s=timeout_s, endpoint=endpoint)
        stream = LaneStream(self, entry.id, deadline=time.monotonic() + timeout_s)
        self._streams[entry.id] = stream
        # the stream's items come from the reply list; the future only says a failed push
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        future.add_done_callback(stream.push_done)
        self._queued.append((entry, future))
        self._arrived.set()
        return stream

    async def cancel(self, chat_id: str) -> None:
        """The client of a streamed request left: its worker stops the upstream request."""
        try:
            await self._queue.cancel(chat_id)
        except Exception as exc:  # Redis gone: the stream runs to its end, unread
            logger.warning("could not cancel stream %s: %s", chat_id, exc)

    async def _entry(self, request: QueuedRequest, *, timeout_s: float, endpoint: str) -> ChatEntry:
        if self._closed:
            raise LaneClosed("the server is shutting down")
        if self._clock_offset_s is None:
            self._clock_offset_s = await redis_clock_offset(self._producer.redis)
        if not self._tasks:
            self._tasks = [
                asyncio.create_task(self._submit_loop(), name="chat lane submitter"),
                asyncio.create_task(self._listen_loop(), name="chat lane listener"),
            ]
        return ChatEntry(
            id=new_chat_id(),
            body=request.body,
            replica=self.replica_id,
            deadline=round(time.time() + self._clock_offset_s + timeout_s, 3),
            endpoint=endpoint,
        )

    async def close(self) -> None:
        self._closed = True
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for future in self._waiting.values():
            if not future.done():
                future.set_exception(LaneClosed("the server is shutting down"))
        for stream in self._streams.values():
            stream.put({"closed": True})
        try:
            await self._queue.forget_replica(self.replica_id)
        except Exception as exc:  # Redis gone: the counter expires on its own
            logger.debug("could not drop this replica's chat keys: %s", exc)

    async def _submit_loop(self) -> None:
        while True:
            await self._arrived.wait()
            self._arrived.clear()
            while self._queued:
                group = [(e, f) for e, f in self._queued[:MAX_GROUP] if not f.done()]
                del self._queued[:MAX_GROUP]
                if group:
                    await self._push(group)

    async def _push(self, group: list[tuple[ChatEntry, asyncio.Future[dict[str, Any]]]]) -> None:
        try:
            await self._producer.check_backpressure(len(group))
            self._pushes += 1
            await self._queue.push(self.replica_id, self._pushes, [entry for entry, _f in group])
        except Exception as exc:  # queue full, Redis trouble: each handler answers it
            for _entry, future in group:
                if not future.done():
                    future.set_exception(exc)

    async def _listen_loop(self) -> None:
        delay = 0.1
        recovering = True  # read the delivery list first: answers may wait there
        moved = 0  # answers in the delivery list, all handed out
        while True:
            try:
                if recovering:
                    self._hand_out(await self._queue.undelivered(self.replica_id))
                    await self._queue.delivered(self.replica_id)
                    recovering, moved = False, 0
                lines: list[bytes] = []
                if self._streams:  # streams are busy: take all that waits in one go
                    lines = await self._queue.more_answers(self.replica_id, limit=MORE_MAX)
                if not lines:  # (and only block when nothing waits: one round trip each)
                    lines = await self._queue.wait_for_answers(
                        self.replica_id, block_s=LISTEN_BLOCK_S
                    )
                if not lines:  # idle: forget what was handed out
                    if moved:
                        await self._queue.delivered(self.replica_id)
                        moved = 0
                    continue
                self._hand_out(lines)
                moved += 1
                if moved >= DELIVERED_EVERY:
                    await self._queue.delivered(self.replica_id)
                    moved = 0
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # answers wait in Redis until it is back
                recovering = True  # whatever was moved before the failure is read again
                if is_redis_outage(exc):
                    self._health.failed(exc, doing="waiting for chat answers")
                else:
                    logger.warning("chat answers: %s; retrying in %.1fs", exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)
                continue
            if delay > 0.1:
                self._health.ok()
                delay = 0.1

    def forget_stream(self, chat_id: str) -> None:
        self._streams.pop(chat_id, None)

    def _hand_out(self, lines: list[bytes]) -> None:
        for raw in lines:
            try:
                line = orjson.loads(raw)
                future = self._waiting.get(line["custom_id"])
            except (orjson.JSONDecodeError, KeyError, TypeError) as exc:
                logger.error("dropped an unreadable chat answer: %s", exc)
                continue
            if future is not None and not future.done():
                future.set_result(line)
                continue
            stream = self._streams.get(line.get("custom_id", ""))
            if stream is not None:
                stream.put(line)
            # else: its handler timed out, the line was handed out before a dropped
            # connection, or the request ran twice (a worker presumed dead still
            # worked): the first answer won


class LaneStream:
    """One streamed request's items: ``{"event": text}`` while it streams, then its
    result line. Use ``async with``: on exit the lane forgets it.

    The lane's listener hands items over with :meth:`put` (no queue, no task switch
    until the handler waits); the handler reads the first with :meth:`next` and then
    everything that has arrived at once with :meth:`take`: one write per wake-up."""

    def __init__(self, lane: ChatLane, chat_id: str, *, deadline: float) -> None:
        self.lane = lane
        self.id = chat_id
        #: on ``time.monotonic()``'s clock
        self.deadline = deadline
        self._items: deque[dict[str, Any]] = deque()
        self._loop = asyncio.get_running_loop()
        self._waiter: asyncio.Future[None] | None = None

    async def __aenter__(self) -> LaneStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.lane.forget_stream(self.id)

    def put(self, item: dict[str, Any]) -> None:
        self._items.append(item)
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def push_done(self, future: asyncio.Future[dict[str, Any]]) -> None:
        """The queueing of the request failed (queue full, Redis trouble): ``next``
        raises the error."""
        if not future.cancelled() and future.exception() is not None:
            self.put({"push_error": future.exception()})

    def deadline_at(self) -> float:
        """The deadline on the event loop's clock (for ``asyncio.timeout_at``)."""
        return self._loop.time() + self.deadline - time.monotonic()

    async def next(self) -> dict[str, Any]:
        """The next item; ``TimeoutError`` past the deadline, the push's error if it
        failed, ``LaneClosed`` when the server shuts down."""
        if not self._items:
            remaining = self.deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError
            async with asyncio.timeout(remaining):
                await self._arrival()
        return self._checked(self._items.popleft())

    async def take(self) -> list[dict[str, Any]]:
        """Every item that has arrived, after waiting for one (no deadline of its own:
        the caller's ``asyncio.timeout_at(deadline_at())`` bounds the whole stream).
        Raises as ``next`` does when the first item waiting is an error."""
        await self._arrival()
        items = [self._checked(self._items.popleft())]
        while self._items and not self._is_error(self._items[0]):
            items.append(self._items.popleft())
        return items

    async def _arrival(self) -> None:
        while not self._items:
            self._waiter = self._loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None

    @staticmethod
    def _is_error(item: dict[str, Any]) -> bool:
        return "closed" in item or "push_error" in item

    @staticmethod
    def _checked(item: dict[str, Any]) -> dict[str, Any]:
        if item.get("closed"):
            raise LaneClosed("the server is shutting down")
        if "push_error" in item:
            raise item["push_error"]
        return item
