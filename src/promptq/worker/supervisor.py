"""The supervisor: a worker's periodic work, once per heartbeat.

* the heartbeat (``shared.registry``), carrying the worker's counters and the latency
  histogram that /metrics reads;
* after Redis trouble (this worker's client failed, or redis-py sent a command again,
  or a claim failed without an answer): the recheck of what it owns against what it
  holds (``worker.recovery``);
* the recovery of dead workers' requests;
* the sweep of finished batches whose TTL is up (their keys UNLINKed, freed off
  Redis' main thread);
* the cooldowns other workers set, for a worker without RPM/TPM limits (which keeps
  them locally, so that it makes no extra round trip per request), and whether another
  worker opened the upstream's circuit breaker.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from typing import Any

from promptq.shared import keys
from promptq.shared.batches import BatchStore
from promptq.shared.connection import REDIS_DOWN, RedisHealth
from promptq.shared.ratelimit import RateLimiter
from promptq.shared.registry import WorkerRegistry
from promptq.worker.breaker import CircuitBreaker
from promptq.worker.dispatcher import Dispatcher
from promptq.worker.recovery import Recovery

logger = logging.getLogger(__name__)


class Supervisor:
    """Runs ``tick`` every ``heartbeat_s`` until cancelled."""

    def __init__(
        self,
        *,
        registry: WorkerRegistry,
        store: BatchStore,
        dispatcher: Dispatcher,
        recovery: Recovery,
        health: RedisHealth,
        limiter: RateLimiter | None,
        breaker: CircuitBreaker | None,
        beat_fields: Callable[[], Mapping[str, Any]],
        suspect: Callable[[], bool],
    ) -> None:
        self.registry = registry
        self.store = store
        self.dispatcher = dispatcher
        self.recovery = recovery
        self.health = health
        self.limiter = limiter
        self.breaker = breaker
        self.beat_fields = beat_fields
        self.suspect = suspect
        #: disruptions up to this count have been rechecked
        self.checked = health.disruptions

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.registry.heartbeat_s)
            await self.tick()

    async def tick(self) -> None:
        try:
            await self.beat()
            self.health.ok()
            if self.health.disruptions != self.checked or self.suspect():
                seen = self.health.disruptions
                if await self.recovery.recheck():
                    self.checked = seen
            await self.recovery.reap_dead()
            await self.sweep()
            if self.limiter is not None and not self.limiter.enforcing:
                await self.limiter.refresh()
            if self.breaker is not None and not self.breaker.tripped:
                await self.breaker.refresh()
        except REDIS_DOWN as exc:  # one line per outage; the next beat tries again
            self.health.failed(exc, doing="sending the heartbeat")
        except Exception as exc:
            logger.warning("heartbeat failed: %s", exc)

    async def sweep(self) -> None:
        """UNLINK finished batches whose TTL is up (any worker; each once)."""
        await self.store.sweep()

    async def beat(self) -> None:
        """One heartbeat, with the latency histogram since the last one (for /metrics)."""
        counts, total_ms = self.dispatcher.take_latency()
        try:
            async with self.registry.redis.pipeline(transaction=True) as pipe:
                await self.registry.beat(self.dispatcher.worker_id, self.beat_fields(), client=pipe)
                if counts:
                    for bucket, n in counts.items():
                        pipe.hincrby(keys.METRICS_LATENCY, bucket, n)
                    pipe.hincrby(keys.METRICS_LATENCY, "count", sum(counts.values()))
                    pipe.hincrbyfloat(keys.METRICS_LATENCY, "sum", total_ms)
                await pipe.execute()
        except BaseException:
            self.dispatcher.give_back_latency(counts, total_ms)  # counted at the next beat
            raise
