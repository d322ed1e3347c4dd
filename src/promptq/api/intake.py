"""Validating a batch created over HTTP: parse its input file, then enqueue it or fail it.

``POST /v1/batches`` answers at once with a ``validating`` batch and leaves the work to
``validate_and_enqueue``, run as a task of the API process. An invalid file ends the
batch ``failed`` with OpenAI-style ``errors`` naming the lines, as OpenAI does. If the
process dies midway the batch stays ``validating`` until ``api_validation_timeout_s``
has passed; the next read of it then marks it failed (``expire_stale_validation``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Mapping
from typing import Any

from promptq.api.store import ApiStore, StoredBatch
from promptq.producer import Producer
from promptq.producer.parsing import parse_jsonl
from promptq.shared import keys
from promptq.shared.errors import BatchError, InputError, LineError, QueueFull
from promptq.shared.models import Priority, Status
from promptq.shared.settings import Settings

logger = logging.getLogger(__name__)

#: problems listed in a failed batch's ``errors.data`` (the count of the rest follows)
MAX_LISTED_ERRORS = 100


def _code(error: LineError) -> str:
    if error.line == 0:
        return "invalid_file"
    if error.field is None:
        return "invalid_json_line"
    if error.field == "custom_id" and error.message.startswith("duplicate"):
        return "duplicate_custom_id"
    if error.field in ("url", "method"):
        return f"invalid_{error.field}"
    return "invalid_request"


def batch_errors(errors: list[LineError], total: int) -> list[dict[str, Any]]:
    """``errors.data`` of a failed batch: code, message, param and line of each problem."""
    listed = sorted(errors, key=lambda e: e.line)[:MAX_LISTED_ERRORS]
    data: list[dict[str, Any]] = [
        {"code": _code(e), "message": str(e), "param": e.field, "line": e.line or None}
        for e in listed
    ]
    if total > len(data):
        data.append(
            {
                "code": "too_many_errors",
                "message": f"... and {total - len(data)} more problem(s); fix these and "
                "upload the file again",
                "param": None,
                "line": None,
            }
        )
    return data


async def logged(job: Awaitable[None], what: str) -> None:
    """Await ``job``, logging (not raising) its failure: for tasks nobody awaits."""
    try:
        await job
    except Exception:
        logger.exception("%s failed", what)


async def validate_and_enqueue(
    *,
    producer: Producer,
    store: ApiStore,
    settings: Settings,
    batch_id: str,
    file_id: str,
    endpoint: str,
    created_at: float,
    options: Mapping[str, Any] | None = None,
) -> None:
    """Parse the input file whole; enqueue the batch, or mark it failed with its errors.
    ``options``: promptq's options of the batch from its metadata (``batch_options``).

    Runs as a task nobody awaits (wrap it in ``logged``). A batch left 'validating' by
    one that failed (Redis gone midway) is failed by ``expire_stale_validation`` later.
    """
    ttl_s = settings.result_ttl_s
    data = await store.file_content(file_id)
    if data is None:
        problem = LineError(
            0, None, f"input file {file_id} was deleted or expired before it was validated"
        )
        await _fail(store, batch_id, problem, ttl_s=ttl_s)
        return
    try:
        # Parsing 50,000 lines takes a while: off the event loop, other requests go on.
        parsed = await asyncio.to_thread(
            parse_jsonl,
            data,
            source=file_id,
            default_model=settings.model,
            max_lines=settings.api_max_lines,
            max_bytes=settings.api_max_file_bytes,
            lines_setting="PROMPTQ_API_MAX_LINES",
            bytes_setting="PROMPTQ_API_MAX_FILE_BYTES",
        )
    except InputError as exc:
        status = await store.fail_validating(
            batch_id,
            reason=f"input file {file_id} is invalid: {exc.total} problem(s), first: "
            f"{exc.errors[0]}",
            errors=batch_errors(exc.errors, exc.total),
            ttl_s=ttl_s,
        )
        logger.info(
            "batch %s: input %s rejected (%d problems): %s", batch_id, file_id, exc.total, status
        )
        return
    del data
    if parsed.endpoint != endpoint:
        first = parsed.requests[0].line
        problem = LineError(
            first,
            "url",
            f"'{parsed.endpoint}' differs from the batch's endpoint '{endpoint}' (every "
            "line's url must equal the endpoint the batch is created with)",
        )
        await _fail(store, batch_id, problem, ttl_s=ttl_s)
        return
    try:
        await producer.submit(parsed, batch_id=batch_id, priority=Priority.BULK, **(options or {}))
        # Enqueueing listed it by when it was enqueued; list it by when it was created,
        # as its Batch object says (else a small batch created later may list earlier).
        await store.redis.zadd(keys.BATCHES, {batch_id: created_at}, xx=True)
    except QueueFull as exc:  # the queue filled up between the create and now
        await _fail(store, batch_id, LineError(0, None, str(exc)), ttl_s=ttl_s)
    except BatchError as exc:
        # Cancelled (or expired by expire_stale_validation) while validating: the
        # producer found it no longer 'validating'. Finish a cancel that raced with
        # the enqueueing so no request is left behind.
        logger.info("batch %s was not enqueued: %s", batch_id, exc)
        batch = producer.batch(batch_id)
        if (await batch.info(with_stats=False)).status is Status.CANCELLING:
            await batch.cancel()


async def expire_stale_validation(
    store: ApiStore, stored: StoredBatch, *, ttl_s: int
) -> StoredBatch | None:
    """Fail a batch whose validation outlived its deadline (the replica validating it
    stopped); return it re-read, or None when nothing changed."""
    deadline = stored.api.get("validate_by")
    validating = stored.raw.get("status") == Status.VALIDATING
    if not validating or not deadline or time.time() < float(deadline):
        return None
    problem = LineError(
        0,
        None,
        "validation did not finish (the API process doing it stopped); create the batch again",
    )
    await _fail(store, stored.id, problem, ttl_s=ttl_s)
    return await store.batch(stored.id)


async def _fail(store: ApiStore, batch_id: str, problem: LineError, *, ttl_s: int) -> None:
    """Fail a validating batch for one ``problem``."""
    await store.fail_validating(
        batch_id, reason=str(problem), errors=batch_errors([problem], 1), ttl_s=ttl_s
    )
