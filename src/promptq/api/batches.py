"""``/v1/batches``: create, list, retrieve, cancel; plus ``/v1/batches/{id}/results``
(a promptq extension: NDJSON of result lines, ``?follow=true`` streams them live)."""

from __future__ import annotations

import asyncio
from typing import Any

from aiohttp import web

from promptq.api.errors import (
    ApiError,
    bad_request,
    json_response,
    list_limit,
    not_found,
    queue_full,
    read_json_object,
    unknown_cursor,
)
from promptq.api.intake import expire_stale_validation, logged, validate_and_enqueue
from promptq.api.objects import COMPLETION_WINDOW, batch_object
from promptq.api.state import PRODUCER, SETTINGS, STORE, TASKS
from promptq.api.store import StoredBatch, UnknownCursor
from promptq.api.streaming import stream_lines
from promptq.producer.producer import new_batch_id, route_options
from promptq.shared import keys
from promptq.shared.errors import BatchNotFound, InputError, QueueFull
from promptq.shared.models import ENDPOINTS
from promptq.shared.results import BATCH_API
from promptq.shared.routes import MARKER_BATCH, MARKER_SHARD, ROUTES, parse_duration
from promptq.shared.webhooks import parse_hosts

MAX_METADATA_PAIRS = 16
MAX_METADATA_KEY_CHARS = 64
MAX_METADATA_VALUE_CHARS = 512
DEFAULT_LIST_LIMIT = 20
MAX_LIST_LIMIT = 100


def _no_batch(batch_id: str) -> ApiError:
    return not_found(
        f"No batch '{batch_id}': wrong id, or it expired (finished batches are kept "
        "PROMPTQ_RESULT_TTL_S seconds).",
        code="batch_not_found",
    )


def _required_str(body: dict[str, Any], field: str, hint: str) -> str:
    value = body.get(field)
    if value is None:
        raise bad_request(
            f"Missing required parameter '{field}': {hint}.",
            param=field,
            code="missing_required_parameter",
        )
    if not isinstance(value, str) or not value:
        raise bad_request(
            f"'{field}' must be a non-empty string: {hint}.", param=field, code="invalid_type"
        )
    return value


def _metadata(value: Any) -> dict[str, str] | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise bad_request(
            "'metadata' must be an object of string keys and string values.",
            param="metadata",
            code="invalid_type",
        )
    if len(value) > MAX_METADATA_PAIRS:
        raise bad_request(
            f"'metadata' has {len(value)} pairs; at most {MAX_METADATA_PAIRS}.",
            param="metadata",
            code="invalid_metadata",
        )
    for key, item in value.items():
        if len(key) > MAX_METADATA_KEY_CHARS:
            raise bad_request(
                f"metadata key '{key[:20]}...' is longer than {MAX_METADATA_KEY_CHARS} characters.",
                param=f"metadata.{key[:20]}",
                code="invalid_metadata",
            )
        if not isinstance(item, str) or len(item) > MAX_METADATA_VALUE_CHARS:
            raise bad_request(
                f"metadata value of '{key}' must be a string of at most "
                f"{MAX_METADATA_VALUE_CHARS} characters.",
                param=f"metadata.{key}",
                code="invalid_metadata",
            )
    return value


#: metadata keys that set promptq's options of a batch (the rest is the caller's own)
OPTION_KEYS = (
    "promptq_route",
    "promptq_deadline",
    "promptq_max_cost_usd",
    "promptq_cache",
    "promptq_webhook_url",
)


def batch_options(
    metadata: dict[str, str] | None, *, webhook_hosts: tuple[str, ...] = ()
) -> dict[str, Any]:
    """promptq's options of a batch from its metadata (``Producer.submit`` keywords):
    ``promptq_route`` (realtime | batch-api), ``promptq_deadline`` (45s, 30m, 2h, 1d),
    ``promptq_max_cost_usd`` (USD), ``promptq_cache`` (a TTL), ``promptq_webhook_url``
    (a host of ``webhook_hosts``, if any); 400 naming the key."""
    options: dict[str, Any] = {}
    for key, value in (metadata or {}).items():
        if not key.startswith("promptq_") or key in (MARKER_BATCH, MARKER_SHARD):
            continue  # the caller's own, or the marker of another promptq's shard
        param = f"metadata.{key}"
        if key not in OPTION_KEYS:
            raise bad_request(
                f"Unknown promptq option '{key}'; use {', '.join(OPTION_KEYS)}.",
                param=param,
                code="invalid_metadata",
            )
        try:
            if key == "promptq_route":
                if value not in ROUTES:
                    raise ValueError(f"use one of {', '.join(ROUTES)}")
                options["route"] = value
            elif key == "promptq_deadline":
                options["deadline_s"] = parse_duration(value)
            elif key == "promptq_cache":
                options["cache_ttl_s"] = max(int(parse_duration(value)), 1)
            elif key == "promptq_webhook_url":
                options["webhook_url"] = value
            else:
                options["max_cost_usd"] = float(value)
        except ValueError as exc:
            raise bad_request(f"{key}: {exc}", param=param, code="invalid_metadata") from exc
    if "deadline_s" in options and options.get("route") != BATCH_API:
        raise bad_request(
            "promptq_deadline goes with promptq_route 'batch-api'.",
            param="metadata.promptq_deadline",
            code="invalid_metadata",
        )
    try:
        route_options(**options, webhook_hosts=webhook_hosts)
    except InputError as exc:
        problem = "; ".join(e.message for e in exc.errors)
        raise bad_request(
            f"metadata: {problem}", param="metadata", code="invalid_metadata"
        ) from exc
    return options


async def create_batch(request: web.Request) -> web.Response:
    """POST /v1/batches: a batch of the uploaded file's requests; validated in the
    background (status ``validating``, then ``in_progress`` or ``failed``)."""
    body = await read_json_object(request)
    file_id = _required_str(
        body, "input_file_id", "the id of a file uploaded with POST /v1/files (purpose=batch)"
    )
    endpoint = _required_str(body, "endpoint", f"one of {', '.join(ENDPOINTS)}")
    if endpoint not in ENDPOINTS:
        raise bad_request(
            f"Unsupported endpoint '{endpoint}'; promptq runs {', '.join(ENDPOINTS)}.",
            param="endpoint",
            code="invalid_endpoint",
        )
    window = _required_str(body, "completion_window", f"'{COMPLETION_WINDOW}'")
    if window != COMPLETION_WINDOW:
        raise bad_request(
            f"Unsupported completion_window '{window}'; use '{COMPLETION_WINDOW}'.",
            param="completion_window",
            code="invalid_completion_window",
        )
    metadata = _metadata(body.get("metadata"))
    hosts = parse_hosts(request.app[SETTINGS].webhook_hosts)
    options = batch_options(metadata, webhook_hosts=hosts)
    store = request.app[STORE]
    if await store.file(file_id) is None:
        raise not_found(
            f"No file '{file_id}' to create the batch from: upload it first with "
            "POST /v1/files (purpose=batch); uploads expire after PROMPTQ_API_FILE_TTL_S.",
            param="input_file_id",
            code="file_not_found",
        )
    settings = request.app[SETTINGS]
    if settings.max_queued is not None:
        stored_file = await store.file(file_id)
        adding = stored_file.lines if stored_file is not None else 0
        try:
            await request.app[PRODUCER].check_backpressure(adding)
        except QueueFull as exc:
            raise queue_full(str(exc)) from exc
    batch_id = new_batch_id()
    stored = await store.create_validating(
        batch_id,
        endpoint=endpoint,
        input_file_id=file_id,
        completion_window=window,
        metadata=metadata,
        ttl_s=settings.result_ttl_s,
        validation_timeout_s=settings.api_validation_timeout_s,
    )
    job = validate_and_enqueue(
        producer=request.app[PRODUCER],
        store=store,
        settings=settings,
        batch_id=batch_id,
        file_id=file_id,
        endpoint=endpoint,
        created_at=float(stored.api["created_at"]),
        options=options,
    )
    task = asyncio.create_task(
        logged(job, f"validating batch {batch_id} (input {file_id})"), name=f"validate {batch_id}"
    )
    tasks = request.app[TASKS]
    tasks.add(task)
    task.add_done_callback(tasks.discard)
    return json_response(batch_object(batch_id, stored.raw, stored.stats, stored.api))


async def _load(request: web.Request, batch_id: str) -> StoredBatch:
    store = request.app[STORE]
    stored = await store.batch(batch_id)
    if stored is None:
        raise _no_batch(batch_id)
    ttl_s = request.app[SETTINGS].result_ttl_s
    return await expire_stale_validation(store, stored, ttl_s=ttl_s) or stored


async def retrieve_batch(request: web.Request) -> web.Response:
    """GET /v1/batches/{batch_id}."""
    stored = await _load(request, request.match_info["batch_id"])
    return json_response(batch_object(stored.id, stored.raw, stored.stats, stored.api))


async def cancel_batch(request: web.Request) -> web.Response:
    """POST /v1/batches/{batch_id}/cancel: requests not yet sent are not sent; finished
    results stay (the cancelled ones are in the error file with ``batch_cancelled``)."""
    batch_id = request.match_info["batch_id"]
    await _load(request, batch_id)
    try:
        await request.app[PRODUCER].batch(batch_id).cancel()
    except BatchNotFound as exc:
        raise _no_batch(batch_id) from exc
    stored = await _load(request, batch_id)
    return json_response(batch_object(stored.id, stored.raw, stored.stats, stored.api))


async def list_batches(request: web.Request) -> web.Response:
    """GET /v1/batches?after=&limit=: newest first, cursor pagination as OpenAI's."""
    limit = list_limit(request, default=DEFAULT_LIST_LIMIT, maximum=MAX_LIST_LIMIT)
    after = request.query.get("after") or None
    store = request.app[STORE]
    try:
        page, has_more = await store.page(keys.BATCHES, store.batches, after=after, limit=limit)
    except UnknownCursor:
        raise unknown_cursor(str(after), "batch") from None
    return json_response(
        {
            "object": "list",
            "data": [batch_object(b.id, b.raw, b.stats, b.api) for b in page],
            "first_id": page[0].id if page else None,
            "last_id": page[-1].id if page else None,
            "has_more": has_more,
        }
    )


def _flag(request: web.Request, name: str) -> bool:
    raw = request.query.get(name, "false").lower()
    if raw in ("true", "1", "yes"):
        return True
    if raw in ("false", "0", "no", ""):
        return False
    raise bad_request(f"'{name}' must be true or false, got '{raw}'.", param=name)


async def batch_results(request: web.Request) -> web.StreamResponse:
    """GET /v1/batches/{batch_id}/results[?follow=true]: every result line (successes and
    failures) as NDJSON; with ``follow`` they stream as they finish, until the batch ends."""
    batch_id = request.match_info["batch_id"]
    follow = _flag(request, "follow")
    await _load(request, batch_id)
    batch = request.app[PRODUCER].batch(batch_id)
    lines = batch.as_completed_raw() if follow else batch.raw_results()
    return await stream_lines(request, lines, content_type="application/x-ndjson", live=follow)
