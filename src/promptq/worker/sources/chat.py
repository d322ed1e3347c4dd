"""The chat lane: ``POST /v1/chat/completions`` requests, without batches.

Whenever the worker has a free slot, it blocks on the chat queue (``BLMOVE`` into its
own list, ``shared.chatqueue``): Redis wakes exactly one worker per request, so nobody
polls and no woken worker comes back empty. Having one, it takes any others already
waiting without blocking. Chat goes ahead of batch work: batch claims wait until an
eighth of the slots is free, the chat lane takes the first slot that frees (and a
request that arrives while every slot is busy runs as soon as a send slot frees).

A request whose deadline has passed is dropped unsent (its handler answered 504); an
entry promptq cannot read is dropped with an error line. Answers are written in one
script per flush, chat answers before batch results (a handler waits for each).

What this worker holds (running, or answer not yet written) is ``held``; what it owns
is its list in Redis. Owned minus held is stranded (a take whose reply was lost) and
goes back to the front of the queue (``recheck``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Collection

from redis.exceptions import ResponseError

from promptq.shared import serialization
from promptq.shared.chatqueue import Answer, BadChatEntry, ChatEntry, ChatQueue
from promptq.shared.connection import RedisHealth, is_redis_outage
from promptq.shared.errors import UpstreamError
from promptq.shared.prices import PriceTable, Spend
from promptq.shared.results import Outcome, internal_error, result_line
from promptq.shared.sse import STREAMING_ENDPOINTS
from promptq.shared.stats import usage_tokens
from promptq.worker.dispatcher import Dispatcher
from promptq.worker.relay import RelayHub
from promptq.worker.sources import Job

logger = logging.getLogger(__name__)

#: at most this many chat requests per non-blocking take (bounds one script call)
TAKE_MAX = 500
#: a failed take is tried again after this long, doubling up to TAKE_RETRY_MAX_S
TAKE_RETRY_S = 0.05
TAKE_RETRY_MAX_S = 1.0


class ChatSource:
    """The chat lane of one worker (see the module docstring)."""

    name = "chat"

    def __init__(
        self,
        queue: ChatQueue,
        *,
        worker_id: str,
        health: RedisHealth,
        block_s: float,
        clock_offset_s: float = 0.0,
        cache_ttl_s: int | None = None,
        prices: PriceTable | None = None,
        spend: Spend | None = None,
    ) -> None:
        self.queue = queue
        self.prices = prices or PriceTable.load()
        self.spend = spend or Spend()
        self.worker_id = worker_id
        self.health = health
        self.block_s = block_s
        self.cache_ttl_s = cache_ttl_s
        #: Redis' clock minus this machine's (deadlines are on Redis' clock)
        self.clock_offset_s = clock_offset_s
        #: queue entries running here or whose answer is not yet written
        self.held: set[bytes] = set()
        self._answers: list[Answer] = []
        #: writes the events of this worker's streamed requests
        self.streams = RelayHub(queue)
        # held by each take; a recheck takes it too, so that no take is on the wire
        # while it compares what is owned with what is held
        self._lock = asyncio.Lock()

    # -- taking --------------------------------------------------------------------------

    async def feed(self, dispatcher: Dispatcher) -> None:
        slots = dispatcher.slots
        delay = TAKE_RETRY_S
        more = False  # the last take filled the room: more may be waiting
        while True:
            await slots.wait_until(lambda: dispatcher.closing or slots.free > 0)
            if dispatcher.closing:
                return
            try:
                async with self._lock:
                    if not more:
                        first = await self.queue.take(self.worker_id, block_s=self.block_s)
                        if first is None:
                            continue
                        self._start(dispatcher, first)
                    want = min(slots.free, TAKE_MAX)
                    entries = await self.queue.take_more(self.worker_id, want)
                    for raw in entries:
                        self._start(dispatcher, raw)
                    more = want > 0 and len(entries) == want
            except Exception as exc:  # Redis trouble: the next round tries again
                more = False
                if is_redis_outage(exc):
                    self.health.failed(exc, doing="taking chat requests")
                else:
                    logger.warning("could not take chat requests: %s", exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, TAKE_RETRY_MAX_S)
                continue
            delay = TAKE_RETRY_S

    def _start(self, dispatcher: Dispatcher, raw: bytes) -> None:
        try:
            entry = ChatEntry.decode(raw)
        except BadChatEntry as exc:
            logger.error("dropped a chat request: %s", exc)
            self._forget(raw)
            dispatcher.schedule_flush()
            return
        if entry.deadline < time.time() + self.clock_offset_s:  # its handler gave up (504)
            self._forget(raw)
            dispatcher.schedule_flush()
            return
        self.held.add(raw)
        relay = None
        if entry.streamed and entry.endpoint in STREAMING_ENDPOINTS:
            relay = self.streams.open(entry.id, entry.replica)
        dispatcher.start(
            Job(self, entry.id, "", entry.endpoint, entry.body, extra=(raw, entry),
                cache_ttl_s=None if relay else self.cache_ttl_s, relay=relay)
        )  # fmt: skip

    def _forget(self, raw: bytes) -> None:
        """Drop an entry from this worker's list without answering it."""
        self.held.add(raw)
        self._answers.append(Answer(raw, "", b""))

    # -- answering -----------------------------------------------------------------------

    def finished(self, job: Job, outcome: Outcome) -> None:
        raw, entry = job.extra
        if outcome.ok:
            cost = None
            tokens = usage_tokens(outcome.body)
            if not outcome.cached:
                cost = self.prices.cost_of(
                    outcome.body, job.body.get("model"), batch=False, tokens=tokens
                )
            self.spend.add(cost, cached=outcome.cached, tokens=tokens)
        try:
            line = serialization.dumps(result_line(entry.id, outcome))
        except Exception as exc:  # e.g. an answer orjson cannot encode: still answer
            logger.exception("chat request %s: could not encode its answer", entry.id)
            line = serialization.dumps(result_line(entry.id, internal_error(exc)))
        self._answers.append(Answer(raw, entry.replica, line))

    @property
    def unwritten(self) -> bool:
        return bool(self._answers)

    async def flush(self) -> bool:
        answers, self._answers = self._answers, []
        try:
            await self.queue.reply(self.worker_id, answers)
        except ResponseError as exc:
            if "WRONGTYPE" not in str(exc):
                self._answers[:0] = answers
                raise
            # a key of another type where a reply list should be: retrying cannot help,
            # so forget these answers rather than hold up every other result
            logger.error("dropped %d chat answer(s): %s", len(answers), exc)
            self._answers[:0] = [Answer(a.entry, "", b"") for a in answers]
            return False
        except BaseException:
            self._answers[:0] = answers  # kept: tried again
            raise
        self.held.difference_update(a.entry for a in answers)
        return True

    # -- recovery ------------------------------------------------------------------------

    async def hand_back(self, jobs: Collection[Job]) -> int:
        # a stream that has begun cannot start over elsewhere (its client has half of
        # it): it ends with an error event; the rest go back to the queue
        begun = [job for job in jobs if job.relay is not None and job.relay.started]
        if begun:
            await self.queue.reply(
                self.worker_id,
                [_stream_lost(job.extra[0], job.extra[1], "stopped") for job in begun],
            )
        entries = [job.extra[0] for job in jobs if job not in begun]
        n = await self.queue.requeue(self.worker_id, entries) if entries else 0
        self.held.difference_update(job.extra[0] for job in jobs)
        return n + len(begun)

    async def recheck(self, running: Collection[Job]) -> bool:
        async with self._lock:  # no take on the wire now
            owned = await self.queue.owned(self.worker_id)
            stranded = [raw for raw in owned if raw not in self.held]
            if stranded:
                n = await self.queue.requeue(self.worker_id, stranded)
                logger.warning(
                    "handed back %d chat request(s) taken while Redis was unreachable", n
                )
        return True

    async def reap(self, dead_worker_id: str) -> int:
        # its streams may have begun: each ends with an error event rather than run twice
        lost = []
        for raw in await self.queue.owned(dead_worker_id):
            try:
                entry = ChatEntry.decode(raw)
            except BadChatEntry:
                continue
            if entry.streamed:
                lost.append(_stream_lost(raw, entry, "died"))
        if lost:
            await self.queue.reply(dead_worker_id, lost)
            logger.warning(
                "worker %s died: %d stream(s) it ran ended with an error", dead_worker_id, len(lost)
            )
        n = await self.queue.requeue(dead_worker_id)
        if n:
            logger.warning("worker %s died: handed %d chat request(s) back", dead_worker_id, n)
        return n

    async def release_all(self) -> int:
        return await self.queue.requeue(self.worker_id)


def _stream_lost(raw: bytes, entry: ChatEntry, how: str) -> Answer:
    """The answer for a stream whose worker stopped or died midway."""
    error = UpstreamError(
        f"the worker streaming this answer {how} midway; send the request again",
        code="worker_lost",
    )
    outcome = Outcome(
        status_code=None, body=None, request_id=None, error=error, attempts=1, latency_ms=0.0
    )
    return Answer(raw, entry.replica, serialization.dumps(result_line(entry.id, outcome)))
