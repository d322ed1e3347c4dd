"""Redis connections: a real server from a URL, or the embedded in-process server.

Both give an ``ArqRedis`` client (a ``redis.asyncio.Redis``) that serializes arq jobs
as JSON and uses promptq's queue, so producer, worker and CLI share one code path.

Redis restarts: redis-py retries a command whose connection broke (about 3 s of
backoff), but a command that needs a new connection while Redis is down fails at once.
Loops that must outlive a restart (the worker's claims, heartbeat and result flush, the
producer's followers) catch ``REDIS_DOWN``, back off, and report to the ``RedisHealth``
of their client, which logs one warning line when an outage starts and one line when it
ends, and counts the disruptions (failures and redis-py's own retries) that a worker
checks its claims after.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any
from urllib.parse import urlsplit

from arq.connections import ArqRedis
from redis.asyncio import ConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import AuthenticationError, ResponseError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from promptq.shared import keys, serialization
from promptq.shared.errors import ConfigError, RedisUnavailable
from promptq.shared.settings import redact_url

logger = logging.getLogger(__name__)

#: what a Redis outage (restart, failover, network cut) looks like to a client; redis-py
#: wraps socket errors in these (and BusyLoadingError, Redis replaying its AOF, is one)
REDIS_DOWN: tuple[type[Exception], ...] = (RedisConnectionError, RedisTimeoutError)


def is_redis_outage(exc: BaseException) -> bool:
    """True for ``REDIS_DOWN`` errors and errors raised because of one (redis-py turns a
    connection lost during WATCH into a ``WatchError``, for one)."""
    seen: BaseException | None = exc
    for _ in range(5):
        if seen is None:
            return False
        if isinstance(seen, REDIS_DOWN):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


async def redis_clock_offset(redis: ArqRedis) -> float:
    """Redis' clock minus this machine's, in seconds: times compared across machines
    (chat deadlines) are kept on Redis' clock."""
    seconds, micros = await redis.time()
    return float(seconds) + float(micros) / 1_000_000 - time.time()


class RedisHealth:
    """One client's view of Redis: one warning when an outage starts, one line when it
    ends, however many loops notice it.

    ``failed()`` after a command failed with one of ``REDIS_DOWN``, ``ok()`` after one
    succeeded. ``disruptions`` counts failures and redis-py's transparent retries on the
    client given this health (``connect(..., health=)``): a worker that sees it move
    checks its claims (a claim whose reply was lost, then retried, took requests nobody
    runs).
    """

    def __init__(self) -> None:
        self.down_since: float | None = None
        self.disruptions = 0

    def __repr__(self) -> str:
        state = "down" if self.down_since is not None else "up"
        return f"RedisHealth({state}, disruptions={self.disruptions})"

    def retried(self) -> None:
        """redis-py sent a command again after a broken connection."""
        self.disruptions += 1

    def failed(self, exc: BaseException, *, doing: str) -> None:
        self.disruptions += 1
        if self.down_since is None:
            self.down_since = time.monotonic()
            logger.warning(
                "Redis unreachable while %s (%s); retrying with backoff until it answers",
                doing,
                str(exc).rstrip(".") or type(exc).__name__,
            )
        else:
            logger.debug("Redis still unreachable while %s: %s", doing, exc)

    def ok(self) -> None:
        if self.down_since is not None:
            logger.info(
                "Redis answers again after %.1f s; carrying on",
                time.monotonic() - self.down_since,
            )
            self.down_since = None


class _CountingBackoff(ExponentialBackoff):
    """redis-py's exponential backoff that tells a ``RedisHealth`` about each retry."""

    def __init__(self, health: RedisHealth, *, cap: float, base: float) -> None:
        super().__init__(cap=cap, base=base)
        self.health = health

    def compute(self, failures: int) -> float:
        self.health.retried()
        return super().compute(failures)


_CLIENT_KW: dict[str, Any] = {
    "job_serializer": serialization.job_serializer,
    "job_deserializer": serialization.job_deserializer,
    "default_queue_name": keys.QUEUE,
}


async def connect(
    url: str,
    *,
    wait_s: float = 10.0,
    max_connections: int = 64,
    health: RedisHealth | None = None,
) -> ArqRedis:
    """Open a client for ``url`` and make sure Redis answers.

    Tries again with backoff for ``wait_s`` seconds while Redis does not answer (Redis
    restarting, a container starting), then raises ``RedisUnavailable`` with the URL
    (password hidden) and a hint. A Redis that answers but refuses (wrong password, no
    such database, an ACL) raises ``ConfigError`` at once: waiting would not help.
    redis-py's transparent retries of later commands are counted in ``health``.
    """
    deadline = time.monotonic() + wait_s
    delay = 0.1
    warned = False
    while True:
        try:
            await _probe(url, timeout_s=max(min(deadline - time.monotonic(), 5.0), 0.5))
            break
        except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise RedisUnavailable(
                    f"cannot reach Redis at {redact_url(url)}: {_reason(exc)}. Start one "
                    "(e.g. `redis-server` or `docker compose up -d redis`) or point "
                    "PROMPTQ_REDIS_URL / --redis-url at yours."
                ) from exc
            if not warned:  # once: the final error says it all
                warned = True
                logger.warning(
                    "Redis at %s not answering (%s); trying again for %.0fs",
                    redact_url(url),
                    _reason(exc),
                    wait_s,
                )
            await asyncio.sleep(min(delay, remaining))
            delay = min(delay * 2, 2.0)
    pool = ConnectionPool.from_url(
        url,
        max_connections=max_connections,
        socket_connect_timeout=5,
        health_check_interval=30,
        # Transparent reconnects for single commands during a Redis restart.
        retry=Retry(_CountingBackoff(health or RedisHealth(), cap=2.0, base=0.05), retries=5),
        retry_on_error=[RedisConnectionError, RedisTimeoutError],
    )
    return _owning(ArqRedis(pool, **_CLIENT_KW))


async def _probe(url: str, *, timeout_s: float) -> None:
    """One PING on one connection, no retries: an outage raises a connection error, a
    Redis that answers but refuses raises ``ConfigError`` with what to fix."""
    client: Redis = Redis.from_url(
        url,
        socket_connect_timeout=timeout_s,
        socket_timeout=timeout_s,
        single_connection_client=True,
    )
    try:
        await client.ping()
    except AuthenticationError as exc:
        raise ConfigError(
            f"Redis at {redact_url(url)} refused the credentials: {_reason(exc)}. Check the "
            "user and password in PROMPTQ_REDIS_URL / --redis-url "
            "(redis://USER:PASSWORD@HOST:PORT/DB; no password: redis://HOST:PORT/DB)."
        ) from exc
    except ResponseError as exc:
        text = str(exc)
        if "DB index is out of range" in text:
            database = urlsplit(url).path.lstrip("/") or "0"
            raise ConfigError(
                f"Redis at {redact_url(url)} has no database {database}: Redis numbers its "
                "databases from 0 (16 of them unless `databases` says otherwise); use e.g. "
                f"{redact_url(url).rsplit('/', 1)[0]}/0."
            ) from exc
        raise ConfigError(f"Redis at {redact_url(url)} refused PING: {_reason(exc)}.") from exc
    finally:
        await client.aclose()


def _reason(exc: BaseException) -> str:
    return str(exc).rstrip(".") or type(exc).__name__


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
