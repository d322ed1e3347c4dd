"""Run workers inside this process: the embedded mode (no Redis server) and local runs.

``local_cluster`` gives a ``Producer`` wired to ``n`` in-process workers, either on an
in-process Redis (fakeredis: nothing to install, nothing persists) or on a real Redis
URL. ``promptq demo`` and ``promptq run`` without ``PROMPTQ_REDIS_URL`` use it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

from arq.connections import ArqRedis

from promptq.producer import Producer
from promptq.shared.connection import EmbeddedRedis, connect
from promptq.shared.settings import Settings
from promptq.worker import PromptqWorker, create_worker

logger = logging.getLogger(__name__)


@contextlib.asynccontextmanager
async def local_cluster(settings: Settings, *, workers: int = 1) -> AsyncIterator[Producer]:
    """A producer plus ``workers`` in-process workers; embedded Redis unless
    ``settings.redis_url`` is set. Everything is closed on exit."""
    embedded = EmbeddedRedis() if settings.redis_url is None else None

    async def client() -> ArqRedis:
        if embedded is not None:
            return embedded.client()
        return await connect(settings.redis_url_or_default, wait_s=settings.redis_connect_wait_s)

    running: list[tuple[PromptqWorker, asyncio.Task[None]]] = []
    producer_redis = await client()
    try:
        for _ in range(workers):
            worker = create_worker(settings, redis=await client(), handle_signals=False)
            running.append((worker, asyncio.create_task(worker.async_run())))
        # wait until every worker announced itself, so tickets are spread over all
        for worker, task in running:
            ready = asyncio.create_task(worker.ready.wait())
            await asyncio.wait({ready, task}, return_when=asyncio.FIRST_COMPLETED)
            ready.cancel()
            if task.done():
                task.result()  # raise the worker's startup error
        yield Producer(producer_redis, settings=settings)
    finally:
        for worker, task in running:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await worker.close()
        await producer_redis.aclose()
