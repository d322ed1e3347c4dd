"""The aggregator: a finished batch's statistics, then its terminal status.

The worker whose result completed a batch (the one that saw it become ``finalizing``)
aggregates it at once, in-process, so a batch is ``completed`` milliseconds after its
last result. Before that it enqueues the arq job ``aggregate`` for the batch, deferred
by ``FALLBACK_DEFER_S``: if that worker dies midway, any worker's arq runs it. Either
run does nothing unless the batch is still ``finalizing`` (the finish script checks),
so running it twice is harmless. A worker that sees a batch still ``finalizing`` after
Redis trouble runs it again (``BatchSource.recheck``).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from promptq.shared.batches import BatchStore
from promptq.shared.connection import REDIS_DOWN, RedisHealth
from promptq.shared.results import BATCH_API
from promptq.shared.stats import stats_from_tally
from promptq.shared.status import Status

logger = logging.getLogger(__name__)

#: the fallback job runs this long after the batch became final (the in-process run
#: is done by then unless its worker died)
FALLBACK_DEFER_S = 5.0
RETRY_S = 0.05
RETRY_MAX_S = 2.0
#: on shutdown, how long aggregations under way may finish
CLOSE_WAIT_S = 10.0


async def aggregate(
    store: BatchStore, batch_id: str, *, default_ttl_s: int, webhook_url: str | None = None
) -> str:
    """Compute a finalizing batch's statistics and mark it completed (or how its stop
    said it ends). Returns the status afterwards; a batch that is not finalizing is left
    alone."""
    raw = await store.read(batch_id)
    if raw.get("status") != Status.FINALIZING:
        return raw.get("status", "")
    created = float(raw.get("created_at") or 0)
    last = float(raw.get("last_result_at") or created)
    stats = stats_from_tally(
        await store.tally(batch_id),
        succeeded=int(raw.get("succeeded") or 0),
        failed=int(raw.get("failed") or 0),
        wall_s=max(last - created, 0.0),
        batch_api=raw.get("route") == BATCH_API,
    )
    # a batch may keep its results for less (the HTTP chat lane: minutes, not days)
    ttl_s = int(raw.get("result_ttl_s") or default_ttl_s)
    final = await store.finish(
        batch_id, ttl_s=ttl_s, stats=stats.to_redis(), webhook_url=webhook_url
    )
    logger.info(
        "batch %s %s: %d succeeded, %d failed, p50 %.0f ms, p99 %.0f ms, %.1f req/s",
        batch_id,
        final,
        stats.succeeded,
        stats.failed,
        stats.p50_ms,
        stats.p99_ms,
        stats.throughput_rps,
    )
    return final


class Aggregator:
    """In-process aggregation of the batches this worker completed."""

    def __init__(
        self,
        store: BatchStore,
        *,
        default_ttl_s: int,
        health: RedisHealth,
        webhook_url: str | None = None,
    ) -> None:
        self.store = store
        self.default_ttl_s = default_ttl_s
        self.webhook_url = webhook_url
        #: told when a batch this worker aggregated has ended (its webhook may be due)
        self.on_finished: Callable[[], None] | None = None
        self.health = health
        self._running: dict[str, asyncio.Task[None]] = {}

    @property
    def idle(self) -> bool:
        return not self._running

    def schedule(self, batch_id: str) -> None:
        """Aggregate the batch soon (once at a time per batch)."""
        if batch_id not in self._running:
            task = asyncio.create_task(self._run(batch_id), name=f"aggregate {batch_id}")
            self._running[batch_id] = task
            task.add_done_callback(lambda _: self._running.pop(batch_id, None))

    async def _run(self, batch_id: str) -> None:
        await self._until_done(
            lambda: self.store.request_aggregation(batch_id, defer_s=FALLBACK_DEFER_S),
            f"enqueueing the aggregator of {batch_id}",
        )
        await self._until_done(
            lambda: aggregate(
                self.store,
                batch_id,
                default_ttl_s=self.default_ttl_s,
                webhook_url=self.webhook_url,
            ),
            f"aggregating {batch_id}",
        )
        if self.on_finished is not None:
            self.on_finished()

    async def _until_done(self, step: Any, doing: str) -> None:
        delay = RETRY_S
        while True:
            try:
                await step()
                if delay > RETRY_S:
                    self.health.ok()
                return
            except REDIS_DOWN as exc:
                self.health.failed(exc, doing=doing)
            except Exception as exc:
                logger.warning("%s failed (%s); retrying in %.1fs", doing, exc, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, RETRY_MAX_S)

    async def close(self, *, timeout_s: float = CLOSE_WAIT_S) -> None:
        """Let aggregations under way finish for up to ``timeout_s``, then cancel them (the
        fallback job, or the next worker's recheck, finishes a cut one)."""
        tasks = list(self._running.values())
        if not tasks:
            return
        _, late = await asyncio.wait(tasks, timeout=timeout_s)
        for task in late:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def aggregate_job(ctx: dict[str, Any], batch_id: str) -> str:
    """arq job ``aggregate``: the durable fallback of the in-process aggregation."""
    store: BatchStore = ctx["store"]
    return await aggregate(
        store,
        batch_id,
        default_ttl_s=int(ctx["result_ttl_s"]),
        webhook_url=ctx.get("webhook_url"),
    )
