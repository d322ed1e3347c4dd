"""A chaotic upstream: 500s, 429s, hangs, malformed bodies and dropped connections.

Every request still ends exactly once, either succeeded or with a classified error
code; no worker hangs; a worker's memory stays flat over many batches. Real worker
processes, the real Redis, the mock upstream injecting faults from a fixed seed.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from arq.connections import ArqRedis

from promptq import Batch, Producer, Status
from promptq.mock import MockConfig, MockServer
from promptq.shared.settings import Settings

from ..conftest import WorkerProcs

pytestmark = pytest.mark.e2e

#: what a request may end with when the upstream misbehaves like this
CLASSIFIED = {
    "server_error",
    "rate_limit_exceeded",
    "timeout",
    "connection_error",
    "invalid_response",
}
CHAOS = MockConfig(
    error_rate=0.1,
    rate_429=0.1,
    retry_after_s=0.05,
    hang_rate=0.05,
    malformed_rate=0.05,
    drop_rate=0.05,
    seed=20241124,
)


@pytest.fixture
async def chaotic_mock() -> AsyncIterator[MockServer]:
    async with MockServer(CHAOS) as server:
        yield server


def use(procs: WorkerProcs, mock: MockServer, *, timeout_s: float = 1.0) -> Settings:
    # a short per-attempt timeout, so that a hung answer costs a second, not a minute
    return procs.use(mock, timeout_s=timeout_s, max_attempts=3, concurrency=50)


async def run_batch(producer: Producer, n: int, tag: str) -> tuple[Batch, Counter[str]]:
    """Submit ``n`` prompts, wait for the end, check each ended once; return the outcomes
    counted by error code ('ok' for successes)."""
    batch = await producer.submit([f"{tag} {i}" for i in range(n)])
    await batch.wait(timeout_s=30)  # a hung worker would blow this deadline
    info = await batch.info()
    results = [r async for r in batch.results()]
    assert info.status is Status.COMPLETED
    assert len(results) == n
    assert {r.custom_id for r in results} == {f"line-{i}" for i in range(1, n + 1)}
    outcomes = Counter(r.error.code if r.error else "ok" for r in results)
    assert sum(outcomes.values()) == n
    assert set(outcomes) - {"ok"} <= CLASSIFIED, outcomes
    assert (info.succeeded, info.failed) == (outcomes["ok"], n - outcomes["ok"])
    assert all(1 <= r.attempts <= 3 for r in results)
    return batch, outcomes


async def test_chaotic_upstream_every_request_ends_once_and_classified(
    redis: ArqRedis, settings: Settings, chaotic_mock: MockServer, worker_procs: WorkerProcs
) -> None:
    settings = use(worker_procs, chaotic_mock)
    await worker_procs.launch(redis, 2)
    started = time.monotonic()
    async with Producer.from_url(settings.redis_url_or_default, settings=settings) as producer:
        _, outcomes = await run_batch(producer, 600, "chaos")
    took_s = time.monotonic() - started
    stats = chaotic_mock.stats
    injected = {
        "500": stats.responses_by_status.get(500, 0),
        "429": stats.responses_by_status.get(429, 0),
        "hang": stats.hangs,
        "malformed": stats.malformed,
        "drop": stats.drops,
    }
    print(
        f"600 requests, {stats.requests} upstream calls, faults injected {injected}, "
        f"outcomes {dict(outcomes)}, {took_s:.1f} s"
    )  # quoted in the README
    assert all(injected.values()), injected  # every kind of fault really happened
    assert outcomes["ok"] >= 500  # 3 attempts get most requests through
    assert "Traceback" not in worker_procs.log_text()


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for pid {pid}")


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads /proc")
async def test_worker_memory_stays_flat_over_many_chaotic_batches(
    redis: ArqRedis, settings: Settings, chaotic_mock: MockServer, worker_procs: WorkerProcs
) -> None:
    settings = use(worker_procs, chaotic_mock, timeout_s=0.5)
    await worker_procs.launch(redis, 1, PROMPTQ_CONCURRENCY="100")
    pid = worker_procs.procs[0].pid
    rss: list[int] = []
    async with Producer.from_url(settings.redis_url_or_default, settings=settings) as producer:
        for round_ in range(5):
            await run_batch(producer, 500, f"round {round_}")
            rss.append(rss_kb(pid))
    print(f"worker RSS after each batch of 500 (MB): {[round(kb / 1024, 1) for kb in rss]}")
    # after two batches every pool and cache is warm: growth beyond that is a leak
    assert rss[-1] - rss[1] < 30 * 1024, rss
