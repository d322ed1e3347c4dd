"""The arq job functions: ``claim`` (a ticket for a batch's requests) and ``aggregate``."""

from __future__ import annotations

import logging
from typing import Any

from promptq.shared import keys, serialization
from promptq.shared.scripts import Scripts, decode
from promptq.shared.stats import compute_stats
from promptq.worker.dispatcher import Dispatcher

logger = logging.getLogger(__name__)


async def claim(ctx: dict[str, Any], batch_id: str, endpoint: str, priority: str = "bulk") -> int:
    """Claim as many of the batch's queued requests as this worker has free slots."""
    dispatcher: Dispatcher = ctx["dispatcher"]
    return await dispatcher.claim(batch_id, endpoint, priority)


async def aggregate(ctx: dict[str, Any], batch_id: str) -> str:
    """Compute a finished batch's statistics and mark it completed (or cancelled).

    Enqueued with a fixed job id by the one worker whose result completed the batch, so
    it runs once; it is also idempotent (does nothing unless the batch is finalizing).
    """
    redis = ctx["redis"]
    scripts: Scripts = ctx["scripts"]
    raw = {decode(k): decode(v) for k, v in (await redis.hgetall(keys.batch(batch_id))).items()}
    if raw.get("status") != "finalizing":
        return f"skipped: batch {batch_id} is {raw.get('status', 'missing')}"
    results = [
        serialization.loads(value)
        async for _cid, value in redis.hscan_iter(keys.results(batch_id), count=1000)
    ]
    created = float(raw.get("created_at") or 0)
    last = float(raw.get("last_result_at") or created)
    stats = compute_stats(results, wall_s=max(last - created, 0.0))
    fields = [item for pair in stats.to_redis().items() for item in pair]
    # a batch may keep its results for less (the HTTP chat lane: minutes, not days)
    ttl_s = int(raw.get("result_ttl_s") or ctx["result_ttl_s"])
    final = decode(
        await scripts.finish(
            keys=[
                keys.batch(batch_id),
                keys.stats(batch_id),
                keys.events(batch_id),
                keys.requests(batch_id),
                keys.pending(batch_id),
                keys.inflight(batch_id),
                keys.results(batch_id),
            ],
            args=[ttl_s, *fields],
        )
    )
    await redis.srem(keys.ACTIVE, batch_id)
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
