"""Batch state changes that both sides make: queueing tickets, stopping a batch,
starting its aggregator.

Priority lanes: claim tickets of ``urgent`` batches are queued with a score
``URGENT_HEAD_START_MS`` earlier than their enqueue time. arq serves the lowest score
first, so an urgent request overtakes all bulk work queued less than that before it,
and bulk work that has waited longer goes first: bulk is delayed, never starved.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime

from arq.connections import ArqRedis

from promptq.shared import keys
from promptq.shared.scripts import Scripts, decode

#: never-sent requests given their result per script call (keeps each Redis call short)
STOP_CHUNK = 1000
CANCELLED_CODE = "batch_cancelled"
CANCELLED_MESSAGE = "the batch was cancelled before this request was sent"


async def stop_batch(
    redis: ArqRedis,
    scripts: Scripts,
    batch_id: str,
    *,
    code: str,
    message: str,
    final_status: str,
    reason: str,
) -> tuple[str, bool]:
    """Stop dispatching a batch and give every never-sent request a result with ``code``.

    ``final_status`` is ``cancelled`` for a user's cancel, ``failed`` for promptq's own
    stops. Returns the status after the call ('' if the batch does not exist) and
    whether this call made the batch final (then the aggregator has been enqueued).
    """
    became_final = False
    while True:
        status, remaining, final = await scripts.stop(
            keys=[
                keys.batch(batch_id),
                keys.pending(batch_id),
                keys.results(batch_id),
                keys.events(batch_id),
                keys.inflight(batch_id),
            ],
            args=[STOP_CHUNK, code, message, final_status, reason],
        )
        if int(final):
            became_final = True
            await enqueue_aggregate(redis, batch_id)
        if int(remaining) == 0:
            return decode(status), became_final


URGENT_HEAD_START_MS = 60_000


def ticket_score_ms(priority: str, now_ms: int | None = None) -> int:
    """arq queue score of a claim ticket for a batch of this priority."""
    now_ms = int(time.time() * 1000) if now_ms is None else now_ms
    return now_ms - URGENT_HEAD_START_MS if priority == "urgent" else now_ms


async def enqueue_ticket(redis: ArqRedis, batch_id: str, endpoint: str, priority: str) -> None:
    """Put one claim ticket for the batch in the queue (in its lane) and wake workers."""
    score_ms = ticket_score_ms(priority)
    await redis.enqueue_job(
        "claim",
        batch_id,
        endpoint,
        priority,
        _defer_until=datetime.fromtimestamp(score_ms / 1000, tz=UTC),
    )
    await redis.publish(keys.WAKEUP_CHANNEL, b"1")


async def enqueue_aggregate(redis: ArqRedis, batch_id: str) -> None:
    """Enqueue the batch's aggregator job (fixed id: arq keeps one) and wake a worker."""
    await redis.enqueue_job("aggregate", batch_id, _job_id=keys.aggregate_job_id(batch_id))
    await redis.publish(keys.WAKEUP_CHANNEL, b"1")
