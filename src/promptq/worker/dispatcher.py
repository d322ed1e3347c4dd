"""The dispatcher: requests from sources, through the executor, into sinks.

    sources (lanes)          slots              executor + backend          sinks
    chat  ─┐  claim when   ┌───────────┐  run   retries, limits,   outcome  buffered,
    batch ─┴► there is room ─► Slots    ├──────► one attempt at a ────────► written in
              (feed loops)  └───────────┘        time per backend           groups (flush)

Each source runs its own feed loop (how it waits for work differs: the chat lane blocks
on Redis, batches are woken by pub/sub) and starts jobs here; the dispatcher runs every
job the same way, counts it, and gives its outcome back to its source. One flush loop
writes the sources' buffered results, taking turns so that no lane holds up another:
while one write is on the wire the next group fills.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Sequence

from promptq.shared import keys
from promptq.shared.connection import RedisHealth, is_redis_outage
from promptq.shared.results import Outcome, internal_error
from promptq.worker.cache import ResponseCache
from promptq.worker.execute import Executor
from promptq.worker.slots import Slots
from promptq.worker.sources import Job, Source

logger = logging.getLogger(__name__)

#: a failed result write is tried again after this long, doubling up to FLUSH_RETRY_MAX_S
FLUSH_RETRY_S = 0.05
FLUSH_RETRY_MAX_S = 1.0
#: on shutdown, how long results may take to reach Redis (it may be down)
FLUSH_WAIT_S = 10.0


class Dispatcher:
    """Runs one worker process's requests."""

    def __init__(
        self,
        *,
        executor: Executor,
        slots: Slots,
        worker_id: str,
        health: RedisHealth,
        cache: ResponseCache | None = None,
    ) -> None:
        self.executor = executor
        self.cache = cache
        self.slots = slots
        self.worker_id = worker_id
        self.health = health
        self.sources: list[Source] = []
        self.running: dict[asyncio.Task[None], Job] = {}
        #: set while shutting down: feeds stop claiming
        self.closing = False
        self.done = 0
        self.failed = 0
        self.retries = 0
        self._latency_counts: Counter[str] = Counter()
        self._latency_sum_ms = 0.0
        self._feeds: list[asyncio.Task[None]] = []
        self._flush_task: asyncio.Task[None] | None = None
        self._flushed = asyncio.Event()
        self._flushed.set()
        self._hurry = asyncio.Event()
        executor.on_attempt = slots.observe

    # -- lifecycle -----------------------------------------------------------------------

    def start_feeds(self, sources: Sequence[Source]) -> None:
        """Start each source's feed loop (in priority order: the first feeds first)."""
        self.sources = list(sources)
        for source in self.sources:
            self._feeds.append(asyncio.create_task(source.feed(self), name=f"{source.name} feed"))

    async def stop_feeds(self) -> None:
        """Stop claiming (a claim on the wire is cancelled; its requests are found by
        ``release_all``)."""
        self.closing = True
        self.slots.notify()
        for task in self._feeds:
            task.cancel()
        await asyncio.gather(*self._feeds, return_exceptions=True)
        self._feeds.clear()

    async def drain(self, *, grace_s: float) -> None:
        """Let running jobs finish for up to ``grace_s``, hand the rest back to their
        sources, write every result (for up to ``FLUSH_WAIT_S`` more), then give back
        whatever is still owned."""
        running = set(self.running)
        if running and grace_s > 0 and not self._hurry.is_set():
            logger.info("waiting up to %.0fs for %d in-flight request(s)", grace_s, len(running))
            all_done = asyncio.ensure_future(asyncio.wait(running))
            hurry = asyncio.ensure_future(self._hurry.wait())
            await asyncio.wait(
                {all_done, hurry}, timeout=grace_s, return_when=asyncio.FIRST_COMPLETED
            )
            for waiter in (all_done, hurry):
                waiter.cancel()
            await asyncio.gather(all_done, hurry, return_exceptions=True)
        unfinished = {t for t in running if not t.done()}
        if unfinished:
            jobs = [self.running[t] for t in unfinished if t in self.running]
            for task in unfinished:
                task.cancel()
            await asyncio.gather(*unfinished, return_exceptions=True)
            for source in self.sources:
                mine = [j for j in jobs if j.source is source]
                if mine:
                    n = await source.hand_back(mine)
                    logger.info("handed %d unfinished %s request(s) back", n, source.name)
        try:
            async with asyncio.timeout(FLUSH_WAIT_S):
                await self._flushed.wait()
        except TimeoutError:
            logger.error(
                "could not write every result within %.0fs (Redis unreachable); their "
                "requests stay claimed and another worker sends them again",
                FLUSH_WAIT_S,
            )
            return
        for source in self.sources:
            n = await source.release_all()
            if n:
                logger.info("handed %d claimed %s request(s) back", n, source.name)

    def hurry(self) -> None:
        """Cut the shutdown grace short: hand back what still runs now."""
        self._hurry.set()

    @property
    def idle(self) -> bool:
        return not self.running and self._flushed.is_set()

    # -- running -------------------------------------------------------------------------

    def start(self, job: Job) -> None:
        """Run a claimed job in a slot (taken here; given back when its outcome is in)."""
        self.slots.take()
        task = asyncio.create_task(self._run(job))
        self.running[task] = job

    async def _run(self, job: Job) -> None:
        try:
            if job.relay is not None:
                try:
                    outcome = await self.executor.execute(job.endpoint, job.body, relay=job.relay)
                finally:
                    await job.relay.drain()  # every event before the final answer
            elif job.cache_ttl_s and self.cache is not None:
                outcome = await self.cache.run(
                    job.endpoint,
                    job.body,
                    ttl_s=job.cache_ttl_s,
                    send=lambda: self.executor.execute(job.endpoint, job.body),
                )
            else:
                outcome = await self.executor.execute(job.endpoint, job.body)
        except Exception as exc:  # a bug, not an upstream answer: still one result
            logger.exception("request %s failed inside promptq", job.key)
            outcome = internal_error(exc)
        finally:
            task = asyncio.current_task()
            if task is not None:
                self.running.pop(task, None)
            self.slots.give()
        self._count(outcome)
        job.source.finished(job, outcome)
        self.schedule_flush()

    def held(self, source: Source) -> list[Job]:
        """The source's jobs running now."""
        return [job for job in self.running.values() if job.source is source]

    def _count(self, outcome: Outcome) -> None:
        if outcome.ok:
            self.done += 1
        else:
            self.failed += 1
        self.retries += outcome.attempts - 1
        self._latency_counts[_bucket(outcome.latency_ms)] += 1
        self._latency_sum_ms += outcome.latency_ms

    def take_latency(self) -> tuple[Counter[str], float]:
        """The latency histogram since the last call (the heartbeat carries it)."""
        counts, total = self._latency_counts, self._latency_sum_ms
        self._latency_counts, self._latency_sum_ms = Counter(), 0.0
        return counts, total

    def give_back_latency(self, counts: Counter[str], total_ms: float) -> None:
        """A heartbeat that failed returns what it carried."""
        self._latency_counts.update(counts)
        self._latency_sum_ms += total_ms

    # -- writing results -----------------------------------------------------------------

    def schedule_flush(self) -> None:
        if self._flush_task is None or self._flush_task.done():
            self._flushed.clear()
            self._flush_task = asyncio.create_task(self._flush_loop(), name="flush")

    @property
    def writing(self) -> bool:
        """A result write is on the wire or waiting to be sent."""
        return not self._flushed.is_set()

    async def _flush_loop(self) -> None:
        delay = FLUSH_RETRY_S
        try:
            while any(s.unwritten for s in self.sources):
                ok = True
                for source in self.sources:  # one group each, in turn
                    if source.unwritten:
                        ok = await self._flush_one(source) and ok
                if ok:
                    delay = FLUSH_RETRY_S
                    self.health.ok()
                else:
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, FLUSH_RETRY_MAX_S)
        finally:
            self._flushed.set()

    async def _flush_one(self, source: Source) -> bool:
        try:
            return await source.flush()
        except Exception as exc:
            if is_redis_outage(exc):  # one line per outage, not per retry
                self.health.failed(exc, doing=f"recording {source.name} results")
            else:
                logger.warning("could not record %s results (%s); retrying", source.name, exc)
            return False


def _bucket(latency_ms: float) -> str:
    for bound in keys.LATENCY_BUCKETS_MS:
        if latency_ms <= bound:
            return str(bound)
    return "+Inf"
