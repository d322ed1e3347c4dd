"""One call from Python: ``promptq.run``, ``promptq.arun``, ``promptq.stream``.

    import promptq
    run = promptq.run(["What is 2+2?", {"custom_id": "q2", "prompt": "..."}], concurrency=64)
    run.results      # list of Result, in input order
    run.stats        # BatchStats: succeeded, failed, p50_ms, throughput_rps, ...

The same pipeline as ``promptq run``: embedded (an in-process queue and workers, no
Redis server) unless ``PROMPTQ_REDIS_URL`` (or ``redis_url=``) is set, in which case the
batch goes through that Redis, with ``workers`` in-process workers beside any others
(``workers=0``: only the running ones). Every ``Settings`` field is an option
(``concurrency``, ``max_attempts``, ``timeout_s``, ``rpm``, ``tpm``, ``upstream_url``,
``api_key``, ``model``, ``backend``, ...); what is not given comes from the environment.

``run`` works in a plain script and inside a running event loop (a Jupyter notebook):
there it runs the pipeline in a thread of its own and blocks until it is done.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from promptq.embedded import local_cluster
from promptq.producer import Batch, ParsedBatch, Producer, parse_items
from promptq.shared.errors import ConfigError
from promptq.shared.models import BatchStats, Result
from promptq.shared.settings import Settings

Prompts = Iterable[str | Mapping[str, Any]]


@dataclass(frozen=True, slots=True)
class RunResult:
    """What ``promptq.run`` returns: every result in input order, and the batch's stats."""

    batch_id: str
    results: list[Result]
    stats: BatchStats

    @property
    def succeeded(self) -> list[Result]:
        return [r for r in self.results if r.ok]

    @property
    def failed(self) -> list[Result]:
        return [r for r in self.results if not r.ok]

    def __repr__(self) -> str:
        return (
            f"RunResult({self.batch_id}: {self.stats.succeeded} succeeded, "
            f"{self.stats.failed} failed, p50 {self.stats.p50_ms:.0f} ms, "
            f"{self.stats.throughput_rps:.1f} req/s)"
        )


def _settings(settings: Settings | None, options: Mapping[str, Any]) -> Settings:
    unknown = sorted(set(options) - set(Settings.model_fields))
    if unknown:
        raise TypeError(
            f"unknown option(s) {', '.join(unknown)}; promptq.run takes the Settings "
            f"fields: {', '.join(sorted(Settings.model_fields))}"
        )
    try:
        if settings is None:
            return Settings(**options)
        return settings.model_copy(update=dict(options))
    except ValidationError as exc:
        problems = "; ".join(f"{e['loc'][0]}: {e['msg']}" for e in exc.errors() if e["loc"])
        raise ConfigError(f"invalid option: {problems}") from exc


@contextlib.asynccontextmanager
async def _pipeline(settings: Settings, workers: int) -> AsyncIterator[Producer]:
    if settings.redis_url is not None and workers == 0:
        async with Producer.from_url(settings.redis_url, settings=settings) as producer:
            yield producer
        return
    async with local_cluster(settings, workers=max(workers, 1)) as producer:
        yield producer


async def _submit(producer: Producer, prompts: Prompts | ParsedBatch, **kw: Any) -> Batch:
    parsed = (
        prompts
        if isinstance(prompts, ParsedBatch)
        else parse_items(prompts, default_model=producer.settings.model, source="promptq.run()")
    )
    return await producer.submit(parsed, **kw)


async def stream(
    prompts: Prompts,
    *,
    workers: int = 1,
    settings: Settings | None = None,
    priority: str = "bulk",
    batch_id: str | None = None,
    route: str = "realtime",
    deadline_s: float | None = None,
    max_cost_usd: float | None = None,
    **options: Any,
) -> AsyncIterator[Result]:
    """Yield results as they complete (any order); see the module docstring."""
    resolved = _settings(settings, options)
    async with _pipeline(resolved, workers) as producer:
        batch = await _submit(
            producer, prompts, priority=priority, batch_id=batch_id, route=route,
            deadline_s=deadline_s, max_cost_usd=max_cost_usd,
        )  # fmt: skip
        async for result in batch.as_completed():
            yield result


async def arun(
    prompts: Prompts,
    *,
    workers: int = 1,
    settings: Settings | None = None,
    priority: str = "bulk",
    batch_id: str | None = None,
    route: str = "realtime",
    deadline_s: float | None = None,
    max_cost_usd: float | None = None,
    **options: Any,
) -> RunResult:
    """Run ``prompts`` (strings, or request dicts in either input form) through the
    pipeline and return every result in input order with the batch's stats. Raises
    ``InputError`` (listing every bad item) before anything is sent. ``route``,
    ``deadline_s``, ``max_cost_usd``: as ``Producer.submit``'s; every other option is a
    setting (``cache_ttl_s=3600`` turns the cache on)."""
    resolved = _settings(settings, options)
    parsed = parse_items(prompts, default_model=resolved.model, source="promptq.run()")
    async with _pipeline(resolved, workers) as producer:
        batch = await _submit(
            producer, parsed, priority=priority, batch_id=batch_id, route=route,
            deadline_s=deadline_s, max_cost_usd=max_cost_usd,
        )  # fmt: skip
        by_id = {r.custom_id: r async for r in batch.as_completed()}
        stats = await batch.wait()
    results = [by_id[r.custom_id] for r in parsed.requests if r.custom_id in by_id]
    return RunResult(batch_id=batch.id, results=results, stats=stats)


def run(prompts: Prompts, **kwargs: Any) -> RunResult:
    """``arun`` for code that is not async: a plain script, or a notebook cell (inside a
    running event loop, the pipeline runs in a thread of its own)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(arun(prompts, **kwargs))
    outcome: list[RunResult] = []
    failure: list[BaseException] = []

    def in_thread() -> None:
        try:
            outcome.append(asyncio.run(arun(prompts, **kwargs)))
        except BaseException as exc:
            failure.append(exc)

    thread = threading.Thread(target=in_thread, name="promptq.run", daemon=True)
    thread.start()
    thread.join()
    if failure:
        raise failure[0]
    return outcome[0]
