"""Worker processes: promptq's engine beside arq's worker loop, through arq's public API.

promptq owns its request queues (the runnable index of batches, the chat queue: see
``worker.sources``) so that a request is picked up milliseconds after it is queued, in
groups, by whichever worker has room. arq runs the jobs it is good at: the aggregator's
durable fallback (``worker.aggregate``), from the arq queue ``promptq:queue``, with
JSON (de)serializers (never pickle) and the settings of ``WorkerSettings``.

Two ways to run one:

* ``promptq worker`` (``run_worker``): connects, starts the engine and arq's loop
  (``arq.worker.create_worker(WorkerSettings, handle_signals=False, ...)``), and on
  SIGTERM/SIGINT drains the engine (a second signal: hand back at once);
* ``arq promptq.worker.WorkerSettings``: arq runs the process and starts and drains the
  engine in its ``on_startup`` / ``on_shutdown`` hooks.

``LocalWorker`` is the same pair on a client someone else owns (the embedded mode,
tests).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from typing import Any, ClassVar

from arq import func
from arq.connections import ArqRedis, RedisSettings
from arq.worker import Worker, create_worker

from promptq.shared import keys, serialization
from promptq.shared.chatqueue import ChatQueue
from promptq.shared.connection import RedisHealth, connect
from promptq.shared.settings import DEFAULT_REDIS_URL, Settings, redact_url
from promptq.worker.aggregate import aggregate_job
from promptq.worker.engine import Engine

logger = logging.getLogger(__name__)

#: how often a ``--burst`` worker checks whether everything is done
BURST_CHECK_S = 0.1


async def on_startup(ctx: dict[str, Any]) -> None:
    """arq ``on_startup`` (``arq promptq.worker.WorkerSettings``): start the engine."""
    settings: Settings = ctx.get("settings") or Settings()
    engine = Engine(ctx["redis"], settings)
    ctx.update(engine=engine, store=engine.store, result_ttl_s=settings.result_ttl_s)
    await engine.start()


async def on_shutdown(ctx: dict[str, Any]) -> None:
    """arq ``on_shutdown``: drain the engine."""
    engine: Engine | None = ctx.get("engine")
    if engine is not None:
        await engine.stop()


def _redis_settings() -> RedisSettings:
    """For plain arq, which takes its Redis from the settings class: PROMPTQ_REDIS_URL."""
    return RedisSettings.from_dsn(os.environ.get("PROMPTQ_REDIS_URL") or DEFAULT_REDIS_URL)


class WorkerSettings:
    """arq settings (``arq promptq.worker.WorkerSettings`` runs a promptq worker)."""

    functions: ClassVar[list[Any]] = [func(aggregate_job, name="aggregate")]
    queue_name = keys.QUEUE
    on_startup = on_startup
    on_shutdown = on_shutdown
    job_serializer = serialization.job_serializer
    job_deserializer = serialization.job_deserializer
    keep_result = 0  # results live in promptq's own keys
    max_jobs = 4
    # arq runs a job whose worker died again once its lease (job_timeout + 10 s) ends;
    # aggregating a million results takes seconds
    job_timeout = 300
    max_tries = 5
    poll_delay = 0.5
    health_check_interval = 60
    log_results = False
    # read by plain arq only (the promptq command passes its own client)
    redis_settings = _redis_settings()


def settings_dict() -> dict[str, Any]:
    """``WorkerSettings`` as the keyword arguments of arq's ``Worker``."""
    return {k: v for k, v in vars(WorkerSettings).items() if not k.startswith("_")}


class JobRunner:
    """arq's worker loop for promptq's arq jobs, on a client the caller owns."""

    def __init__(self, redis: ArqRedis, *, ctx: dict[str, Any], poll_delay_s: float) -> None:
        self.worker: Worker = create_worker(
            settings_dict(),
            redis_pool=redis,
            handle_signals=False,
            ctx=ctx,
            on_startup=None,
            on_shutdown=None,
            poll_delay=poll_delay_s,
        )
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self.worker.async_run(), name="arq jobs")

    @property
    def busy(self) -> bool:
        return any(not t.done() for t in self.worker.tasks.values())

    async def stop(self) -> None:
        """Stop polling and cancel running jobs (arq runs a cancelled job again later;
        ours do nothing twice). The client stays open: its owner closes it."""
        if self._task is None:
            return
        self.worker.handle_sig(signal.SIGUSR1)  # what Worker.close does first
        await asyncio.gather(self._task, *self.worker.tasks.values(), return_exceptions=True)
        self._task = None


class LocalWorker:
    """An engine and a job runner on a client the caller owns (embedded mode, tests)."""

    def __init__(
        self, redis: ArqRedis, settings: Settings, *, health: RedisHealth | None = None
    ) -> None:
        self.redis = redis
        self.settings = settings
        self.engine = Engine(redis, settings, health=health)
        self.jobs = JobRunner(
            redis,
            ctx={
                "store": self.engine.store,
                "settings": settings,
                "result_ttl_s": settings.result_ttl_s,
                "webhook_url": settings.webhook_url,
            },
            poll_delay_s=settings.poll_delay_s,
        )

    @property
    def worker_id(self) -> str:
        return self.engine.worker_id

    async def start(self) -> None:
        await self.engine.start()
        self.jobs.start()

    async def stop(self, *, grace_s: float | None = None) -> None:
        await self.engine.stop(grace_s=grace_s)
        await self.jobs.stop()

    async def finished(self) -> bool:
        """Burst mode: nothing queued, running or aggregating."""
        if not self.engine.idle or self.jobs.busy:
            return False
        if await self.engine.store.runnable(1):
            return False
        if self.engine.shards is not None and await self.engine.store.next_shards(1):
            return False
        return await ChatQueue(self.redis).length() == 0

    async def __aenter__(self) -> LocalWorker:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


async def run_worker(settings: Settings, *, burst: bool = False) -> None:
    """``promptq worker``: run until SIGTERM/SIGINT (or, with ``burst``, until everything
    queued is done), then drain. Raises ``RedisUnavailable`` when Redis does not answer,
    ``ConfigError`` when the backend cannot be loaded."""
    url = settings.redis_url_or_default
    health = RedisHealth()
    redis = await connect(url, wait_s=settings.redis_connect_wait_s, health=health)
    logger.info("connected to Redis at %s", redact_url(url))
    stop = asyncio.Event()
    local: LocalWorker | None = None
    loop = asyncio.get_running_loop()

    def on_signal(sig: signal.Signals) -> None:
        if stop.is_set():
            logger.warning("%s again: handing in-flight requests back now", sig.name)
            if local is not None:
                local.engine.dispatcher.hurry()
            return
        held = local.engine.slots.held if local is not None else 0
        logger.info(
            "%s: draining: %d in-flight request(s) may finish for up to %.0fs, the rest "
            "go back to the queue (send %s again to hand them back now)",
            sig.name,
            held,
            settings.shutdown_grace_s,
            sig.name,
        )
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)
    try:
        local = LocalWorker(redis, settings, health=health)
        await local.start()
        if burst:
            while not stop.is_set() and not await local.finished():
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(BURST_CHECK_S):
                        await stop.wait()
        else:
            await stop.wait()
    finally:
        started = time.monotonic()
        if local is not None:
            await local.stop()
            d = local.engine.dispatcher
            logger.info(
                "worker %s stopped in %.1fs: %d succeeded, %d failed, %d retries",
                local.worker_id,
                time.monotonic() - started,
                d.done,
                d.failed,
                d.retries,
            )
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        await redis.aclose()
