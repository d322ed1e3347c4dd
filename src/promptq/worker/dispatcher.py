"""The per-process engine behind the arq jobs.

Work moves in *claims*, not one arq job per prompt: a batch's requests wait in a Redis
list, and a ``claim`` arq job (a "ticket") takes as many of them as this process has
free slots, in one Lua call. Each ticket that leaves work behind enqueues one successor,
so a batch keeps a few tickets circulating until its list is empty, and whichever worker
frees slots first takes the next one: load balances per request, workers that start
mid-batch join in, and a worker never holds more requests than it can send.

Results are buffered and written in groups (one Lua call per batch per flush): while one
flush is on the wire the next group fills, so a busy worker makes few round trips and
an idle one adds no delay.

Chat requests (``POST /v1/chat/completions``, see ``shared.chatqueue``) skip batches
and tickets: a worker takes them from the chat queue itself, whenever a slot is free
and before any batch work, when told over pub/sub that some are waiting (and every
poll interval, in case a message was missed). Answers go straight back to the waiting
API replica.

Recovery: every claimed request is marked with the claiming worker's id in the batch's
``:inflight`` hash, and each worker lists the batches it claimed from. A worker whose
heartbeat key has expired is dead; the next live worker's heartbeat loop puts its
unfinished requests back at the front of their batches' queues. Results are recorded
with HSETNX, so a request that a stalled (not dead) worker also finishes counts once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from arq.connections import ArqRedis
from redis.exceptions import ResponseError

from promptq.shared import keys, serialization
from promptq.shared.chatqueue import BadChatEntry, ChatEntry
from promptq.shared.connection import (
    REDIS_DOWN,
    is_redis_outage,
    redis_clock_offset,
    redis_health,
)
from promptq.shared.errors import UpstreamError
from promptq.shared.lifecycle import (
    CANCELLED_CODE,
    CANCELLED_MESSAGE,
    enqueue_aggregate,
    enqueue_ticket,
    stop_batch,
)
from promptq.shared.models import CHAT_ENDPOINT, QueuedRequest
from promptq.shared.scripts import Scripts, decode
from promptq.worker.fetch import Fetcher, Outcome

logger = logging.getLogger(__name__)

#: upstream answers that every other request of the batch would get too: stop the batch
#: instead of spending every attempt of every request on them
STOP_BATCH_CODES = frozenset(
    {"insufficient_quota", "invalid_api_key", "billing_hard_limit_reached"}
)
STOP_BATCH_STATUSES = frozenset({401, 403})
#: adaptive concurrency: at most one multiplicative decrease per this many seconds
AIMD_DECREASE_GAP_S = 1.0
AIMD_DECREASE_FACTOR = 0.7
#: at most this many chat requests per claim (bounds one script call)
CHAT_CLAIM_MAX = 500
#: a chat reply list lives this long after its last answer (its replica reads it at once;
#: a replica that died leaves it to expire)
CHAT_REPLY_TTL_S = 600


def new_worker_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


@dataclass(slots=True)
class _Pending:
    """Results waiting for the next flush, per batch."""

    args: list[Any] = field(default_factory=list)  # 4 script arguments per result

    @property
    def count(self) -> int:
        return len(self.args) // 4


class Dispatcher:
    """Claims, runs and records requests for one worker process."""

    def __init__(
        self,
        *,
        redis: ArqRedis,
        fetcher: Fetcher,
        concurrency: int,
        worker_id: str | None = None,
        heartbeat_s: float = 2.0,
        upstream_label: str = "",
        adaptive: bool = False,
        chat_poll_s: float = 0.5,
    ) -> None:
        self.redis = redis
        self.fetcher = fetcher
        self.concurrency = concurrency
        self.worker_id = worker_id or new_worker_id()
        self.heartbeat_s = heartbeat_s
        self.upstream_label = upstream_label
        self.scripts = Scripts(redis)
        # Adaptive concurrency (AIMD, opt-in): the claim limit starts small, doubles per
        # round of successes until the first 429/timeout, then grows by one per round and
        # shrinks by 30% (at most once a second) on 429s and timeouts.
        self.adaptive = adaptive
        self.limit = float(min(concurrency, 4) if adaptive else concurrency)
        self._slow_start = adaptive
        self._last_decrease = 0.0
        if adaptive:
            fetcher.on_attempt = self._adapt
        self.claimed = 0
        self.done = 0
        self.failed = 0
        self.retries = 0
        self.started_at = time.time()
        #: called when free slots cross the low-water mark (the worker polls again)
        self.on_capacity: Callable[[], None] | None = None
        self._tasks: dict[asyncio.Task[None], tuple[str, str]] = {}
        self._buffer: dict[str, _Pending] = {}
        self._flush_task: asyncio.Task[None] | None = None
        self._flushed = asyncio.Event()
        self._flushed.set()
        self._heartbeat_task: asyncio.Task[None] | None = None
        self._closing = False
        self._batches_seen: set[str] = set()
        self._stopped: set[str] = set()
        self._latency_counts: Counter[str] = Counter()
        self._latency_sum_ms = 0.0
        # the chat lane
        self.chat_poll_s = chat_poll_s
        #: set to make the chat loop try the chat queue now
        self.chat_wanted = asyncio.Event()
        #: chat requests may be waiting (a claim came back full, or a wake-up came while
        #: every slot was busy): each slot that frees tries the chat queue first
        self.chat_backlog = False
        self._chat_tasks: dict[asyncio.Task[None], str] = {}
        self._chat_replies: list[tuple[str, str, bytes]] = []  # (id, replica, line)
        self._chat_loop_task: asyncio.Task[None] | None = None
        #: Redis' clock minus this machine's (chat deadlines are on Redis' clock)
        self.clock_offset_s = 0.0

    # -- capacity -------------------------------------------------------------------

    @property
    def free(self) -> int:
        return max(0, int(self.limit) - self.claimed)

    @property
    def low_water(self) -> int:
        # Claim in groups: waiting until an eighth of the slots are free keeps the number
        # of claim round trips per request low when the worker is saturated.
        return max(1, int(self.limit) // 8)

    def _adapt(self, error: UpstreamError | None) -> None:
        if error is None:
            step = 1.0 if self._slow_start else 1.0 / self.limit
            self.limit = min(float(self.concurrency), self.limit + step)
            return
        overloaded = (error.status_code == 429 and error.retryable) or error.code == "timeout"
        now = time.monotonic()
        if overloaded and now - self._last_decrease >= AIMD_DECREASE_GAP_S:
            self._slow_start = False
            self._last_decrease = now
            self.limit = max(1.0, self.limit * AIMD_DECREASE_FACTOR)
            logger.info("adaptive concurrency: %s, limit now %d", error.code, int(self.limit))

    def can_take_work(self) -> bool:
        return not self._closing and (self.claimed == 0 or self.free >= self.low_water)

    @property
    def idle(self) -> bool:
        # _flushed is set only while nothing waits to be written
        return not self._tasks and not self._chat_tasks and self._flushed.is_set()

    def chat_waiting(self) -> None:
        """A wake-up said chat requests are waiting."""
        if self.free == 0:
            self.chat_backlog = True  # the next slot to free takes one
        self.chat_wanted.set()

    # -- claiming -------------------------------------------------------------------

    async def claim(self, batch_id: str, endpoint: str, priority: str = "bulk") -> int:
        """Run one ticket: claim up to ``free`` requests of the batch and start them.

        Enqueues a successor ticket when the batch still has unclaimed requests.
        Returns the number of requests claimed.
        """
        n = self.free
        remaining = 1
        requests: list[QueuedRequest] = []
        if batch_id not in self._batches_seen:
            # before the first claim: a crash right after it must find this batch
            await self.redis.sadd(keys.worker_batches(self.worker_id), batch_id)  # type: ignore[misc]
            self._batches_seen.add(batch_id)
        if n > 0 and not self._closing:
            self.claimed += n  # reserve before awaiting so concurrent tickets don't overbook
            try:
                reply = await self.scripts.claim(
                    keys=[
                        keys.batch(batch_id),
                        keys.pending(batch_id),
                        keys.inflight(batch_id),
                        keys.requests(batch_id),
                    ],
                    args=[n, self.worker_id],
                )
            finally:
                self.claimed -= n
            remaining = int(reply[0])
            if remaining < 0:  # batch no longer runnable (cancelled, failed, expired)
                return 0
            requests = [QueuedRequest.from_json(raw) for raw in reply[1:]]
        for request in requests:
            self.claimed += 1
            task = asyncio.create_task(self._run(batch_id, endpoint, request))
            self._tasks[task] = (batch_id, request.custom_id)
        if remaining > 0:
            await enqueue_ticket(self.redis, batch_id, endpoint, priority)
        return len(requests)

    async def _run(self, batch_id: str, endpoint: str, request: QueuedRequest) -> None:
        try:
            outcome = await self.fetcher.fetch(endpoint, request.body)
        except Exception as exc:  # a bug, not an upstream answer: still one result
            logger.exception("request %s of %s failed inside promptq", request.custom_id, batch_id)
            outcome = _internal_error(exc)
        finally:
            self._task_ended(self._tasks)
        self._add_result(batch_id, request.custom_id, outcome)
        error = outcome.error
        if (
            error is not None
            and not error.retryable
            and (error.code in STOP_BATCH_CODES or error.status_code in STOP_BATCH_STATUSES)
        ):
            await self._stop(
                batch_id,
                code=error.code,
                message=f"not sent: the batch stopped after the upstream answered "
                f"{error.code} to another of its requests; fix that, then retry the failed "
                "requests",
                reason=f"stopped: the upstream answered {error.code} ({error.message})",
            )

    def _task_ended(self, tasks: dict[asyncio.Task[None], Any]) -> None:
        self.claimed -= 1
        tasks.pop(asyncio.current_task(), None)  # type: ignore[arg-type]
        if self.chat_backlog:
            self.chat_wanted.set()  # chat first: the loop claims before the next poll
        if self.on_capacity is not None and self.free == self.low_water:
            self.on_capacity()

    # -- the chat lane --------------------------------------------------------------

    async def claim_chat(self) -> int:
        """Take up to ``free`` chat requests from the chat queue and start them.
        Returns how many were taken (expired ones included)."""
        n = min(self.free, CHAT_CLAIM_MAX)
        if n <= 0 or self._closing:
            return 0
        self.claimed += n  # reserve before awaiting, as claim() does
        try:
            entries: list[bytes] = await self.scripts.chat_claim(
                keys=[keys.CHAT_QUEUE, keys.worker_chat(self.worker_id)], args=[n]
            )
        finally:
            self.claimed -= n
        self.chat_backlog = len(entries) == n
        now = time.time()
        for raw in entries:
            try:
                entry = ChatEntry.decode(raw)
            except BadChatEntry as exc:
                logger.error("dropped a chat request: %s", exc)
                chat_id = raw[: keys.CHAT_ID_LEN].decode("ascii", "replace")
                if keys.CHAT_ID_RE.match(chat_id):  # kept by the claim: forget it
                    self._queue_chat_reply(chat_id, "", b"")
                continue
            if entry.deadline < now + self.clock_offset_s:  # its handler gave up (504)
                self._queue_chat_reply(entry.id, "", b"")
                continue
            self.claimed += 1
            task = asyncio.create_task(self._run_chat(entry))
            self._chat_tasks[task] = entry.id
        return len(entries)

    async def _run_chat(self, entry: ChatEntry) -> None:
        try:
            outcome = await self.fetcher.fetch(CHAT_ENDPOINT, entry.body)
        except Exception as exc:  # a bug, not an upstream answer: still an answer
            logger.exception("chat request %s failed inside promptq", entry.id)
            outcome = _internal_error(exc)
        finally:
            self._task_ended(self._chat_tasks)
        self._count(outcome)
        try:
            line = serialization.dumps(result_line(entry.id, outcome))
        except Exception as exc:  # e.g. an answer orjson cannot encode: still answer
            logger.exception("chat request %s: could not encode its answer", entry.id)
            line = serialization.dumps(result_line(entry.id, _internal_error(exc)))
        self._queue_chat_reply(entry.id, entry.replica, line)

    def _queue_chat_reply(self, chat_id: str, replica: str, line: bytes) -> None:
        """Queue an answer (``replica`` "": none, only forget the request)."""
        self._chat_replies.append((chat_id, replica, line))
        self._schedule_flush()

    async def _chat_loop(self) -> None:
        delay = 0.05
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.chat_poll_s):
                    await self.chat_wanted.wait()
            self.chat_wanted.clear()
            try:
                while self.free > 0 and not self._closing:
                    await self.claim_chat()
                    if not self.chat_backlog:
                        break
            except Exception as exc:  # Redis trouble: the next round tries again
                if is_redis_outage(exc):
                    redis_health.failed(exc, doing="taking chat requests")
                else:
                    logger.warning("could not take chat requests: %s", exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)
                continue
            delay = 0.05

    async def _flush_chat(self) -> None:
        replies, self._chat_replies = self._chat_replies, []
        replicas: dict[str, int] = {}
        args: list[Any] = [CHAT_REPLY_TTL_S]
        for chat_id, replica, line in replies:
            index = replicas.setdefault(replica, len(replicas) + 2) if replica else 0
            args += [index, chat_id, line]
        try:
            await self.scripts.chat_reply(
                keys=[
                    keys.worker_chat(self.worker_id),
                    *(keys.chat_replies(r) for r in replicas),
                ],
                args=args,
            )
        except BaseException:
            self._chat_replies[:0] = replies  # keep them: the loop tries again
            raise

    async def _stop_for_failure_rate(self, batch_id: str) -> None:
        raw = await self.redis.hmget(  # type: ignore[misc]
            keys.batch(batch_id), ["succeeded", "failed", "max_failure_rate"]
        )
        ok, failed, limit = (float(decode(v or b"0")) for v in raw)
        rate = failed / max(ok + failed, 1)
        await self._stop(
            batch_id,
            code="failure_rate_exceeded",
            message="not sent: the batch stopped because too many of its requests failed",
            reason=f"stopped: {rate:.0%} of {ok + failed:.0f} finished requests failed, "
            f"over the {limit:.0%} allowed (--max-failure-rate)",
        )

    async def _stop(self, batch_id: str, *, code: str, message: str, reason: str) -> None:
        """promptq's own stop of a batch (status failed); once per batch per worker."""
        if batch_id in self._stopped:
            return
        self._stopped.add(batch_id)
        logger.error("batch %s %s; its unsent requests will not be sent", batch_id, reason)
        try:
            await stop_batch(
                self.redis,
                self.scripts,
                batch_id,
                code=code,
                message=message,
                final_status="failed",
                reason=reason,
            )
        except Exception as exc:
            logger.warning("could not stop batch %s: %s", batch_id, exc)

    def _count(self, outcome: Outcome) -> None:
        if outcome.ok:
            self.done += 1
        else:
            self.failed += 1
        self.retries += outcome.attempts - 1
        self._latency_counts[_bucket(outcome.latency_ms)] += 1
        self._latency_sum_ms += outcome.latency_ms

    def _add_result(self, batch_id: str, custom_id: str, outcome: Outcome) -> None:
        result = result_line(custom_id, outcome)
        self._count(outcome)
        pending = self._buffer.setdefault(batch_id, _Pending())
        pending.args += [
            custom_id,
            serialization.dumps(result),
            1 if outcome.ok else 0,
            outcome.attempts - 1,
        ]
        self._schedule_flush()

    def _schedule_flush(self) -> None:
        if self._flush_task is None or self._flush_task.done():
            self._flushed.clear()
            self._flush_task = asyncio.create_task(self._flush_loop())

    # -- recording ------------------------------------------------------------------

    async def _flush_loop(self) -> None:
        delay = 0.05
        while self._buffer or self._chat_replies:
            # chat answers first (a handler waits for each), then one batch's results:
            # neither kind can hold the other up for long
            ok = await self._flush_chat_step() and await self._flush_batch_step()
            if ok:
                delay = 0.05
                redis_health.ok()
            else:
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)
        self._flushed.set()

    async def _flush_chat_step(self) -> bool:
        if not self._chat_replies:
            return True
        try:
            await self._flush_chat()
        except ResponseError as exc:
            if "WRONGTYPE" not in str(exc):
                self._flush_failed(exc, "chat answers")
                return False
            # a key of another type where a reply list should be: retrying cannot help,
            # so forget these answers rather than hold up every other result
            logger.error("dropped %d chat answer(s): %s", len(self._chat_replies), exc)
            self._chat_replies = [(i, "", b"") for i, _r, _l in self._chat_replies]
            return False
        except Exception as exc:  # Redis down: the answers are kept, try again
            self._flush_failed(exc, "chat answers")
            return False
        return True

    async def _flush_batch_step(self) -> bool:
        if not self._buffer:
            return True
        batch_id, pending = next(iter(self._buffer.items()))
        del self._buffer[batch_id]
        try:
            _added, final, too_many_failures = await self.scripts.record(
                keys=[
                    keys.batch(batch_id),
                    keys.results(batch_id),
                    keys.inflight(batch_id),
                    keys.events(batch_id),
                ],
                args=[pending.count, *pending.args],
            )
        except Exception as exc:  # Redis down: keep the results, try again
            merged = self._buffer.setdefault(batch_id, _Pending())
            merged.args[:0] = pending.args
            self._flush_failed(exc, f"results of {batch_id}")
            return False
        if int(final):
            await self._enqueue_aggregate(batch_id)
        elif int(too_many_failures) and batch_id not in self._stopped:
            await self._stop_for_failure_rate(batch_id)
        return True

    @staticmethod
    def _flush_failed(exc: Exception, what: str) -> None:
        if is_redis_outage(exc):  # one line per outage, not per retry
            redis_health.failed(exc, doing=f"recording {what}")
        else:
            logger.warning("could not record %s (%s); retrying", what, exc)

    async def _enqueue_aggregate(self, batch_id: str) -> None:
        # Only this worker saw the batch become final: keep trying until the job is in.
        logger.info("batch %s: last request done, enqueueing the aggregator", batch_id)
        delay = 0.05
        while True:
            try:
                await enqueue_aggregate(self.redis, batch_id)
                return
            except REDIS_DOWN as exc:
                redis_health.failed(exc, doing=f"enqueueing the aggregator of {batch_id}")
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)
            except Exception as exc:
                logger.warning(
                    "could not enqueue the aggregator of %s (%s); retrying in %.1fs",
                    batch_id,
                    exc,
                    delay,
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    # -- lifecycle ------------------------------------------------------------------

    async def start(self) -> None:
        self.clock_offset_s = await redis_clock_offset(self.redis)
        await self._beat()
        self._heartbeat_task = asyncio.create_task(self._heartbeat_loop())
        self._chat_loop_task = asyncio.create_task(self._chat_loop(), name="chat lane")

    async def close(self, *, grace_s: float = 10.0) -> None:
        """Stop claiming; let in-flight requests finish for up to ``grace_s``; hand the
        rest back to their batches (or the chat queue); flush every result; remove the
        heartbeat."""
        self._closing = True
        if self._chat_loop_task is not None:
            self._chat_loop_task.cancel()
            await asyncio.gather(self._chat_loop_task, return_exceptions=True)
        running = [*self._tasks, *self._chat_tasks]
        if running:
            logger.info("waiting up to %.0fs for %d in-flight request(s)", grace_s, len(running))
            _, unfinished = await asyncio.wait(running, timeout=grace_s)
            if unfinished:
                await self._hand_back(unfinished)
        await self._flushed.wait()
        if self._heartbeat_task is not None:
            self._heartbeat_task.cancel()
            await asyncio.gather(self._heartbeat_task, return_exceptions=True)
        try:
            # nothing of ours runs now: a chat request still marked ours (a claim whose
            # reply was lost) goes back to the queue
            await self._requeue_chat(None)
            await self.redis.delete(
                keys.worker(self.worker_id), keys.worker_batches(self.worker_id)
            )
            await self.redis.zrem(keys.WORKERS, self.worker_id)
        except Exception as exc:  # Redis gone: the heartbeat expires on its own
            logger.warning("could not remove heartbeat: %s", exc)

    async def _hand_back(self, unfinished: set[asyncio.Task[None]]) -> None:
        by_batch: dict[str, list[str]] = {}
        chat_ids: list[str] = []
        for task in unfinished:
            task.cancel()
            if task in self._chat_tasks:
                chat_ids.append(self._chat_tasks[task])
                continue
            batch_id, custom_id = self._tasks.get(task, ("", ""))
            if batch_id:
                by_batch.setdefault(batch_id, []).append(custom_id)
        await asyncio.gather(*unfinished, return_exceptions=True)
        if chat_ids:
            released = await self._requeue_chat(list(chat_ids))
            logger.info("handed %s unfinished chat request(s) back", released)
        for batch_id, ids in by_batch.items():
            released = await self.scripts.release(
                keys=[keys.pending(batch_id), keys.inflight(batch_id), keys.results(batch_id)],
                args=ids,
            )
            logger.info("handed %s unfinished request(s) of %s back", released, batch_id)
            await self._resume(batch_id)

    async def _requeue_chat(
        self, chat_ids: list[str | bytes] | None, *, worker_id: str | None = None
    ) -> int:
        """Put chat requests of this (or a dead) worker back at the front of the chat
        queue (``None``: all of them) and wake the workers. Returns how many."""
        owner = self.worker_id if worker_id is None else worker_id
        n = int(
            await self.scripts.chat_requeue(
                keys=[keys.CHAT_QUEUE, keys.worker_chat(owner)],
                args=["all"] if chat_ids is None else ["ids", *chat_ids],
            )
        )
        if n:
            await self.redis.publish(keys.WAKEUP_CHANNEL, keys.CHAT_WAKEUP)
        return n

    async def _heartbeat_loop(self) -> None:
        checked = redis_health.disruptions  # Redis trouble up to here is none of ours
        while True:
            await asyncio.sleep(self.heartbeat_s)
            try:
                await self._beat()
                redis_health.ok()
                if redis_health.disruptions != checked:
                    seen = redis_health.disruptions
                    if await self._recheck_batches():
                        checked = seen
                await self.reap_dead_workers()
                if self.fetcher.limiter is not None and not self.fetcher.limiter.enforcing:
                    await self.fetcher.limiter.refresh()
            except REDIS_DOWN as exc:  # one line per outage; the next beat tries again
                redis_health.failed(exc, doing="sending the heartbeat")
            except Exception as exc:
                logger.warning("heartbeat failed: %s", exc)

    def _quiet(self) -> bool:
        """No claim and no result write on the wire: every request this worker holds
        in a batch's ``:inflight`` hash is then in ``_tasks`` (or already recorded)."""
        return self.claimed == len(self._tasks) + len(self._chat_tasks) and self._flushed.is_set()

    async def _recheck_chat(self) -> bool:
        """The chat part of ``_recheck_batches``: chat requests marked as this worker's
        that it is not running (a claim whose reply was lost) go back to the queue."""
        if not self._quiet():
            return False
        held: list[bytes] = await self.redis.hkeys(keys.worker_chat(self.worker_id))  # type: ignore[misc]
        if not self._quiet():  # a claim started meanwhile: look again next beat
            return False
        running = {i.encode() for i in self._chat_tasks.values()}
        stranded: list[str | bytes] = [i for i in held if i not in running]
        if stranded:
            released = await self._requeue_chat(stranded)
            logger.warning(
                "handed back %s chat request(s) claimed while Redis was unreachable", released
            )
        return True

    async def _recheck_batches(self) -> bool:
        """After Redis trouble (an outage, or a command redis-py retried): make sure no
        request of a batch this worker took from is stranded.

        * A claim whose reply was lost (then retried, or failed) marked requests as this
          worker's that it never started: they go back to the batch's queue (chat
          requests: to the chat queue).
        * A claim ticket that failed with Redis is gone: the batch gets a new one (an
          extra ticket is harmless). A batch left ``finalizing`` gets its aggregator
          job again (fixed id; the job does nothing twice).
        * Dead-worker recovery must still find this worker's batches.

        Returns False when a claim or a result write was on the wire (then the check
        of stranded requests cannot tell them apart): the next heartbeat tries again.
        """
        complete = await self._recheck_chat()
        for batch_id in list(self._batches_seen):
            raw: list[bytes | None] = await self.redis.hmget(  # type: ignore[misc]
                keys.batch(batch_id), ["status"]
            )
            status = decode(raw[0]) if raw[0] is not None else ""
            if status == "finalizing":
                await self._enqueue_aggregate(batch_id)
            if status not in ("queued", "in_progress", "cancelling"):
                self._batches_seen.discard(batch_id)  # finished: nothing to look after
                continue
            await self.redis.sadd(keys.worker_batches(self.worker_id), batch_id)  # type: ignore[misc]
            if not self._quiet():
                complete = False
                continue
            owners: dict[bytes, bytes] = await self.redis.hgetall(  # type: ignore[misc]
                keys.inflight(batch_id)
            )
            if not self._quiet():  # a claim started meanwhile: look again next beat
                complete = False
                continue
            running = {cid for b, cid in self._tasks.values() if b == batch_id}
            me = self.worker_id.encode()
            stranded = [
                decode(cid)
                for cid, owner in owners.items()
                if owner == me and decode(cid) not in running
            ]
            if stranded:
                released = await self.scripts.release(
                    keys=[keys.pending(batch_id), keys.inflight(batch_id), keys.results(batch_id)],
                    args=stranded,
                )
                logger.warning(
                    "batch %s: handed back %s request(s) claimed while Redis was unreachable",
                    batch_id,
                    released,
                )
            await self._resume(batch_id)
        return complete

    async def reap_dead_workers(self) -> int:
        """Give the unfinished requests of workers whose heartbeat expired back to their
        batches. Any live worker may do it; the script makes it happen once per request.
        Returns the number of requests handed back."""
        stale_before = time.time() - self.heartbeat_s * 3
        total = 0
        for raw in await self.redis.zrangebyscore(keys.WORKERS, "-inf", stale_before):
            dead = decode(raw)
            if dead == self.worker_id or await self.redis.exists(keys.worker(dead)):
                continue  # alive: its beat is just late, or it is us
            for raw_batch in await self.redis.smembers(keys.worker_batches(dead)):  # type: ignore[misc]
                batch_id = decode(raw_batch)
                n = await self.scripts.requeue_dead(
                    keys=[
                        keys.batch(batch_id),
                        keys.pending(batch_id),
                        keys.inflight(batch_id),
                        keys.results(batch_id),
                    ],
                    args=[dead],
                )
                total += int(n)
                if int(n):
                    logger.warning(
                        "worker %s died: handed %s of its request(s) of %s back",
                        dead,
                        n,
                        batch_id,
                    )
                    await self._resume(batch_id)
            n = await self._requeue_chat(None, worker_id=dead)
            if n:
                total += n
                logger.warning("worker %s died: handed %s chat request(s) back", dead, n)
            await self.redis.delete(keys.worker_batches(dead))
            await self.redis.zrem(keys.WORKERS, dead)
        return total

    async def _resume(self, batch_id: str) -> None:
        """Make sure requests put back in a batch get done: a new claim ticket, or, for
        a batch that was stopped (cancelled, or by promptq), the same stop again so they
        end with the stop's code instead of waiting for a claim that is refused."""
        raw: list[bytes | None] = await self.redis.hmget(  # type: ignore[misc]
            keys.batch(batch_id),
            ["final_status", "stop_code", "stop_message", "reason", "endpoint", "priority"],
        )
        final, code, message, reason, endpoint, priority = (decode(v or b"") for v in raw)
        if final:
            await stop_batch(
                self.redis,
                self.scripts,
                batch_id,
                code=code or CANCELLED_CODE,
                message=message or CANCELLED_MESSAGE,
                final_status=final,
                reason=reason,
            )
            return
        await enqueue_ticket(self.redis, batch_id, endpoint, priority or "bulk")

    async def _beat(self) -> None:
        now = time.time()
        key = keys.worker(self.worker_id)
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(
                key,
                mapping={
                    "host": socket.gethostname(),
                    "pid": os.getpid(),
                    "started_at": f"{self.started_at:.3f}",
                    "last_beat": f"{now:.3f}",
                    "concurrency": self.concurrency,
                    "limit": int(self.limit),
                    "in_flight": self.fetcher.in_flight,
                    "claimed": self.claimed,
                    "done": self.done,
                    "failed": self.failed,
                    "retries": self.retries,
                    "upstream": self.upstream_label,
                },
            )
            pipe.expire(key, max(int(self.heartbeat_s * 3), 5))
            pipe.expire(keys.worker_batches(self.worker_id), 7 * 24 * 3600)
            pipe.zadd(keys.WORKERS, {self.worker_id: now})
            # the latency histogram for /metrics rides on the beat, off the result path
            counts, self._latency_counts = self._latency_counts, Counter()
            if counts:
                for bucket, n in counts.items():
                    pipe.hincrby(keys.METRICS_LATENCY, bucket, n)
                pipe.hincrby(keys.METRICS_LATENCY, "count", sum(counts.values()))
                pipe.hincrbyfloat(keys.METRICS_LATENCY, "sum", self._latency_sum_ms)
                self._latency_sum_ms = 0.0
            await pipe.execute()


def result_line(custom_id: str, outcome: Outcome) -> dict[str, Any]:
    """The output line: OpenAI Batch API shape plus ``latency_ms`` and ``attempts``."""
    response = None
    if outcome.status_code is not None:
        response = {
            "status_code": outcome.status_code,
            "request_id": outcome.request_id,
            "body": outcome.body,
        }
    error = None
    if outcome.error is not None:
        error = {"code": outcome.error.code, "message": outcome.error.message}
    return {
        "id": f"batch_req_{uuid.uuid4().hex}",
        "custom_id": custom_id,
        "response": response,
        "error": error,
        "latency_ms": outcome.latency_ms,
        "attempts": outcome.attempts,
    }


def _internal_error(exc: Exception) -> Outcome:
    return Outcome(
        status_code=None,
        body=None,
        request_id=None,
        error=UpstreamError(f"internal error: {type(exc).__name__}", code="internal_error"),
        attempts=1,
        latency_ms=0.0,
    )


def _bucket(latency_ms: float) -> str:
    for bound in keys.LATENCY_BUCKETS_MS:
        if latency_ms <= bound:
            return str(bound)
    return "+Inf"
