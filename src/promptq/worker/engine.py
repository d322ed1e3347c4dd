"""One worker process's engine: lanes, slots, backend, dispatcher, supervisor, wired.

    Engine(redis, settings)
      ├─ sources:    ChatSource (chat lane), BatchSource (batches)   worker.sources
      ├─ ShardDriver the batch-api route's shards (openai backend)   worker.sources.batchapi
      ├─ Slots       capacity + AIMD                                 worker.slots
      ├─ Dispatcher  runs jobs, writes results                       worker.dispatcher
      │    └─ Executor + backend (openai | python:...)               worker.execute, .backends
      ├─ Aggregator  finished batches' stats                         worker.aggregate
      └─ Supervisor  heartbeat, recheck, reaping                     worker.supervisor
                       └─ Recovery                                   worker.recovery

The engine is started next to arq's own worker loop (which runs the aggregator's
fallback jobs): by ``promptq worker``, by the embedded mode, or by arq's on_startup
hook (``arq promptq.worker.WorkerSettings``). ``stop()`` drains: no new claims, running
requests get ``shutdown_grace_s``, the rest go back to their queues, every result is
written, the heartbeat is removed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
import uuid
from typing import Any

from arq.connections import ArqRedis

from promptq.doctor import redis_warnings
from promptq.shared.batches import BatchStore
from promptq.shared.chatqueue import ChatQueue
from promptq.shared.connection import RedisHealth, redis_clock_offset
from promptq.shared.prices import PriceTable, Spend
from promptq.shared.ratelimit import RateLimiter
from promptq.shared.registry import WorkerRegistry
from promptq.shared.settings import Settings
from promptq.shared.webhooks import parse_backoff, parse_hosts
from promptq.worker import backends
from promptq.worker.aggregate import Aggregator
from promptq.worker.backends.http import HttpBackend
from promptq.worker.breaker import CircuitBreaker
from promptq.worker.cache import ResponseCache
from promptq.worker.dispatcher import Dispatcher
from promptq.worker.execute import Executor
from promptq.worker.provider import BatchApiClient
from promptq.worker.recovery import Recovery
from promptq.worker.retry import RetryPolicy
from promptq.worker.slots import Slots
from promptq.worker.sources.batch import BatchSource
from promptq.worker.sources.batchapi import ShardDriver
from promptq.worker.sources.chat import ChatSource
from promptq.worker.supervisor import Supervisor
from promptq.worker.webhooks import WebhookSender

logger = logging.getLogger(__name__)

#: how long an idle chat lane blocks on the queue before looking again
CHAT_BLOCK_S = 1.0
#: at start, how long to wait for the wake-up channel before going on without it
LISTEN_WAIT_S = 5.0
#: against a llama.cpp server with N slots a worker holds 2N requests: one running and
#: one waiting per slot, so a slot never idles while the next request travels
SERVER_SLOTS_DEPTH = 2


def new_worker_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


class Engine:
    """Everything one worker process runs besides arq's loop (see the module docstring).

    Raises ``ConfigError`` when the backend cannot be loaded (before touching Redis)."""

    def __init__(
        self,
        redis: ArqRedis,
        settings: Settings,
        *,
        health: RedisHealth | None = None,
        worker_id: str | None = None,
    ) -> None:
        self.redis = redis
        self.settings = settings
        self.health = health or RedisHealth()
        self.worker_id = worker_id or new_worker_id()
        self.backend = backends.load(settings)
        capacity = settings.concurrency
        if self.backend.parallelism is not None:
            capacity = min(capacity, self.backend.parallelism)
        self.store = BatchStore(redis)
        self.registry = WorkerRegistry(redis, heartbeat_s=settings.heartbeat_s)
        self.limiter = RateLimiter(
            redis,
            upstream_url=settings.upstream_url,
            rpm=settings.rpm,
            tpm=settings.tpm,
            per_model=settings.limit_per_model,
        )
        self.breaker = (
            CircuitBreaker(
                redis, upstream_url=settings.upstream_url, down_s=settings.upstream_down_s
            )
            if isinstance(self.backend, HttpBackend)
            else None
        )
        self.executor = Executor(
            self.backend,
            policy=RetryPolicy(max_attempts=settings.max_attempts),
            limiter=self.limiter,
            breaker=self.breaker,
        )
        self.slots = Slots(capacity, adaptive=settings.adaptive_concurrency)
        self.prices = PriceTable.load(settings.prices)
        self.spend = Spend()
        self.dispatcher = Dispatcher(
            executor=self.executor,
            slots=self.slots,
            worker_id=self.worker_id,
            health=self.health,
            cache=ResponseCache(redis, worker_id=self.worker_id, timeout_s=settings.timeout_s),
        )
        self.aggregator = Aggregator(
            self.store,
            default_ttl_s=settings.result_ttl_s,
            health=self.health,
            webhook_url=settings.webhook_url,
        )
        #: delivers finished batches' webhook events (any worker delivers any event)
        self.webhooks = WebhookSender(
            redis,
            secret=settings.webhook_secret,
            backoff_s=parse_backoff(settings.webhook_backoff_s),
            hosts=parse_hosts(settings.webhook_hosts),
        )
        self.aggregator.on_finished = self.webhooks.poke
        self.chat = ChatSource(
            ChatQueue(redis),
            worker_id=self.worker_id,
            health=self.health,
            block_s=CHAT_BLOCK_S,
            cache_ttl_s=settings.cache_ttl_s,
            prices=self.prices,
            spend=self.spend,
        )
        self.batches = BatchSource(
            self.store,
            worker_id=self.worker_id,
            health=self.health,
            poll_s=settings.poll_delay_s,
            on_final=self.aggregator.schedule,
            prices=self.prices,
            cache_ttl_s=settings.cache_ttl_s,
            spend=self.spend,
        )
        self.sources = (self.chat, self.batches)  # chat first: a handler waits for each
        # the batch-api route needs an upstream with a Batch API: the openai backend's
        self.shards = (
            ShardDriver(
                self.store,
                BatchApiClient(
                    base_url=settings.upstream_url,
                    api_key=settings.api_key,
                    timeout_s=settings.timeout_s,
                ),
                worker_id=self.worker_id,
                health=self.health,
                poll_s=settings.batch_api_poll_s,
                prices=self.prices,
                on_final=self.aggregator.schedule,
                spend=self.spend,
                heartbeat_s=settings.heartbeat_s,
            )
            if isinstance(self.backend, HttpBackend)
            else None
        )
        self.recovery = Recovery(
            registry=self.registry, dispatcher=self.dispatcher, sources=self.sources
        )
        self.supervisor = Supervisor(
            registry=self.registry,
            store=self.store,
            dispatcher=self.dispatcher,
            recovery=self.recovery,
            health=self.health,
            limiter=self.limiter,
            breaker=self.breaker,
            beat_fields=self.beat_fields,
            suspect=lambda: self.batches.suspect,
        )
        self.started_at = time.time()
        self.ready = asyncio.Event()
        self._supervisor_task: asyncio.Task[None] | None = None
        self._check_task: asyncio.Task[None] | None = None
        self._redis_check: asyncio.Task[None] | None = None
        self._started = False

    def __repr__(self) -> str:
        return f"Engine({self.worker_id}, {self.backend!r}, {self.slots!r})"

    @property
    def label(self) -> str:
        return self.backend.label

    def beat_fields(self) -> dict[str, Any]:
        return {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "started_at": f"{self.started_at:.3f}",
            "concurrency": self.slots.capacity,
            "limit": int(self.slots.limit),
            "in_flight": self.executor.in_flight,
            "claimed": self.slots.held,
            "done": self.dispatcher.done,
            "failed": self.dispatcher.failed,
            "retries": self.dispatcher.retries,
            "upstream": self.backend.label,
            "cost_usd": f"{self.spend.cost_usd:.6f}",
            "saved_usd": f"{self.spend.saved_usd:.6f}",
            "cached": self.spend.cached,
            "tokens": self.spend.tokens,
        }

    async def start(self) -> None:
        """Open the backend, announce the worker, start claiming."""
        await self.executor.__aenter__()
        self._started = True
        self.chat.clock_offset_s = await redis_clock_offset(self.redis)
        await self.supervisor.beat()
        self._supervisor_task = asyncio.create_task(self.supervisor.run(), name="supervisor")
        self.dispatcher.start_feeds(self.sources)
        await self.webhooks.start()
        self._redis_check = asyncio.create_task(redis_warnings(self.redis, who="worker"))
        # ready once it hears wake-ups (the fallback poll covers a Redis that refuses)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(LISTEN_WAIT_S):
                await self.batches.listening.wait()
        if isinstance(self.backend, HttpBackend):
            self._check_task = asyncio.create_task(self._check_upstream(self.backend))
        if self.shards is not None:
            self.shards.clock_offset_s = self.chat.clock_offset_s
            self.batches.on_wake.append(self.shards.poke)
            await self.shards.start()
        self.ready.set()
        logger.info(
            "worker %s ready: %s, concurrency %d%s, %d attempt(s), timeout %.0fs, %s",
            self.worker_id,
            self.backend.label,
            self.slots.capacity,
            " (adaptive)" if self.slots.adaptive else "",
            self.settings.max_attempts,
            self.settings.timeout_s,
            self.limiter,
        )

    async def _check_upstream(self, backend: HttpBackend) -> None:
        try:
            problem = await backend.check()
            slots = None if problem else await backend.server_slots()
        except Exception as exc:  # a check is advice; never let it stop the worker
            logger.debug("upstream check failed: %s", exc)
            return
        if problem:
            logger.warning("%s", problem)
        if slots is not None and SERVER_SLOTS_DEPTH * slots < self.slots.capacity:
            # more would only wait inside the server, each on a connection of its own
            self.slots.cap(SERVER_SLOTS_DEPTH * slots)
            logger.info(
                "upstream %s runs %d request(s) at once (llama.cpp --parallel): this "
                "worker holds at most %d",
                backend.base_url,
                slots,
                self.slots.capacity,
            )

    @property
    def idle(self) -> bool:
        """Nothing running, nothing to write, nothing aggregating, no shard stepping."""
        shards_idle = self.shards is None or self.shards.idle
        return self.dispatcher.idle and self.aggregator.idle and shards_idle

    async def stop(self, *, grace_s: float | None = None) -> None:
        """Drain (see the module docstring) and close; safe to call once started or not."""
        if not self._started:
            return
        self._started = False
        for task in (self._check_task, self._redis_check):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        await self.webhooks.stop()
        grace = self.settings.shutdown_grace_s if grace_s is None else grace_s
        if self.shards is not None:
            await self.shards.stop()
        await self.dispatcher.stop_feeds()
        try:
            await self.dispatcher.drain(grace_s=grace)
            await self.batches.wait_stops()
            await self.aggregator.close()
        except Exception as exc:  # Redis gone: dead-worker recovery hands the rest back
            logger.warning("could not hand everything back (%s); another worker will", exc)
        if self._supervisor_task is not None:
            self._supervisor_task.cancel()
            await asyncio.gather(self._supervisor_task, return_exceptions=True)
        try:
            await self.registry.forget(self.worker_id)
        except Exception as exc:  # Redis gone: the heartbeat expires on its own
            logger.warning("could not remove the heartbeat: %s", exc)
        await self.executor.__aexit__(None, None, None)
