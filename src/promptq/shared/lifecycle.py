"""Batch state changes that both sides make: stopping a batch, starting its aggregator."""

from __future__ import annotations

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


async def enqueue_aggregate(redis: ArqRedis, batch_id: str) -> None:
    """Enqueue the batch's aggregator job (fixed id: arq keeps one) and wake a worker."""
    await redis.enqueue_job("aggregate", batch_id, _job_id=keys.aggregate_job_id(batch_id))
    await redis.publish(keys.WAKEUP_CHANNEL, b"1")
