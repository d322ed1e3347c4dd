"""The promptq worker: an arq ``Worker`` that polls only when it has room and wakes at once.

Two changes to arq's loop, both to serve requests sooner with less overhead:

* **Wake-ups instead of waiting for the next poll.** Producers publish on
  ``promptq:wakeup`` when they enqueue; the worker subscribes and polls immediately, so a
  batch starts within milliseconds, not arq's 0.5 s poll delay. The poll delay remains
  as a fallback if a message is lost. A ``chat`` message goes to the dispatcher's chat
  loop instead: chat requests wait in their own list, not in arq's queue.
* **Capacity gating.** A worker with fewer free slots than its low-water mark does not
  take jobs, so tickets go to workers that can use them.

``WorkerSettings`` also works with plain ``arq promptq.worker.WorkerSettings`` (then
without wake-ups or gating).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from typing import Any, ClassVar

from arq import Worker
from arq.connections import ArqRedis

from promptq.shared import keys, serialization
from promptq.shared.connection import connect, is_redis_outage, redis_health
from promptq.shared.ratelimit import RateLimiter
from promptq.shared.scripts import Scripts
from promptq.shared.settings import Settings, redact_url
from promptq.worker import jobs
from promptq.worker.dispatcher import Dispatcher
from promptq.worker.fetch import Fetcher
from promptq.worker.retry import RetryPolicy

logger = logging.getLogger(__name__)


class _RedisOutageInOneLine(logging.Filter):
    """arq logs a job that raised with its traceback. When the cause is a Redis outage
    (a ticket caught by a restart), one line says enough; the dispatcher re-checks its
    batches once Redis answers again (``redis_health.disruptions``)."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if exc is not None and is_redis_outage(exc):
            record.exc_info = None
            record.exc_text = None
            redis_health.disruptions += 1
        return True


logging.getLogger("arq.worker").addFilter(_RedisOutageInOneLine())


async def startup(ctx: dict[str, Any]) -> None:
    """arq ``on_startup``: open the upstream session and the dispatcher."""
    settings: Settings = ctx.get("settings") or Settings()
    ctx["settings"] = settings
    limiter = RateLimiter(
        ctx["redis"],
        upstream_url=settings.upstream_url,
        rpm=settings.rpm,
        tpm=settings.tpm,
        per_model=settings.limit_per_model,
    )
    fetcher = Fetcher(
        base_url=settings.upstream_url,
        api_key=settings.api_key,
        concurrency=settings.concurrency,
        timeout_s=settings.timeout_s,
        policy=RetryPolicy(max_attempts=settings.max_attempts),
        limiter=limiter,
    )
    await fetcher.__aenter__()
    dispatcher = Dispatcher(
        redis=ctx["redis"],
        fetcher=fetcher,
        concurrency=settings.concurrency,
        heartbeat_s=settings.heartbeat_s,
        upstream_label=settings.upstream_url,
        adaptive=settings.adaptive_concurrency,
        chat_poll_s=settings.poll_delay_s,
    )
    await dispatcher.start()
    ctx.update(
        fetcher=fetcher,
        dispatcher=dispatcher,
        scripts=Scripts(ctx["redis"]),
        result_ttl_s=settings.result_ttl_s,
    )
    logger.info(
        "worker %s ready: upstream %s, concurrency %d%s, %d attempt(s), timeout %.0fs, %s",
        dispatcher.worker_id,
        settings.upstream_url,
        settings.concurrency,
        " (adaptive)" if settings.adaptive_concurrency else "",
        settings.max_attempts,
        settings.timeout_s,
        limiter,
    )


async def shutdown(ctx: dict[str, Any]) -> None:
    """arq ``on_shutdown``: finish or hand back in-flight work, close the session."""
    dispatcher: Dispatcher | None = ctx.get("dispatcher")
    if dispatcher is not None:
        settings: Settings = ctx["settings"]
        await dispatcher.close(grace_s=settings.shutdown_grace_s)
    fetcher: Fetcher | None = ctx.get("fetcher")
    if fetcher is not None:
        await fetcher.__aexit__(None, None, None)


class WorkerSettings:
    """arq settings (``arq promptq.worker.WorkerSettings`` works too)."""

    functions: ClassVar[list[Any]] = [jobs.claim, jobs.aggregate]
    queue_name = keys.QUEUE
    on_startup = startup
    on_shutdown = shutdown
    job_serializer = serialization.job_serializer
    job_deserializer = serialization.job_deserializer
    keep_result = 0  # results live in promptq's own keys
    max_jobs = 32  # tickets finish in milliseconds; this bounds claims in progress
    # arq re-runs a job whose worker died once its lease (job_timeout + 10 s) expires;
    # tickets take milliseconds and aggregation seconds, so keep that lease short.
    job_timeout = 60
    max_tries = 5
    poll_delay = 0.5
    health_check_interval = 60
    log_results = False


class PromptqWorker(Worker):
    """arq Worker with wake-ups and capacity gating (see the module docstring)."""

    def __init__(self, *, settings: Settings, **kwargs: Any) -> None:
        options: dict[str, Any] = {
            k: v for k, v in vars(WorkerSettings).items() if not k.startswith("_")
        }
        options["poll_delay"] = settings.poll_delay_s
        options.update(kwargs)
        ctx = options.pop("ctx", None) or {}
        ctx["settings"] = settings
        super().__init__(ctx=ctx, **options)
        self.settings = settings
        self._wakeup = asyncio.Event()
        #: set once connected and started: the worker takes jobs from then on
        self.ready = asyncio.Event()

    @property
    def dispatcher(self) -> Dispatcher | None:
        return self.ctx.get("dispatcher")

    async def main(self) -> None:
        if self._pool is None:
            url = self.settings.redis_url_or_default
            self._pool = await connect(url, wait_s=self.settings.redis_connect_wait_s)
            logger.info("connected to Redis at %s", redact_url(url))
        self.ctx["redis"] = self.pool
        if self.on_startup:
            await self.on_startup(self.ctx)
        dispatcher = self.dispatcher
        assert dispatcher is not None
        dispatcher.on_capacity = self._wakeup.set
        self.ready.set()
        listener = asyncio.create_task(self._listen_for_wakeups())
        outage_delay_s = 0.0
        try:
            while True:
                self._wakeup.clear()
                try:
                    if dispatcher.can_take_work():
                        await self._poll_iteration()
                    else:
                        self._reap_tasks()
                    if self.burst and await self._burst_finished(dispatcher):
                        return
                except Exception as exc:
                    if not is_redis_outage(exc):
                        raise
                    # Redis restarting: requests in flight carry on and their results
                    # wait in the dispatcher; poll again with backoff.
                    redis_health.failed(exc, doing="polling the queue")
                    outage_delay_s = min(max(outage_delay_s * 2, 0.1), 1.0)
                    await asyncio.sleep(outage_delay_s)
                    continue
                outage_delay_s = 0.0
                # asyncio.timeout, not wait_for: on Python 3.11 wait_for can swallow the
                # cancellation that arq's SIGTERM handler sends, and the worker keeps going.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self.poll_delay_s):
                        await self._wakeup.wait()
        finally:
            listener.cancel()
            await asyncio.gather(listener, return_exceptions=True)

    async def close(self) -> None:
        """arq's close, but tolerant of cancelled job tasks and with redis-py 5's aclose()."""
        if not self._handle_signals:
            self.handle_sig(signal.SIGUSR1)
        if not self._pool:
            return
        await asyncio.gather(*self.tasks.values(), return_exceptions=True)
        with contextlib.suppress(Exception):  # Redis may be gone already
            await self.pool.delete(self.health_check_key)
        if self.on_shutdown:
            await self.on_shutdown(self.ctx)
        await self.pool.aclose()
        self._pool = None

    async def start_jobs(self, job_ids: list[bytes]) -> None:
        # One ticket claims every free slot, so starting many at once only makes the
        # later ones find nothing; two leave room for an aggregator job beside a ticket.
        # When a job ends, poll again at once: due jobs left behind must not wait for the
        # next wake-up or the poll delay.
        dispatcher = self.dispatcher
        for job_id in job_ids:
            if dispatcher is not None and (not dispatcher.can_take_work() or self.job_counter >= 2):
                return
            await super().start_jobs([job_id])
            task = self.tasks.get(job_id.decode())
            if task is not None:
                task.add_done_callback(lambda _: self._wakeup.set())

    async def run_job(self, job_id: str, score: int) -> None:
        try:
            await super().run_job(job_id, score)
        except Exception as exc:
            if not is_redis_outage(exc):
                raise
            # arq could not start or finish the job's bookkeeping: it runs the job again
            # once its lease expires. Say so now, once per outage, rather than when the
            # poll loop collects the task (by then Redis may be back).
            redis_health.failed(exc, doing=f"running job {job_id}")

    def _reap_tasks(self) -> None:
        for job_id, task in list(self.tasks.items()):
            if task.done():
                del self.tasks[job_id]
                task.result()

    async def _burst_finished(self, dispatcher: Dispatcher) -> bool:
        if self.tasks or not dispatcher.idle:
            return False
        return int(await self.pool.zcard(self.queue_name)) == 0

    async def _listen_for_wakeups(self) -> None:
        delay = 0.1
        while True:
            pubsub = self.pool.pubsub()
            try:
                await pubsub.subscribe(keys.WAKEUP_CHANNEL)
                delay = 0.1
                while True:
                    message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=5)
                    if message is None:
                        continue
                    dispatcher = self.dispatcher
                    if message.get("data") == keys.CHAT_WAKEUP and dispatcher is not None:
                        dispatcher.chat_waiting()  # chat requests skip the arq queue
                    else:
                        self._wakeup.set()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # Redis restarting: polling covers the gap
                logger.debug("wake-up listener reconnecting: %s", exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
            finally:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]


def create_worker(
    settings: Settings, *, redis: ArqRedis | None = None, **kwargs: Any
) -> PromptqWorker:
    """A worker for ``settings``; pass ``redis`` to share a client (embedded mode, tests)."""
    return PromptqWorker(settings=settings, redis_pool=redis, **kwargs)
