"""The dashboard: ``GET /`` of ``promptq serve``, a page that polls two JSON endpoints.

* ``GET /`` (no token: the page holds no data) answers ``static/dashboard.html``, one
  file with its script and styles (no build step, no library: the charts are drawn on
  a canvas). It asks for the API token once, keeps it in the tab's ``sessionStorage``
  and sends it as ``Authorization: Bearer``: never in a URL that a log could keep.
* ``GET /dashboard/overview?offset=&limit=&status=``: queue depth, the limiter
  (cooldowns, open circuit breakers), the live workers, and one page of batches newest
  first (``promptq:batches``; 1,000 batches are 20 pages, never one answer).
* ``GET /dashboard/batches/{id}``: one batch: its state and spend, live percentiles from
  its tally, a latency histogram, throughput over time (completions per interval from
  its event stream, the newest ``SERIES_EVENTS`` at most), errors by code with sample
  messages. The page's cancel button is ``POST /v1/batches/{id}/cancel``.
"""

from __future__ import annotations

import math
from importlib import resources
from typing import Any

import orjson
from aiohttp import web

from promptq.api.errors import json_response, not_found
from promptq.api.state import PRODUCER, SETTINGS
from promptq.shared import keys
from promptq.shared.errors import BatchNotFound
from promptq.shared.models import BatchInfo
from promptq.shared.overview import read_overview
from promptq.shared.stats import BUCKET_PREFIX, ERROR_PREFIX, bucket_value, stats_from_tally
from promptq.shared.status import Status

#: the newest events read for a batch's throughput series
SERIES_EVENTS = 20_000
#: results read to find sample messages of each error code
SAMPLE_SCAN = 2_000
SAMPLES_PER_CODE = 3
PAGE_MAX = 200


async def page(_request: web.Request) -> web.Response:
    """GET /: the dashboard page."""
    html = resources.files("promptq.api").joinpath("static/dashboard.html").read_bytes()
    return web.Response(
        body=html,
        content_type="text/html",
        headers={
            "Cache-Control": "no-store",
            # the page runs only its own script and talks only to this server
            "Content-Security-Policy": "default-src 'self'; script-src 'self' 'unsafe-inline'; "
            "style-src 'self' 'unsafe-inline'; img-src 'self' data:; frame-ancestors 'none'",
            "X-Content-Type-Options": "nosniff",
        },
    )


def _int(value: str | None, default: int, low: int, high: int) -> int:
    try:
        return max(low, min(high, int(value))) if value is not None else default
    except ValueError:
        return default


def _summary(info: BatchInfo) -> dict[str, Any]:
    return {
        "id": info.id,
        "status": info.status.value,
        "total": info.total,
        "done": info.done,
        "succeeded": info.succeeded,
        "failed": info.failed,
        "route": info.route,
        "priority": info.priority.value,
        "created_at": info.created_at,
        "completed_at": info.completed_at,
        "cost_usd": info.cost_usd,
    }


async def overview(request: web.Request) -> web.Response:
    """GET /dashboard/overview: queue, limiter, workers, one page of batches."""
    settings = request.app[SETTINGS]
    found = await read_overview(
        request.app[PRODUCER],
        heartbeat_s=settings.heartbeat_s,
        offset=_int(request.query.get("offset"), 0, 0, 10**9),
        limit=_int(request.query.get("limit"), 25, 1, PAGE_MAX),
        status=request.query.get("status") or None,
    )
    return json_response(
        {
            "now": found.now,
            "queued": found.queued,
            "chat_queued": found.chat_queued,
            "batch_count": found.batch_count,
            "next_offset": found.next_offset,
            "batches": [_summary(info) for info in found.batches],
            "workers": found.workers,
            "limits": found.limits,
            "rpm": settings.rpm,
            "tpm": settings.tpm,
        }
    )


def _histogram(tally: dict[str, str]) -> list[dict[str, float]]:
    """The tally's fine buckets, merged into about 4 per decade for a chart."""
    merged: dict[int, int] = {}
    for field, count in tally.items():
        if field.startswith(BUCKET_PREFIX):
            value = bucket_value(int(field[len(BUCKET_PREFIX) :]))
            slot = math.floor(math.log10(max(value, 0.001)) * 4)
            merged[slot] = merged.get(slot, 0) + int(count)
    return [{"from_ms": round(10 ** (slot / 4), 3), "to_ms": round(10 ** ((slot + 1) / 4), 3),
             "count": merged[slot]} for slot in sorted(merged)]  # fmt: skip


async def _series(redis: Any, batch_id: str) -> list[dict[str, float]]:
    """Completions per interval over the batch's life, from its event stream's ids (ms)."""
    entries = await redis.xrevrange(keys.events(batch_id), count=SERIES_EVENTS)
    stamps = sorted(int(entry_id.decode().split("-")[0]) for entry_id, fields in entries
                    if b"c" in fields)  # fmt: skip
    if not stamps:
        return []
    span_ms = max(stamps[-1] - stamps[0], 1)
    step_ms = max(100, math.ceil(span_ms / 60 / 100) * 100)  # at most ~60 points
    counts: dict[int, int] = {}
    for stamp in stamps:
        slot = (stamp - stamps[0]) // step_ms
        counts[slot] = counts.get(slot, 0) + 1
    slots = range(max(counts) + 1)
    return [{"t": (stamps[0] + slot * step_ms) / 1000, "rps": counts.get(slot, 0) * 1000 / step_ms}
            for slot in slots]  # fmt: skip


async def _samples(redis: Any, batch_id: str, codes: set[str]) -> dict[str, list[str]]:
    samples: dict[str, list[str]] = {code: [] for code in codes}
    if not codes:
        return samples
    seen = 0
    async for _cid, raw in redis.hscan_iter(keys.results(batch_id), count=500):
        seen += 1
        if seen > SAMPLE_SCAN:
            break
        line = orjson.loads(raw)
        error = line.get("error") or {}
        code = error.get("code")
        if code in samples and len(samples[code]) < SAMPLES_PER_CODE:
            samples[code].append(str(error.get("message", ""))[:300])
    return samples


async def batch_detail(request: web.Request) -> web.Response:
    """GET /dashboard/batches/{id}: one batch's state, percentiles, charts and errors."""
    producer = request.app[PRODUCER]
    redis = producer.redis
    batch_id = request.match_info["batch_id"]
    try:
        info = await producer.batch(batch_id).info()
    except BatchNotFound as exc:
        raise not_found(str(exc), param="batch_id") from exc
    raw = await redis.hgetall(keys.tally(batch_id))  # type: ignore[misc]
    tally = {k.decode(): v.decode() for k, v in raw.items()}
    seconds, micros = await redis.time()
    now = seconds + micros / 1e6
    started = info.in_progress_at or info.created_at or now
    ended = info.completed_at or info.last_result_at or now
    live = stats_from_tally(
        tally,
        succeeded=info.succeeded,
        failed=info.failed,
        wall_s=max(ended - started, 0.0),
        batch_api=info.route == "batch-api",
    )
    errors = {field[len(ERROR_PREFIX) :]: int(count) for field, count in tally.items()
              if field.startswith(ERROR_PREFIX)}  # fmt: skip
    samples = await _samples(redis, batch_id, set(errors))
    return json_response(
        {
            "now": now,
            "batch": info.to_json_dict(),
            "live_stats": live.model_dump(mode="json"),
            "histogram": _histogram(tally),
            "series": await _series(redis, batch_id),
            "errors": [
                {"code": code, "count": count, "samples": samples.get(code, [])}
                for code, count in sorted(errors.items(), key=lambda kv: -kv[1])
            ],
            "cancellable": not info.status.terminal and info.status != Status.CANCELLING,
        }
    )


def routes(app: web.Application) -> None:
    app.router.add_get("/", page)
    app.router.add_get("/dashboard/overview", overview)
    app.router.add_get("/dashboard/batches/{batch_id}", batch_detail)
