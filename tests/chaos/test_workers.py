"""Workers crash, drain and restart mid-batch: nothing is lost, nothing is counted twice.

Real worker processes, the real Redis, the mock upstream with latency so that requests
are in flight when the fault hits.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest
from arq.connections import ArqRedis

from promptq import Batch, Producer, Status
from promptq.mock import MockConfig, MockServer, expected_content
from promptq.shared import keys
from promptq.shared.settings import Settings

from ..conftest import WorkerProcs, chat_body, chat_keys, open_lane, wait_until

pytestmark = pytest.mark.e2e


@pytest.fixture
async def slow_mock() -> AsyncIterator[MockServer]:
    async with MockServer(MockConfig(latency_ms=300)) as server:
        yield server


async def in_flight_on(redis: ArqRedis, batch: Batch, pid: int) -> bool:
    """The worker process ``pid`` holds some of the batch's requests right now."""
    owners = {v.decode() for v in (await redis.hgetall(keys.inflight(batch.id))).values()}
    for worker_id in owners:
        beat_pid = await redis.hget(keys.worker(worker_id), "pid")
        if beat_pid is not None and int(beat_pid) == pid:
            return True
    return False


async def worker_id_of(redis: ArqRedis, pid: int) -> str:
    """The id of the live worker process ``pid`` (from its heartbeat)."""
    for raw in await redis.zrange(keys.WORKERS, 0, -1):
        beat_pid = await redis.hget(keys.worker(raw.decode()), "pid")
        if beat_pid is not None and int(beat_pid) == pid:
            return str(raw.decode())
    raise AssertionError(f"no heartbeat of process {pid}")


async def owned_by(redis: ArqRedis, batch: Batch, worker_id: str) -> set[str]:
    """The requests of ``batch`` that ``worker_id`` holds in flight."""
    inflight = await redis.hgetall(keys.inflight(batch.id))
    return {cid.decode() for cid, owner in inflight.items() if owner.decode() == worker_id}


async def check_exactly_once(batch: Batch, total: int) -> None:
    info = await batch.info()
    results = [r async for r in batch.results()]
    assert info.status is Status.COMPLETED
    assert len(results) == total
    assert len({r.custom_id for r in results}) == total
    assert all(r.ok for r in results), [r for r in results if not r.ok][:3]
    # counters count each request once, even if one ran twice
    assert (info.succeeded, info.failed) == (total, 0)
    assert info.stats is not None
    assert info.stats.succeeded == total


async def test_sigkill_mid_batch_loses_nothing(
    redis: ArqRedis, settings: Settings, slow_mock: MockServer, worker_procs: WorkerProcs
) -> None:
    settings = worker_procs.use(slow_mock, concurrency=10)
    await worker_procs.launch(redis, 2)
    async with Producer.from_url(settings.redis_url_or_default, settings=settings) as producer:
        batch = await producer.submit([f"k{i}" for i in range(200)])
        dead_pid = worker_procs.procs[0].pid
        await wait_until(lambda: in_flight_on(redis, batch, dead_pid), what="worker 0 busy")
        dead_id = await worker_id_of(redis, dead_pid)
        owned_by_dead = await owned_by(redis, batch, dead_id)
        worker_procs.kill(0)
        killed_at = time.monotonic()

        async def recovered() -> bool:
            # the dead worker owns nothing any more (not: "at most one owner is left",
            # which holds while the dead one still owns its requests)
            return not await owned_by(redis, batch, dead_id)

        await wait_until(recovered, timeout_s=30, what="the dead worker's requests handed back")
        recovery_s = time.monotonic() - killed_at
        await batch.wait(timeout_s=60)
        await check_exactly_once(batch, 200)
    print(f"recovered from SIGKILL in {recovery_s:.1f} s")  # quoted in the README
    assert owned_by_dead  # it held requests when it was killed
    assert recovery_s <= 30
    assert "died: handed" in worker_procs.log_text()


async def test_sigterm_drains_in_flight_requests(
    redis: ArqRedis, settings: Settings, slow_mock: MockServer, worker_procs: WorkerProcs
) -> None:
    settings = worker_procs.use(slow_mock, concurrency=10)
    await worker_procs.launch(redis, 2)
    async with Producer.from_url(settings.redis_url_or_default, settings=settings) as producer:
        batch = await producer.submit([f"t{i}" for i in range(120)])
        pid = worker_procs.procs[0].pid
        await wait_until(lambda: in_flight_on(redis, batch, pid), what="worker 0 busy")
        assert await worker_procs.terminate(0) == 0
        await batch.wait(timeout_s=60)
        await check_exactly_once(batch, 120)
        results = [r async for r in batch.results()]
    assert "waiting up to" in worker_procs.log_text()
    # 300 ms requests fit the 10 s grace: each was sent once, none was handed back
    assert all(r.attempts == 1 for r in results)
    assert slow_mock.stats.requests == 120
    assert int(await redis.zcard(keys.WORKERS)) == 1  # the drained one left cleanly


async def test_sigterm_past_the_grace_period_hands_requests_back_without_an_attempt(
    redis: ArqRedis, settings: Settings, worker_procs: WorkerProcs
) -> None:
    async with MockServer(MockConfig(latency_ms=1500)) as very_slow:
        settings = worker_procs.use(very_slow, concurrency=10)
        worker_procs.start(1, PROMPTQ_SHUTDOWN_GRACE_S="0.2")
        worker_procs.start(1)
        await worker_procs.wait_ready(redis, 2)
        async with Producer.from_url(settings.redis_url_or_default, settings=settings) as p:
            batch = await p.submit([f"h{i}" for i in range(30)])
            pid = worker_procs.procs[0].pid
            await wait_until(lambda: in_flight_on(redis, batch, pid), what="worker 0 busy")
            assert await worker_procs.terminate(0) == 0
            await batch.wait(timeout_s=60)
            await check_exactly_once(batch, 30)
            results = [r async for r in batch.results()]
        assert all(r.attempts == 1 for r in results)  # the interrupted send cost nothing
    assert "handed" in worker_procs.log_text()


async def test_rolling_restart_of_every_worker_loses_nothing(
    redis: ArqRedis, settings: Settings, slow_mock: MockServer, worker_procs: WorkerProcs
) -> None:
    settings = worker_procs.use(slow_mock, concurrency=10)
    await worker_procs.launch(redis, 2)
    async with Producer.from_url(settings.redis_url_or_default, settings=settings) as producer:
        batch = await producer.submit([f"r{i}" for i in range(300)])
        for old in (0, 1):
            pid = worker_procs.procs[old].pid
            await wait_until(lambda p=pid: in_flight_on(redis, batch, p), what="old worker busy")
            assert await worker_procs.terminate(old) == 0
            worker_procs.start(1)  # its replacement
            await worker_procs.wait_ready(redis, 2)
        await batch.wait(timeout_s=90)
        await check_exactly_once(batch, 300)


async def chat_held_by(redis: ArqRedis, pid: int) -> int:
    """How many chat requests the worker process ``pid`` holds right now."""
    for raw in await redis.zrange(keys.WORKERS, 0, -1):
        worker_id = raw.decode()
        beat_pid = await redis.hget(keys.worker(worker_id), "pid")
        if beat_pid is not None and int(beat_pid) == pid:
            return int(await redis.llen(keys.worker_chat(worker_id)))
    return 0


async def test_sigkill_with_chat_requests_in_flight_answers_each_of_them(
    redis: ArqRedis, settings: Settings, slow_mock: MockServer, worker_procs: WorkerProcs
) -> None:
    settings = worker_procs.use(slow_mock, concurrency=10)
    await worker_procs.launch(redis, 1)
    bodies = [chat_body(f"chat {i}") for i in range(30)]
    async with (
        Producer.from_url(settings.redis_url_or_default, settings=settings) as producer,
        open_lane(producer) as lane,
    ):
        sent = [asyncio.create_task(lane.send(lane.validate(b), timeout_s=60)) for b in bodies]
        pid = worker_procs.procs[0].pid
        await wait_until(lambda: chat_held_by(redis, pid), what="the worker to take some")
        worker_procs.kill(0)
        worker_procs.start(1)  # the survivor finds the dead one's requests
        answers = await asyncio.gather(*sent)
    for b, (line, chat_id) in zip(bodies, answers, strict=True):
        assert line["custom_id"] == chat_id
        assert line["response"]["body"]["choices"][0]["message"]["content"] == expected_content(b)
    assert "handed" in worker_procs.log_text()
    assert "chat request(s) back" in worker_procs.log_text()
    assert await chat_keys(redis) == []


async def test_sigkill_and_dropped_connections_with_chat_in_flight_answer_each_once(
    redis: ArqRedis, settings: Settings, slow_mock: MockServer, worker_procs: WorkerProcs
) -> None:
    """A worker is SIGKILLed while it holds chat requests, and every other client's
    connection to Redis is dropped at the same moment (the API's listener, the other
    worker): each request is answered, to its own handler, and nothing is left behind."""
    settings = worker_procs.use(slow_mock, concurrency=10)
    await worker_procs.launch(redis, 2)
    bodies = [chat_body(f"drop {i}") for i in range(40)]
    async with (
        Producer.from_url(settings.redis_url_or_default, settings=settings) as producer,
        open_lane(producer) as lane,
    ):
        sent = [asyncio.create_task(lane.send(lane.validate(b), timeout_s=60)) for b in bodies]
        pid = worker_procs.procs[0].pid
        await wait_until(lambda: chat_held_by(redis, pid), what="worker 0 to take some")

        async def some_answered() -> bool:
            return any(t.done() for t in sent)

        await wait_until(some_answered, what="the first answers")
        worker_procs.kill(0)
        killed = await redis.execute_command("CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes")
        answers = await asyncio.wait_for(asyncio.gather(*sent), 60)
    assert int(killed) >= 2  # the lane's and the other worker's connections did drop
    assert len({chat_id for _line, chat_id in answers}) == 40
    for b, (line, chat_id) in zip(bodies, answers, strict=True):
        assert line["custom_id"] == chat_id
        assert line["response"]["body"]["choices"][0]["message"]["content"] == expected_content(b)
    # sent once each, but for those the dead worker held (sent again by the survivor)
    assert 40 <= slow_mock.stats.requests <= 40 + 10
    assert await chat_keys(redis) == []
