"""Redis connections: a real server from a URL, or the embedded in-process server.

Both give an ``ArqRedis`` client (a ``redis.asyncio.Redis``) that serializes arq jobs
as JSON and uses promptq's queue, so producer, worker and CLI share one code path.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from arq.connections import ArqRedis
from redis.asyncio import ConnectionPool
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from promptq.shared import keys, serialization
from promptq.shared.errors import RedisUnavailable
from promptq.shared.settings import redact_url

logger = logging.getLogger(__name__)

_CLIENT_KW: dict[str, Any] = {
    "job_serializer": serialization.job_serializer,
    "job_deserializer": serialization.job_deserializer,
    "default_queue_name": keys.QUEUE,
}


async def connect(url: str, *, wait_s: float = 10.0, max_connections: int = 64) -> ArqRedis:
    """Open a client for ``url`` and make sure Redis answers.

    Retries with backoff for up to ``wait_s`` seconds (Redis restarting, container
    starting), then raises ``RedisUnavailable`` with the URL (password hidden) and a hint.
    """
    pool = ConnectionPool.from_url(
        url,
        max_connections=max_connections,
        socket_connect_timeout=5,
        health_check_interval=30,
        # Transparent reconnects for single commands during a Redis restart.
        retry=Retry(ExponentialBackoff(cap=2.0, base=0.05), retries=5),
        retry_on_error=[RedisConnectionError, RedisTimeoutError],
    )
    client = _owning(ArqRedis(pool, **_CLIENT_KW))
    deadline = time.monotonic() + wait_s
    delay = 0.1
    while True:
        try:
            await client.ping()
            return client
        except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
            if time.monotonic() + delay > deadline:
                await client.aclose()
                raise RedisUnavailable(
                    f"cannot reach Redis at {redact_url(url)}: {exc}. Start one "
                    "(e.g. `redis-server` or `docker compose up -d redis`) or point "
                    "PROMPTQ_REDIS_URL / --redis-url at yours."
                ) from exc
            logger.warning("Redis at %s not answering (%s); retrying", redact_url(url), exc)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)


class EmbeddedRedis:
    """An in-process Redis (fakeredis) for running without any Redis server.

    Every client from ``client()`` sees the same data. Nothing persists: it lives and
    dies with the process, which is what ``promptq demo`` and local ``promptq run`` want.
    """

    def __init__(self) -> None:
        from fakeredis import FakeServer

        self.server = FakeServer()

    def client(self) -> ArqRedis:
        try:
            from fakeredis import FakeAsyncRedisConnection as connection_class
        except ImportError:  # fakeredis < 2.30
            from fakeredis.aioredis import (  # type: ignore[assignment]
                FakeConnection as connection_class,
            )

        pool = ConnectionPool(connection_class=connection_class, server=self.server)
        return _owning(ArqRedis(pool, **_CLIENT_KW))


def _owning(client: ArqRedis) -> ArqRedis:
    # The client owns its pool: aclose() closes the connections too (what from_url does).
    client.auto_close_connection_pool = True
    return client
