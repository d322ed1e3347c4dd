"""The aiohttp application behind ``promptq serve``: ``create_app(settings)``.

Stateless: everything lives in Redis (uploaded files included), so any number of
replicas can run behind a load balancer. Routes:

    POST /v1/files     GET /v1/files      GET /v1/files/{id}     DELETE /v1/files/{id}
    GET /v1/files/{id}/content
    POST /v1/batches                  GET /v1/batches        GET /v1/batches/{id}
    POST /v1/batches/{id}/cancel      GET /v1/batches/{id}/results[?follow=true]
    POST /v1/chat/completions  /v1/responses  /v1/embeddings  /v1/completions
    POST /v1/moderations (``"stream": true`` on the first two)   GET /v1/models
    GET /healthz (no token)           GET /metrics
    GET / (the dashboard's page, no token)   GET /dashboard/overview, /dashboard/batches/{id}
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from promptq.api import batches, chat, dashboard, files
from promptq.api.auth import auth_middleware
from promptq.api.errors import SERVER_ERROR, error_middleware, error_response, json_response
from promptq.api.lane import ChatLane
from promptq.api.metrics import Metrics
from promptq.api.state import LANE, METRICS, PRODUCER, SETTINGS, STORE, TASKS
from promptq.api.store import ApiStore
from promptq.doctor import redis_warnings
from promptq.producer import Producer
from promptq.shared.connection import connect
from promptq.shared.models import ENDPOINTS
from promptq.shared.settings import Settings, redact_url
from promptq.shared.webhooks import parse_hosts

logger = logging.getLogger(__name__)

#: JSON bodies (chat requests with long contexts, batch creation) up to this size
MAX_JSON_BODY_BYTES = 32 * 1024 * 1024
#: on shutdown, how long batch validations under way may finish before they are cancelled
SHUTDOWN_GRACE_S = 10.0
HEALTH_TIMEOUT_S = 2.0


def create_app(settings: Settings) -> web.Application:
    """The HTTP API. Connects to ``settings.redis_url_or_default`` on startup."""
    app = web.Application(
        middlewares=[error_middleware, auth_middleware(settings.api_token)],
        client_max_size=MAX_JSON_BODY_BYTES,
    )
    parse_hosts(settings.webhook_hosts)  # a bad PROMPTQ_WEBHOOK_HOSTS stops the start
    app[SETTINGS] = settings
    app[TASKS] = set()
    app[METRICS] = Metrics()
    app.cleanup_ctx.append(_redis)
    app.router.add_post("/v1/files", files.upload_file)
    app.router.add_get("/v1/files", files.list_files)
    app.router.add_get("/v1/files/{file_id}", files.retrieve_file)
    app.router.add_delete("/v1/files/{file_id}", files.delete_file)
    app.router.add_get("/v1/files/{file_id}/content", files.file_content)
    app.router.add_post("/v1/batches", batches.create_batch)
    app.router.add_get("/v1/batches", batches.list_batches)
    app.router.add_get("/v1/batches/{batch_id}", batches.retrieve_batch)
    app.router.add_post("/v1/batches/{batch_id}/cancel", batches.cancel_batch)
    app.router.add_get("/v1/batches/{batch_id}/results", batches.batch_results)
    app[chat.MODELS_CACHE] = {}
    for endpoint in ENDPOINTS:  # chat completions, responses, embeddings, ...
        app.router.add_post(endpoint, chat.lane_endpoint(endpoint))
    app.router.add_get("/v1/models", chat.list_models)
    dashboard.routes(app)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", metrics)
    return app


async def _redis(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    redis = await connect(
        settings.redis_url_or_default,
        wait_s=settings.redis_connect_wait_s,
        # each results follower holds a connection while it waits, as does the chat
        # lane's listener
        max_connections=settings.api_redis_connections,
    )
    await redis_warnings(redis, who="serve")  # the checks of `promptq doctor`
    producer = Producer(redis, settings=settings)
    app[PRODUCER] = producer
    app[STORE] = ApiStore(redis)
    app[LANE] = ChatLane(producer)
    try:
        yield
    finally:
        await app[LANE].close()
        tasks = app[TASKS]
        if tasks:
            logger.info(
                "waiting up to %g s for %d batch validation(s)", SHUTDOWN_GRACE_S, len(tasks)
            )
            _done, pending = await asyncio.wait(set(tasks), timeout=SHUTDOWN_GRACE_S)
            for task in pending:
                task.cancel()  # its batch stays 'validating' until its deadline fails it
            await asyncio.gather(*pending, return_exceptions=True)
        await redis.aclose()


async def healthz(request: web.Request) -> web.Response:
    """GET /healthz: 200 when Redis answers, else 503. Needs no token."""
    settings = request.app[SETTINGS]
    try:
        async with asyncio.timeout(HEALTH_TIMEOUT_S):
            await request.app[STORE].redis.ping()
    except Exception as exc:
        url = redact_url(settings.redis_url_or_default)
        logger.warning("health check: Redis at %s does not answer: %s", url, exc)
        return error_response(
            503,
            f"Redis at {url} does not answer ({type(exc).__name__}).",
            type=SERVER_ERROR,
            code="redis_unavailable",
        )
    return json_response({"status": "ok", "redis": "ok"})


async def metrics(request: web.Request) -> web.Response:
    """GET /metrics: Prometheus text format, cluster-wide numbers read from Redis."""
    body = await request.app[METRICS].render(request.app[STORE].redis, request.app[SETTINGS])
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})
