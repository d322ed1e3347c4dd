"""The cluster at a glance, read from Redis: what ``promptq top`` and the dashboard show.

Queue depth (batches and the chat lane), the limiter (cooldowns, open circuit breakers),
the live workers, and one page of batches newest first, optionally of one status (a
filter reads on, at most ``SCAN_PAGES`` pages, until the page is full).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from promptq.shared import keys
from promptq.shared.errors import BatchNotFound
from promptq.shared.models import BatchInfo
from promptq.shared.ratelimit import limiter_states
from promptq.shared.registry import WorkerRegistry

if TYPE_CHECKING:
    from promptq.producer import Producer

#: a status filter reads at most this many pages of batches for one page of answers
SCAN_PAGES = 10


@dataclass(slots=True)
class Overview:
    now: float  # Redis' clock
    queued: int
    chat_queued: int
    batch_count: int
    batches: list[BatchInfo]
    next_offset: int | None  # where the next page starts (None: this was the last)
    workers: list[dict[str, Any]]
    limits: list[dict[str, Any]]


async def _info(producer: Producer, batch_id: str) -> BatchInfo | None:
    try:
        return await producer.batch(batch_id).info()
    except BatchNotFound:  # swept meanwhile
        return None


async def read_overview(
    producer: Producer,
    *,
    heartbeat_s: float,
    offset: int = 0,
    limit: int = 25,
    status: str | None = None,
) -> Overview:
    redis = producer.redis
    seconds, micros = await redis.time()
    now = seconds + micros / 1e6
    total = int(await redis.zcard(keys.BATCHES))
    batches: list[BatchInfo] = []
    scanned = offset
    while len(batches) < limit and scanned < total and scanned < offset + limit * SCAN_PAGES:
        ids = [
            b.decode() for b in await redis.zrevrange(keys.BATCHES, scanned, scanned + limit - 1)
        ]
        if not ids:
            break
        start = scanned
        scanned += len(ids)
        # one round trip each, all on the wire at once
        infos = await asyncio.gather(*(_info(producer, batch_id) for batch_id in ids))
        for position, info in enumerate(infos, start=start):
            if info is not None and (status is None or info.status.value == status):
                batches.append(info)
                if len(batches) == limit:  # the next page starts after this one
                    scanned = position + 1
                    break
    return Overview(
        now=now,
        queued=await producer.queued_requests(),
        chat_queued=int(await redis.llen(keys.CHAT_QUEUE)),  # type: ignore[misc]
        batch_count=total,
        batches=batches,
        next_offset=scanned if scanned < total else None,
        workers=await WorkerRegistry(redis, heartbeat_s=heartbeat_s).live(),
        limits=await limiter_states(redis, now),
    )
