"""Flow control seen from the producer: lanes, failure policy, backpressure, retries."""

from __future__ import annotations

import pytest
from arq.connections import ArqRedis

from promptq import BatchError, Producer, Status
from promptq.embedded import local_cluster
from promptq.mock import MockConfig, MockServer
from promptq.shared.errors import QueueFull
from promptq.shared.settings import Settings

from .conftest import worker_env
from .test_cli import cli


async def test_urgent_batches_are_served_before_queued_bulk_ones(
    redis: ArqRedis, settings: Settings
) -> None:
    producer = Producer(redis, settings=settings)
    bulk = await producer.submit([f"b{i}" for i in range(5)])
    urgent = await producer.submit(["u"], priority="urgent")
    # workers claim from the lowest score of the runnable index first
    assert await producer.store.runnable(10) == [urgent.id, bulk.id]


async def test_urgent_batch_overtakes_a_busy_bulk_batch(
    redis: ArqRedis, settings: Settings
) -> None:
    async with MockServer(MockConfig(latency_ms=100)) as slow:
        one_slot_group = settings.model_copy(update={"upstream_url": slow.url, "concurrency": 4})
        async with local_cluster(one_slot_group, workers=1) as producer:
            bulk = await producer.submit([f"b{i}" for i in range(200)])  # about 5 s of work
            urgent = await producer.submit([f"u{i}" for i in range(4)], priority="urgent")
            await urgent.wait(timeout_s=20)
            urgent_info, bulk_info = await urgent.info(), await bulk.info()
            await bulk.cancel()
    assert urgent_info.completed_at is not None
    assert urgent_info.created_at is not None
    assert urgent_info.completed_at - urgent_info.created_at < 1.5
    assert not bulk_info.status.terminal  # it overtook, it did not wait its turn
    assert bulk_info.done < 100


async def test_retry_after_is_honoured_through_the_pipeline(
    redis: ArqRedis, settings: Settings
) -> None:
    async with local_cluster(settings, workers=1) as producer:
        batch = await producer.submit(["x [[mock status=429 fail=1 retry_after=1.5]]"])
        await batch.wait(timeout_s=20)
        (result,) = [r async for r in batch.results()]
    assert result.ok
    assert result.attempts == 2
    assert result.latency_ms is not None
    assert result.latency_ms >= 1500  # no second attempt sooner than the upstream said


async def test_failure_rate_over_the_limit_ends_the_batch_early(
    redis: ArqRedis, settings: Settings, mock: MockServer
) -> None:
    few_slots = settings.model_copy(update={"concurrency": 4})
    async with local_cluster(few_slots, workers=1) as producer:
        items = [f"q{i} [[mock status=400]]" if i % 2 else f"q{i}" for i in range(300)]
        batch = await producer.submit(items, max_failure_rate=0.3)
        stats = await batch.wait(timeout_s=30)
        info = await batch.info()
    assert info.status is Status.FAILED
    assert info.reason is not None
    assert "--max-failure-rate" in info.reason
    assert stats.succeeded + stats.failed == 300  # every request accounted for
    assert stats.errors_by_code["failure_rate_exceeded"] > 200  # most were never sent
    assert mock.stats.requests < 40


async def test_backpressure_refuses_a_submit_past_the_queue_limit(
    redis: ArqRedis, settings: Settings, tmp_path: object
) -> None:
    capped = settings.model_copy(update={"max_queued": 50})
    producer = Producer(redis, settings=capped)  # no workers: everything stays queued
    first = await producer.submit([f"a{i}" for i in range(40)])
    with pytest.raises(QueueFull, match="40 requests are already queued"):
        await producer.submit([f"b{i}" for i in range(20)])
    assert await producer.queued_requests() == 40
    await first.cancel()
    assert await producer.queued_requests() == 0
    await producer.submit([f"c{i}" for i in range(20)])


async def test_backpressure_is_exit_2_on_the_command_line(
    redis: ArqRedis, settings: Settings, tmp_path: object
) -> None:
    from pathlib import Path

    src = Path(str(tmp_path)) / "in.jsonl"
    src.write_text("".join(f'{{"prompt": "p{i}"}}\n' for i in range(30)))
    env = worker_env(settings, PROMPTQ_MAX_QUEUED="40")
    code, _, _ = await cli("submit", str(src), env=env)
    assert code == 0
    code, stdout, stderr = await cli("submit", str(src), env=env)
    assert (code, stdout) == (2, "")
    assert "PROMPTQ_MAX_QUEUED" in stderr


async def test_retry_failed_reruns_only_the_failures_as_a_linked_batch(
    redis: ArqRedis, settings: Settings
) -> None:
    two_attempts = settings.model_copy(update={"max_attempts": 2})
    async with local_cluster(two_attempts, workers=1) as producer:
        items = [f"ok{i}" for i in range(5)] + [
            f"flaky{i} [[mock status=500 fail=2]]" for i in range(3)
        ]
        first = await producer.submit(items)
        stats = await first.wait(timeout_s=30)
        assert (stats.succeeded, stats.failed) == (5, 3)
        clean = await producer.submit(["fine [[mock latency_ms=1500]]"])
        with pytest.raises(BatchError, match=r"is (queued|in_progress)"):
            await producer.retry_failed(clean.id)  # not finished yet: 1.5 s to go
        await clean.wait(timeout_s=20)
        with pytest.raises(BatchError, match="no failed requests"):
            await producer.retry_failed(clean.id)
        retry = await producer.retry_failed(first.id)
        retry_stats = await retry.wait(timeout_s=30)
        retried = {r.custom_id for r in [r async for r in retry.results()]}
        old, new = await first.info(), await retry.info()
    assert retried == {"line-6", "line-7", "line-8"}
    assert (retry_stats.succeeded, retry_stats.failed) == (3, 0)  # third attempt succeeds
    assert (old.retried_by, new.retry_of) == (retry.id, first.id)
