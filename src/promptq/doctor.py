"""``promptq doctor``: what a production deployment needs, checked, with how to fix it.

Each check answers ``ok``, ``warn`` (works, but something will bite: a Redis restart
that loses the queue) or ``fail`` (something is wrong now). Exit code 1 when any check
is not ``ok``. The Redis checks also run at worker and ``serve`` start
(:func:`redis_warnings`), where each problem is one WARNING line; the workers check
their own clock and upstream there too.

* Redis reachable, and new enough for the commands promptq uses (6.2: ``BLMOVE``,
  ``LMOVE``, ``GETDEL``);
* ``maxmemory-policy``: anything but ``noeviction`` lets Redis drop keys when memory is
  full, silently: queued requests and results disappear (BullMQ refuses to stay quiet
  about it for the same reason);
* persistence: without AOF a Redis restart loses what was queued since the last RDB
  snapshot (or everything, with no snapshots);
* live workers (heartbeats in the last liveness window);
* the upstream answering ``GET /models`` with the configured key (from this machine);
* this machine's clock against Redis' (promptq uses Redis' clock for deadlines and
  liveness; a skewed machine mis-reads the age of heartbeats it prints).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Literal

from arq.connections import ArqRedis

from promptq.shared.connection import connect, redis_clock_offset
from promptq.shared.errors import PromptqError
from promptq.shared.registry import WorkerRegistry, liveness_window_s
from promptq.shared.settings import Settings, redact_url

logger = logging.getLogger(__name__)

Verdict = Literal["ok", "warn", "fail"]
#: the oldest Redis with every command promptq sends
MIN_REDIS = (6, 2)
#: clocks further apart than this are a problem
MAX_SKEW_S = 1.0


@dataclass(frozen=True, slots=True)
class Check:
    name: str
    verdict: Verdict
    detail: str
    fix: str = ""

    def as_dict(self) -> dict[str, str]:
        return {"check": self.name, "verdict": self.verdict, "detail": self.detail,
                "fix": self.fix}  # fmt: skip


def _version(text: str) -> tuple[int, ...]:
    parts = []
    for piece in text.split(".")[:3]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts)


async def redis_checks(redis: ArqRedis) -> list[Check]:
    """Version, eviction policy, persistence and clock of the Redis ``redis`` talks to."""
    checks = []
    info: dict[str, Any] = await redis.info()
    version = str(info.get("redis_version", "0"))
    if _version(version) >= MIN_REDIS:
        checks.append(Check("redis version", "ok", f"Redis {version}"))
    else:
        checks.append(
            Check(
                "redis version",
                "fail",
                f"Redis {version} is older than {'.'.join(map(str, MIN_REDIS))}, which "
                "promptq needs (BLMOVE, LMOVE, GETDEL)",
                "upgrade Redis to 6.2 or newer (7.x recommended)",
            )
        )
    policy = str(info.get("maxmemory_policy", "noeviction"))
    if policy == "noeviction":
        checks.append(Check("maxmemory-policy", "ok", "noeviction: nothing is dropped"))
    else:
        checks.append(
            Check(
                "maxmemory-policy",
                "fail",
                f"{policy}: when memory is full Redis silently drops keys, queued requests "
                "and results among them",
                "set `maxmemory-policy noeviction` (redis.conf or CONFIG SET); size "
                "`maxmemory` for your largest batches",
            )
        )
    if int(info.get("aof_enabled", 0)):
        checks.append(Check("persistence", "ok", "AOF on"))
    else:
        snapshots = "RDB snapshots only" if info.get("rdb_last_save_time") else "none"
        checks.append(
            Check(
                "persistence",
                "warn",
                f"AOF off ({snapshots}): a Redis restart loses what was queued since the "
                "last snapshot",
                "set `appendonly yes` (and `appendfsync everysec`)",
            )
        )
    offset = await redis_clock_offset(redis)
    if abs(offset) <= MAX_SKEW_S:
        checks.append(Check("clock", "ok", f"{round(offset * 1000):+d} ms from Redis' clock"))
    else:
        checks.append(
            Check(
                "clock",
                "fail",
                f"this machine's clock is {offset:+.1f} s off Redis' clock",
                "run NTP (chrony, systemd-timesyncd) on every machine",
            )
        )
    return checks


async def redis_warnings(redis: ArqRedis, *, who: str) -> None:
    """Log each Redis check that is not ok (worker and ``serve`` start); never raises."""
    try:
        checks = await redis_checks(redis)
    except Exception as exc:  # advice only: never keep a worker from starting
        logger.debug("startup checks failed: %s", exc)
        return
    for check in checks:
        if check.verdict != "ok":
            logger.warning("%s: %s: %s; fix: %s", who, check.name, check.detail, check.fix)


async def run_checks(settings: Settings) -> list[Check]:
    """Every check, in order; one that cannot run is a ``fail`` that says why."""
    url = redact_url(settings.redis_url_or_default)
    try:
        redis = await connect(settings.redis_url_or_default, wait_s=2.0, max_connections=4)
    except PromptqError as exc:
        return [Check("redis", "fail", str(exc), "start Redis or fix PROMPTQ_REDIS_URL")]
    checks = [Check("redis", "ok", f"{url} answers")]
    try:
        checks += await redis_checks(redis)
        registry = WorkerRegistry(redis, heartbeat_s=settings.heartbeat_s)
        live = await registry.live()
        window = liveness_window_s(settings.heartbeat_s)
        if live:
            hosts = sorted({str(w.get("host", "?")) for w in live})
            checks.append(Check("workers", "ok", f"{len(live)} live on {', '.join(hosts)}"))
        else:
            checks.append(
                Check(
                    "workers",
                    "fail",
                    f"no worker beat in the last {window:g} s: nothing will run",
                    "start `promptq worker` (same PROMPTQ_REDIS_URL) on one machine or many",
                )
            )
    finally:
        await redis.aclose()
    checks.append(await upstream_check(settings))
    return checks


async def upstream_check(settings: Settings) -> Check:
    """The upstream answering ``GET /models`` with the configured key, from here."""
    if settings.backend != "openai":
        return Check("upstream", "ok", f"backend {settings.backend}: no HTTP upstream")
    from promptq.worker.backends.http import HttpBackend

    backend = HttpBackend(
        base_url=settings.upstream_url,
        api_key=settings.api_key,
        concurrency=1,
        timeout_s=5,
        keepalive="off",
    )
    await backend.start()
    try:
        started = time.monotonic()
        problem = await backend.check()
        took_ms = (time.monotonic() - started) * 1000
    finally:
        await backend.close()
    if problem is None:
        return Check("upstream", "ok", f"{backend.base_url} answers GET /models ({took_ms:.0f} ms)")
    return Check(
        "upstream",
        "fail",
        problem,
        "check PROMPTQ_UPSTREAM_URL and PROMPTQ_API_KEY where the workers run",
    )
