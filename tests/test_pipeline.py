"""The pipeline with in-process workers on the real Redis: results, stats, lifecycle."""

from __future__ import annotations

import logging
import time

import pytest
from arq.connections import ArqRedis
from redis.exceptions import ConnectionError as RedisConnectionError

import promptq.embedded
import promptq.shared.connection
from promptq import BatchExists, InputError, Producer, Status
from promptq.embedded import local_cluster
from promptq.mock import MockConfig, MockServer, expected_content
from promptq.shared import keys
from promptq.shared.batches import BatchStore
from promptq.shared.settings import Settings
from promptq.worker import Engine

from .conftest import wait_until


async def test_results_stream_once_each_and_match_their_requests(
    redis: ArqRedis, settings: Settings
) -> None:
    prompts = [{"custom_id": f"q{i}", "prompt": f"question {i}"} for i in range(60)]
    async with local_cluster(settings, workers=2) as producer:
        batch = await producer.submit(prompts)
        seen = [r async for r in batch.as_completed()]
        stats = await batch.wait(timeout_s=30)
        info = await batch.info()
    assert sorted(r.custom_id for r in seen) == sorted(p["custom_id"] for p in prompts)
    for r in seen:
        body = {"messages": [{"role": "user", "content": f"question {r.custom_id[1:]}"}]}
        assert r.content == expected_content(body)
        assert r.attempts == 1
        assert r.latency_ms is not None
    assert info.status is Status.COMPLETED
    assert (info.total, info.succeeded, info.failed) == (60, 60, 0)
    assert info.created_at is not None
    assert info.completed_at is not None
    assert info.completed_at >= info.created_at
    assert (stats.succeeded, stats.failed, stats.success_rate) == (60, 0, 1.0)
    latencies = sorted(r.latency_ms or 0 for r in seen)
    assert latencies[0] <= stats.p50_ms <= stats.p99_ms <= stats.max_ms == latencies[-1]
    assert stats.throughput_rps == pytest.approx(60 / stats.wall_s, rel=0.01)
    assert stats.input_tokens > 0
    assert stats.output_tokens > 0


async def test_retries_recover_and_fatal_errors_fail_fast(
    redis: ArqRedis, settings: Settings
) -> None:
    items = [
        {"custom_id": "ok", "prompt": "fine"},
        {"custom_id": "flaky", "prompt": "x [[mock status=500 fail=2]]"},
        {"custom_id": "limited", "prompt": "y [[mock status=429 fail=1 retry_after_ms=50]]"},
        {"custom_id": "bad", "prompt": "z [[mock status=400]]"},
        {"custom_id": "gone", "prompt": "w [[mock status=404]]"},
    ]
    async with local_cluster(settings, workers=1) as producer:
        batch = await producer.submit(items)
        stats = await batch.wait(timeout_s=30)
        results = {r.custom_id: r async for r in batch.results()}
    assert (results["flaky"].ok, results["flaky"].attempts) == (True, 3)
    assert (results["limited"].ok, results["limited"].attempts) == (True, 2)
    bad = results["bad"]
    assert bad.error is not None
    assert bad.response is not None
    assert (bad.attempts, bad.response.status_code) == (1, 400)
    gone = results["gone"]
    assert gone.error is not None
    assert gone.response is not None
    assert (gone.attempts, gone.response.status_code) == (1, 404)
    assert stats.errors_by_code == {bad.error.code: 1, gone.error.code: 1}
    raw = await redis.hgetall(keys.batch(batch.id))
    assert raw[b"retries"] == b"3"
    assert (raw[b"succeeded"], raw[b"failed"]) == (b"3", b"2")


async def test_concurrency_bounds_in_flight_requests_across_jobs(
    redis: ArqRedis, settings: Settings
) -> None:
    async with MockServer(MockConfig(latency_ms=40)) as slow:
        limited = settings.model_copy(update={"upstream_url": slow.url, "concurrency": 4})
        async with local_cluster(limited, workers=1) as producer:
            batches = [await producer.submit([f"{b}-{i}" for i in range(20)]) for b in "abc"]
            for batch in batches:
                await batch.wait(timeout_s=30)
        assert slow.stats.max_in_flight == 4
        assert slow.stats.requests == 60


async def test_wakeups_start_work_without_waiting_for_the_poll(
    redis: ArqRedis, settings: Settings
) -> None:
    lazy = settings.model_copy(update={"poll_delay_s": 30.0})
    async with local_cluster(lazy, workers=1) as producer:
        for _ in range(3):
            start = time.monotonic()
            await (await producer.submit(["ping"])).wait(timeout_s=20)
            assert time.monotonic() - start < 5.0  # a 30 s poll would blow this


async def test_a_taken_batch_id_is_refused(redis: ArqRedis, settings: Settings) -> None:
    async with local_cluster(settings, workers=1) as producer:
        await (await producer.submit(["a"], batch_id="same")).wait(timeout_s=20)
        with pytest.raises(BatchExists, match="already exists"):
            await producer.submit(["b"], batch_id="same")
        with pytest.raises(InputError, match="batch_id"):
            await producer.submit(["b"], batch_id="bad id with {braces}")


async def test_a_producer_dying_midway_leaves_nothing_runnable(
    redis: ArqRedis, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def crash(self: BatchStore, batch_id: str, total: int, **kw: object) -> None:
        raise ConnectionError("producer died")

    producer = Producer(redis, settings=settings)
    with monkeypatch.context() as patch:
        patch.setattr(BatchStore, "queue", crash)
        with pytest.raises(ConnectionError):
            await producer.submit([f"p{i}" for i in range(10)], batch_id="half")
    assert await redis.hget(keys.batch("half"), "status") == b"validating"
    assert await redis.zcard(keys.RUNNABLE) == 0
    assert await redis.zcard(keys.BATCHES) == 0
    # submitting again under the same id starts over and runs to completion
    async with local_cluster(settings, workers=1) as cluster:
        stats = await (await cluster.submit([f"p{i}" for i in range(10)], batch_id="half")).wait(
            timeout_s=20
        )
    assert stats.succeeded == 10


async def test_workers_publish_heartbeats(redis: ArqRedis, settings: Settings) -> None:
    async with local_cluster(settings, workers=2):
        ids = [x.decode() for x in await redis.zrange(keys.WORKERS, 0, -1)]
        assert len(ids) == 2
        beat = await redis.hgetall(keys.worker(ids[0]))
        assert {b"host", b"pid", b"in_flight", b"done", b"failed"} <= set(beat)
        assert 0 < await redis.ttl(keys.worker(ids[0])) <= 5
    assert await redis.zcard(keys.WORKERS) == 0  # removed on clean shutdown


async def test_embedded_mode_needs_no_redis_server(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def no_server(*args: object, **kwargs: object) -> None:
        raise AssertionError("embedded mode must not connect to any Redis server")

    monkeypatch.setattr(promptq.shared.connection, "connect", no_server)
    monkeypatch.setattr(promptq.embedded, "connect", no_server)
    embedded = settings.model_copy(update={"redis_url": None})
    async with local_cluster(embedded, workers=2) as producer:
        batch = await producer.submit([f"e{i}" for i in range(30)])
        stats = await batch.wait(timeout_s=30)
    assert stats.succeeded == 30


async def test_aggregator_enqueue_survives_a_redis_blip(
    redis: ArqRedis,
    settings: Settings,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    original = ArqRedis.enqueue_job
    failures = []

    async def flaky(self: ArqRedis, function: str, *args: object, **kwargs: object) -> object:
        if function == "aggregate" and not failures:
            failures.append(function)
            raise RedisConnectionError("Connection refused: Redis restarting")
        return await original(self, function, *args, **kwargs)

    monkeypatch.setattr(ArqRedis, "enqueue_job", flaky)
    with caplog.at_level(logging.INFO):
        async with local_cluster(settings, workers=1) as producer:
            stats = await (await producer.submit(["a", "b"])).wait(timeout_s=20)
    assert failures == ["aggregate"]
    assert stats.succeeded == 2
    # the outage branch: one warning when it starts, one line when Redis answers again
    assert "Redis unreachable while enqueueing the aggregator" in caplog.text
    assert "Redis answers again" in caplog.text


async def test_cancel_stops_dispatch_keeps_results_and_accounts_for_every_request(
    redis: ArqRedis, settings: Settings
) -> None:
    async with MockServer(MockConfig(latency_ms=200)) as slow:
        limited = settings.model_copy(update={"upstream_url": slow.url, "concurrency": 5})
        async with local_cluster(limited, workers=1) as producer:
            batch = await producer.submit([f"c{i}" for i in range(100)])

            async def some_done() -> bool:
                return (await batch.info()).succeeded >= 5

            await wait_until(some_done, what="first results")
            info = await batch.cancel()
            assert info.status in (Status.CANCELLING, Status.FINALIZING, Status.CANCELLED)
            sent_at_cancel = slow.stats.requests
            stats = await batch.wait(timeout_s=20)
            info = await batch.info()
            results = [r async for r in batch.results()]
            # cancelling again, or a finished batch, changes nothing
            assert (await batch.cancel()).status is Status.CANCELLED
        assert info.status is Status.CANCELLED
        assert len(results) == 100  # one result per request, cancelled ones included
        cancelled = [r for r in results if r.error and r.error.code == "batch_cancelled"]
        sent = [r for r in results if r.attempts > 0]
        assert len(cancelled) + len(sent) == 100
        assert all(r.attempts == 0 and r.response is None for r in cancelled)
        assert all(r.ok for r in sent)  # in-flight requests were allowed to finish
        assert slow.stats.requests == len(sent) <= sent_at_cancel + 5
        assert stats.errors_by_code == {"batch_cancelled": len(cancelled)}
        assert info.cancelling_at is not None


@pytest.mark.parametrize("fatal", ["quota=1", "status=401"])
async def test_a_fatal_upstream_state_stops_the_batch_instead_of_every_attempt(
    redis: ArqRedis, settings: Settings, mock: MockServer, fatal: str
) -> None:
    limited = settings.model_copy(update={"concurrency": 4})
    async with local_cluster(limited, workers=1) as producer:
        batch = await producer.submit([f"q{i} [[mock {fatal}]]" for i in range(200)])
        stats = await batch.wait(timeout_s=20)
        info = await batch.info()
        results = [r async for r in batch.results()]
    code = "insufficient_quota" if "quota" in fatal else "invalid_api_key"
    assert info.status is Status.FAILED
    assert info.reason is not None
    assert code in info.reason
    assert len(results) == 200  # every request accounted for
    assert all(r.error is not None and r.error.code == code for r in results)
    sent = [r for r in results if r.attempts > 0]
    assert all(r.attempts == 1 for r in sent)  # fatal: never retried
    # at most about one request per concurrency slot reached the upstream
    assert mock.stats.requests == len(sent) <= 2 * 4
    assert stats.errors_by_code == {code: 200}


async def test_requests_of_a_dead_worker_in_a_stopped_batch_still_end(
    redis: ArqRedis, settings: Settings
) -> None:
    """A worker dies holding requests of a batch that promptq stopped meanwhile: handed
    back, they must end with the stop's code (a claim would be refused), and the batch
    must finish."""
    producer = Producer(redis, settings=settings)
    batch = await producer.submit([f"s{i}" for i in range(5)])
    store = BatchStore(redis)
    # "dead-1" claimed two requests, then died (its heartbeat key is gone)
    assert len((await store.claim(batch.id, 2, "dead-1")).requests) == 2
    seconds, _ = await redis.time()
    await redis.zadd(keys.WORKERS, {"dead-1": seconds - 60})
    status, _ = await store.stop(
        batch.id, code="insufficient_quota", message="quota gone",
        final_status="failed", reason="stopped: quota",
    )  # fmt: skip
    assert status == "in_progress"  # the two in flight keep it open
    engine = Engine(redis, settings)  # a live worker, not started: only its recovery runs
    assert await engine.recovery.reap_dead() == 2
    raw = await redis.hgetall(keys.batch(batch.id))
    assert raw[b"status"] == b"finalizing"
    results = {r.custom_id: r async for r in batch.results()}
    assert len(results) == 5
    assert all(
        r.error is not None and r.error.code == "insufficient_quota" for r in results.values()
    )


async def test_workers_keep_the_latency_histogram_for_metrics(
    redis: ArqRedis, settings: Settings
) -> None:
    async with local_cluster(settings, workers=1) as producer:
        await (await producer.submit([f"h{i}" for i in range(12)])).wait(timeout_s=20)

        async def counted() -> dict[bytes, bytes]:  # written with the next heartbeat
            hist: dict[bytes, bytes] = await redis.hgetall(keys.METRICS_LATENCY)
            return hist if hist.get(b"count") == b"12" else {}

        hist = await wait_until(counted, what="the latency histogram")
    buckets = {k: int(v) for k, v in hist.items() if k not in (b"count", b"sum")}
    assert sum(buckets.values()) == 12
    assert set(buckets) <= {str(b).encode() for b in keys.LATENCY_BUCKETS_MS} | {b"+Inf"}
    assert float(hist[b"sum"]) > 0


async def test_workers_count_the_tokens_they_were_answered_with(
    redis: ArqRedis, settings: Settings
) -> None:
    """The heartbeat's ``tokens`` (the dashboard's TPM in use) add up to the batch's."""
    from promptq.shared.registry import WorkerRegistry

    async with local_cluster(settings, workers=1) as producer:
        batch = await producer.submit([f"count my tokens {i}" for i in range(6)])
        await batch.wait(timeout_s=20)
        stats = (await batch.info()).stats
        assert stats is not None
        expected = stats.input_tokens + stats.output_tokens
        assert expected > 0
        registry = WorkerRegistry(redis, heartbeat_s=settings.heartbeat_s)

        async def counted() -> bool:  # written with the next heartbeat
            live = await registry.live()
            return bool(live) and live[0].get("tokens") == expected

        await wait_until(counted, what="the heartbeat's token count")
