"""The batch lane: requests of batches, claimed in groups, results recorded in groups.

Claiming: when at least an eighth of the slots is free, the worker asks the runnable
index for the batches whose turn is next and claims as many requests as it has free
slots from the first that has some (one script: pop, mark in flight under this
worker's id, move the batch to the back of its lane). Producers publish on
``promptq:wakeup`` when a batch has work, so an idle worker claims within milliseconds;
every ``poll_s`` it looks anyway, in case a message was missed.

Recording: results wait in a buffer per batch and go to Redis in one script call per
batch (HSETNX: exactly once per custom_id). The call that records a batch's last
result makes it ``finalizing`` (once, for one worker) and that worker starts the
aggregator. An upstream answer that every request of the batch would get
(``insufficient_quota``, a refused key) stops the batch; so does a failure rate over
the batch's ``--max-failure-rate``.

What this worker holds of a batch (running, or result not yet written) is ``held``;
what it owns is the batch's ``:inflight`` entries under its id. Owned minus held is
stranded (a claim whose reply was lost) and goes back (``recheck``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from typing import Any

from promptq.shared import keys, serialization
from promptq.shared.batches import RECORD_ARGS, BatchStore, record_args
from promptq.shared.connection import RedisHealth, is_redis_outage
from promptq.shared.errors import stops_batch
from promptq.shared.prices import PriceTable, Spend
from promptq.shared.results import Outcome, result_line
from promptq.shared.stats import usage_tokens
from promptq.shared.status import RUNNING, Status
from promptq.worker.breaker import UNREACHABLE
from promptq.worker.dispatcher import Dispatcher
from promptq.worker.sources import Job

logger = logging.getLogger(__name__)

#: results recorded per script call at most (a longer call would hold Redis up)
RECORD_MAX = 256
#: batches asked of the runnable index per claim (the first with requests wins)
CANDIDATES = 8
#: a failed claim is tried again after this long, doubling up to CLAIM_RETRY_MAX_S
CLAIM_RETRY_S = 0.05
CLAIM_RETRY_MAX_S = 1.0


BUDGET_EXCEEDED = "budget_exceeded"


def budget_stop(budget: float) -> tuple[str, str, str]:
    """(code, message of the unsent requests' lines, reason) of a budget stop."""
    return (
        BUDGET_EXCEEDED,
        f"not sent: the batch reached its budget of ${budget:g} (--max-cost-usd)",
        f"stopped: the batch spent its budget of ${budget:g} (--max-cost-usd); "
        "the requests in flight then finished",
    )


@dataclass(slots=True)
class _Batch:
    """What this worker knows of one batch it claims from."""

    held: set[str] = field(default_factory=set)  # custom_ids running or not yet recorded
    drained: bool = False  # its last claim left nothing pending
    stopping: bool = False  # this worker stops it (once)
    suspect: bool = False  # a claim failed without an answer: it may own requests here
    token: str = ""  # of this worker's last claim of it (the next claim forgets it)


class BatchSource:
    """The batch lane of one worker (see the module docstring)."""

    name = "batch"

    def __init__(
        self,
        store: BatchStore,
        *,
        worker_id: str,
        health: RedisHealth,
        poll_s: float,
        on_final: Callable[[str], None],
        prices: PriceTable | None = None,
        cache_ttl_s: int | None = None,
        spend: Spend | None = None,
    ) -> None:
        self.store = store
        self.spend = spend or Spend()
        self.worker_id = worker_id
        self.health = health
        self.poll_s = poll_s
        self.on_final = on_final
        self.prices = prices or PriceTable.load()
        #: the workers' PROMPTQ_CACHE_TTL_S (a batch's --cache sets its own)
        self.cache_ttl_s = cache_ttl_s
        #: set by a wake-up message: a batch has requests to claim
        self.wanted = asyncio.Event()
        #: set once the wake-up channel is subscribed (a message before it is missed)
        self.listening = asyncio.Event()
        #: also called on every wake-up message (the batch-api route's shard driver)
        self.on_wake: list[Callable[[], None]] = []
        #: batches this worker claims from; a batch leaves once nothing of it is held
        #: and nothing is pending (``_settle``)
        self.batches: dict[str, _Batch] = {}
        self._buffer: dict[str, list[Any]] = {}  # batch id -> 4 record arguments a result
        self._claiming = 0  # claims on the wire
        self._claims_started = 0
        self._tasks: set[asyncio.Task[None]] = set()
        #: a claim failed without an answer: it may have taken requests (``recheck``)
        self.suspect = False

    # -- claiming ------------------------------------------------------------------------

    async def feed(self, dispatcher: Dispatcher) -> None:
        slots = dispatcher.slots
        listener = asyncio.create_task(self._listen(), name="batch wake-ups")
        delay = CLAIM_RETRY_S
        try:
            while True:
                await slots.wait_until(
                    lambda: dispatcher.closing or (slots.free >= slots.low_water)
                )
                if dispatcher.closing:
                    return
                self.wanted.clear()
                try:
                    claimed = await self._claim(dispatcher, slots.free)
                except Exception as exc:
                    self.suspect = True  # it may have run: the next recheck looks
                    if is_redis_outage(exc):
                        self.health.failed(exc, doing="claiming requests")
                    else:
                        logger.warning("could not claim requests: %s", exc)
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, CLAIM_RETRY_MAX_S)
                    continue
                delay = CLAIM_RETRY_S
                if claimed == 0:
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(self.poll_s):
                            await self.wanted.wait()
        finally:
            listener.cancel()
            await asyncio.gather(listener, return_exceptions=True)

    async def _claim(self, dispatcher: Dispatcher, n: int) -> int:
        """Claim up to ``n`` requests from the batch whose turn is next; returns how many."""
        for batch_id in await self.store.runnable(CANDIDATES):
            state = self.batches.setdefault(batch_id, _Batch())
            dispatcher.slots.take(n)  # reserved while the claim is on the wire
            self._claiming += 1
            self._claims_started += 1
            try:
                claim = await self.store.claim(
                    batch_id, n, self.worker_id, previous_token=state.token
                )
            except BaseException:
                state.suspect = True  # kept until a recheck has looked at it
                raise
            finally:
                self._claiming -= 1
                dispatcher.slots.give(n)
            state.drained = claim.remaining <= 0
            state.token = claim.token
            cache_ttl_s = claim.cache_ttl_s or self.cache_ttl_s
            for request in claim.requests:
                state.held.add(request.custom_id)
                dispatcher.start(
                    Job(self, request.custom_id, batch_id, claim.endpoint, request.body,
                        cache_ttl_s=cache_ttl_s)
                )  # fmt: skip
            if claim.requests:
                return len(claim.requests)
            self._settle(batch_id)
        return 0

    async def _listen(self) -> None:
        """Set ``wanted`` on every wake-up message (pub/sub), reconnecting after trouble."""
        delay = 0.1
        while True:
            pubsub = self.store.redis.pubsub()
            try:
                await pubsub.subscribe(keys.WAKEUP_CHANNEL)
                delay = 0.1
                self.listening.set()
                self.wanted.set()  # work queued before we listened: claim it now
                while True:
                    message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
                    if message is not None:
                        self.wanted.set()
                        for wake in self.on_wake:
                            wake()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # Redis restarting: polling covers the gap
                logger.debug("wake-up listener reconnecting: %s", exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
            finally:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]

    # -- recording -----------------------------------------------------------------------

    def finished(self, job: Job, outcome: Outcome) -> None:
        line = serialization.dumps(result_line(job.key, outcome))
        cost = None
        tokens = (0, 0)
        if outcome.ok:
            tokens = usage_tokens(outcome.body)
            if not outcome.cached:
                cost = self.prices.cost_of(
                    outcome.body, job.body.get("model"), batch=False, tokens=tokens
                )
            self.spend.add(cost, cached=outcome.cached, tokens=tokens)
        self._buffer.setdefault(job.group, []).extend(
            record_args(job.key, line, outcome, cost=cost, tokens=tokens)
        )
        error = outcome.error
        if error is not None and stops_batch(error):
            if error.code == UNREACHABLE:
                message = (
                    "not sent: the batch stopped because the upstream refused every "
                    "connection; fix that, then retry the failed requests"
                )
                reason = f"stopped: {error.message}"
            else:
                message = (
                    f"not sent: the batch stopped after the upstream answered {error.code} "
                    "to another of its requests; fix that, then retry the failed requests"
                )
                reason = f"stopped: the upstream answered {error.code} ({error.message})"
            self._stop(job.group, code=error.code, message=message, reason=reason)

    @property
    def unwritten(self) -> bool:
        return bool(self._buffer)

    async def flush(self) -> bool:
        batch_id, buffered = next(iter(self._buffer.items()))
        # at most RECORD_MAX results a call: each script call stays short for Redis
        cut = RECORD_MAX * RECORD_ARGS
        args, rest = buffered[:cut], buffered[cut:]
        if rest:
            self._buffer[batch_id] = rest
        else:
            del self._buffer[batch_id]
        try:
            recorded = await self.store.record(batch_id, args)
        except BaseException:
            self._buffer.setdefault(batch_id, [])[:0] = args  # kept: tried again
            raise
        state = self.batches.get(batch_id)
        if state is not None:
            state.held.difference_update(args[::RECORD_ARGS])
        if recorded.became_final:
            logger.info("batch %s: last request done, aggregating", batch_id)
            self.on_final(batch_id)
        elif recorded.too_many_failures:
            self._spawn(self._stop_for_failure_rate(batch_id))
        elif recorded.over_budget:
            self._spawn(self._stop_for_budget(batch_id))
        self._settle(batch_id)
        return True

    def _settle(self, batch_id: str) -> None:
        """Forget a batch once nothing of it is held here and nothing is pending (the
        rule that keeps ``batches`` from growing for the process's life)."""
        state = self.batches.get(batch_id)
        if (
            state is not None
            and state.drained
            and not state.held
            and not state.suspect
            and batch_id not in self._buffer
        ):
            del self.batches[batch_id]

    # -- stopping ------------------------------------------------------------------------

    def _spawn(self, job: Any) -> None:
        task = asyncio.create_task(job)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _stop(self, batch_id: str, *, code: str, message: str, reason: str) -> None:
        """promptq's own stop of a batch (status failed); once per batch per worker."""
        state = self.batches.setdefault(batch_id, _Batch())
        if state.stopping:
            return
        state.stopping = True
        logger.error("batch %s %s; its unsent requests will not be sent", batch_id, reason)
        self._spawn(self._send_stop(batch_id, code=code, message=message, reason=reason))

    async def _send_stop(self, batch_id: str, *, code: str, message: str, reason: str) -> None:
        try:
            await self.store.stop(
                batch_id, code=code, message=message, final_status=Status.FAILED, reason=reason
            )
        except Exception as exc:
            logger.warning("could not stop batch %s: %s", batch_id, exc)

    async def _stop_for_failure_rate(self, batch_id: str) -> None:
        ok, failed, limit = (float(v or 0) for v in await self.store.fields(
            batch_id, "succeeded", "failed", "max_failure_rate"
        ))  # fmt: skip
        rate = failed / max(ok + failed, 1)
        self._stop(
            batch_id,
            code="failure_rate_exceeded",
            message="not sent: the batch stopped because too many of its requests failed",
            reason=f"stopped: {rate:.0%} of {ok + failed:.0f} finished requests failed, "
            f"over the {limit:.0%} allowed (--max-failure-rate)",
        )

    async def _stop_for_budget(self, batch_id: str) -> None:
        (raw,) = await self.store.fields(batch_id, "max_cost_usd")
        code, message, reason = budget_stop(float(raw or 0))
        self._stop(batch_id, code=code, message=message, reason=reason)

    async def wait_stops(self) -> None:
        """Wait for stops and failure-rate checks under way (shutdown)."""
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    # -- recovery ------------------------------------------------------------------------

    async def hand_back(self, jobs: Collection[Job]) -> int:
        by_batch: dict[str, list[str]] = {}
        for job in jobs:
            by_batch.setdefault(job.group, []).append(job.key)
        total = 0
        for batch_id, ids in by_batch.items():
            total += await self.store.release(batch_id, ids)
            state = self.batches.get(batch_id)
            if state is not None:
                state.held.difference_update(ids)
        return total

    async def recheck(self, running: Collection[Job]) -> bool:
        if self._claiming:
            return False
        started = self._claims_started
        complete = True
        for batch_id in list(self.batches):
            status = await self.store.status(batch_id)
            if status is Status.FINALIZING:
                self.on_final(batch_id)  # its aggregation may have died in the outage
            state = self.batches.get(batch_id)
            if state is None:
                continue
            if status not in RUNNING:
                if not state.held:
                    del self.batches[batch_id]  # finished: nothing to look after
                continue
            owned = await self.store.owned(batch_id, self.worker_id)
            if self._claiming or self._claims_started != started:
                complete = False  # a claim started meanwhile: look again later
                break
            stranded = owned - state.held
            if stranded:
                n = await self.store.release(batch_id, stranded)
                logger.warning(
                    "batch %s: handed back %d request(s) claimed while Redis was unreachable",
                    batch_id,
                    n,
                )
        if complete:
            self.suspect = False
        return complete

    async def reap(self, dead_worker_id: str) -> int:
        total = 0
        for batch_id in await self.store.active():
            n = await self.store.release(batch_id, owner=dead_worker_id)
            if n:
                logger.warning(
                    "worker %s died: handed %d of its request(s) of %s back",
                    dead_worker_id,
                    n,
                    batch_id,
                )
            total += n
        return total

    async def release_all(self) -> int:
        total = 0
        for batch_id in list(self.batches):
            total += await self.store.release(batch_id, owner=self.worker_id)
        self.batches.clear()
        return total
