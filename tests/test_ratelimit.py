"""Cluster-wide limits: the limiter against the real Redis, then real workers against the
mock in enforcing mode."""

from __future__ import annotations

import pytest
from arq.connections import ArqRedis

from promptq import Producer
from promptq.embedded import local_cluster
from promptq.mock import MockConfig, MockServer
from promptq.shared.ratelimit import RateLimiter, estimate_tokens, parse_duration_s
from promptq.shared.settings import Settings

from .conftest import WorkerProcs


def limiter(redis: ArqRedis, **kw: int | None) -> RateLimiter:
    return RateLimiter(redis, upstream_url="http://up/v1", rpm=kw.get("rpm"), tpm=kw.get("tpm"))


async def test_requests_are_spaced_evenly_across_workers(redis: ArqRedis) -> None:
    a, b = limiter(redis, rpm=600), limiter(redis, rpm=600)  # two workers, one upstream
    waits = [await (a if i % 2 else b).reserve("m", 1) for i in range(6)]
    # 600 rpm = one request every 100 ms, whoever sends it
    for i, wait in enumerate(waits):
        assert wait == pytest.approx(0.1 * i, abs=0.03)


async def test_token_budget_books_estimates_and_gives_back_the_unused(redis: ArqRedis) -> None:
    lim = limiter(redis, tpm=6000)  # a minute's bucket: 6000 tokens at once
    assert await lim.reserve("m", 6000) == pytest.approx(0, abs=0.03)
    # the bucket is empty now: 600 more tokens take 6 s
    assert await lim.reserve("m", 600) == pytest.approx(6.0, abs=0.1)
    await lim.settle_tokens("m", booked=6600, used=600)  # most of it was not used
    assert await lim.reserve("m", 600) == pytest.approx(0, abs=0.1)


async def test_a_429_pauses_every_worker_once(redis: ArqRedis) -> None:
    a, b = limiter(redis, rpm=60_000), limiter(redis, rpm=60_000)
    unlimited = limiter(redis)
    await a.cool_down("m", 1.0, why="429 rate_limit_exceeded")
    await a.cool_down("m", 0.5, why="429 rate_limit_exceeded")  # the burst: still one pause
    assert await b.reserve("m", 1) == pytest.approx(1.0, abs=0.05)
    # a worker without limits learns the pause with its next heartbeat
    assert await unlimited.reserve("m", 1) == 0
    await unlimited.refresh()
    assert await unlimited.reserve("m", 1) == pytest.approx(1.0, abs=0.1)


def test_header_and_token_helpers() -> None:
    assert parse_duration_s("6m0s") == 360.0
    assert parse_duration_s("20ms") == 0.02
    assert parse_duration_s("1h2m3.5s") == 3723.5
    assert parse_duration_s("soon") is None
    lim = RateLimiter.__new__(RateLimiter)
    spent = {"x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-requests": "1.5s"}
    assert lim.observe_headers(spent) == 1.5
    assert lim.observe_headers({**spent, "x-ratelimit-remaining-requests": "3"}) is None
    body = {"messages": [{"role": "user", "content": "x" * 400}], "max_tokens": 50}
    assert estimate_tokens(body) == 150
    assert estimate_tokens({"messages": [{"role": "user", "content": "hi"}]}) == 257


@pytest.mark.e2e
async def test_three_workers_keep_to_the_upstreams_rpm_with_zero_429s(
    redis: ArqRedis, settings: Settings, worker_procs: WorkerProcs
) -> None:
    rpm = 1200  # 20 requests/s; the mock refuses anything faster than that
    async with MockServer(MockConfig(rpm_limit=rpm)) as strict:
        settings = settings.model_copy(
            update={"upstream_url": strict.url, "rpm": rpm, "concurrency": 16}
        )
        worker_procs.settings = settings
        await worker_procs.launch(redis, 3, PROMPTQ_RPM=str(rpm))
        async with Producer.from_url(settings.redis_url_or_default, settings=settings) as p:
            batch = await p.submit([f"r{i}" for i in range(81)])
            stats = await batch.wait(timeout_s=60)
        assert strict.stats.rate_limited == 0
        assert stats.succeeded == 81
        # 81 requests evenly spaced at 20/s: 80 intervals of 50 ms
        observed_rpm = 80 / stats.wall_s * 60
        assert 0.85 * rpm <= observed_rpm <= 1.05 * rpm, observed_rpm


async def test_adaptive_concurrency_finds_the_upstreams_capacity(
    redis: ArqRedis, settings: Settings
) -> None:
    async def run(adaptive: bool) -> tuple[int, int]:
        async with MockServer(MockConfig(max_concurrency=6, latency_ms=40)) as small:
            tuned = settings.model_copy(
                update={
                    "upstream_url": small.url,
                    "concurrency": 48,
                    "max_attempts": 20,
                    "adaptive_concurrency": adaptive,
                }
            )
            async with local_cluster(tuned, workers=1) as producer:
                stats = await (await producer.submit([f"a{i}" for i in range(100)])).wait(
                    timeout_s=60
                )
            return stats.succeeded, small.stats.rate_limited

    _, fixed_429s = await run(adaptive=False)
    adaptive_ok, adaptive_429s = await run(adaptive=True)
    assert adaptive_ok == 100
    assert adaptive_429s * 3 < fixed_429s, (adaptive_429s, fixed_429s)


async def test_waiting_for_a_rate_slot_is_not_latency(redis: ArqRedis, settings: Settings) -> None:
    limited = settings.model_copy(update={"rpm": 600})  # one request per 100 ms
    async with local_cluster(limited, workers=1) as producer:
        batch = await producer.submit([f"s{i}" for i in range(10)])
        stats = await batch.wait(timeout_s=20)
        results = [r async for r in batch.results()]
    assert stats.wall_s >= 0.85  # the limiter spaced them out...
    assert all((r.latency_ms or 0) < 80 for r in results)  # ...but each answered at once
