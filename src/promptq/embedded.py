"""Run workers inside this process: the embedded mode (no Redis server) and local runs.

``local_cluster`` gives a ``Producer`` wired to ``n`` in-process workers, either on an
in-process Redis (fakeredis: nothing to install, nothing persists) or on a real Redis
URL. ``promptq demo`` and ``promptq run`` without ``PROMPTQ_REDIS_URL`` use it.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator

from arq.connections import ArqRedis

from promptq.producer import Producer
from promptq.shared.connection import EmbeddedRedis, RedisHealth, connect
from promptq.shared.settings import Settings
from promptq.worker import LocalWorker

logger = logging.getLogger(__name__)


@contextlib.asynccontextmanager
async def local_cluster(settings: Settings, *, workers: int = 1) -> AsyncIterator[Producer]:
    """A producer plus ``workers`` in-process workers; embedded Redis unless
    ``settings.redis_url`` is set. Everything is closed on exit (in-flight requests get
    ``shutdown_grace_s``, as a worker process's do)."""
    embedded = EmbeddedRedis() if settings.redis_url is None else None

    async def client(health: RedisHealth | None = None) -> ArqRedis:
        if embedded is not None:
            return embedded.client()
        return await connect(
            settings.redis_url_or_default, wait_s=settings.redis_connect_wait_s, health=health
        )

    running: list[LocalWorker] = []
    producer_redis = await client()
    try:
        for _ in range(workers):
            health = RedisHealth()
            redis = await client(health)
            try:
                worker = LocalWorker(redis, settings, health=health)
                await worker.start()
            except BaseException:
                await redis.aclose()
                raise
            running.append(worker)
        yield Producer(producer_redis, settings=settings)
    finally:
        for worker in running:
            try:
                await worker.stop()
            finally:
                await worker.redis.aclose()
        await producer_redis.aclose()
