"""The chat lane (``POST /v1/chat/completions`` without batches): answers reach the right
handler, chat goes ahead of bulk work, expired and hostile entries are dropped, and
requests held by a worker that dies, drains or loses a reply are handed back."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import orjson
import pytest
from arq.connections import ArqRedis

from promptq import Producer, Status
from promptq.api.lane import LaneClosed
from promptq.embedded import local_cluster
from promptq.mock import MockServer, expected_content
from promptq.shared import keys
from promptq.shared.chatqueue import ChatEntry, ChatQueue, new_chat_id
from promptq.shared.errors import QueueFull
from promptq.shared.settings import Settings

from .conftest import chat_body, chat_keys, in_process_worker, open_lane, wait_until


async def test_concurrent_chat_requests_get_their_own_answers_without_a_batch(
    redis: ArqRedis, settings: Settings, mock: MockServer
) -> None:
    bodies = [chat_body(f"question {i}") for i in range(30)]
    async with local_cluster(settings, workers=1) as producer, open_lane(producer) as lane:
        answers = await asyncio.gather(*(lane.send(lane.validate(b), timeout_s=20) for b in bodies))
    for b, (line, chat_id) in zip(bodies, answers, strict=True):
        assert line["custom_id"] == chat_id
        assert line["error"] is None
        assert line["response"]["body"]["choices"][0]["message"]["content"] == expected_content(b)
    assert len({chat_id for _line, chat_id in answers}) == 30
    assert mock.stats.requests == 30
    # no batch, no arq job, and nothing left in the chat lane's keys
    assert [k async for k in redis.scan_iter(match="promptq:batch:*")] == []
    assert await redis.zcard(keys.QUEUE) == 0
    assert await chat_keys(redis) == []


async def test_chat_requests_go_ahead_of_bulk_work(redis: ArqRedis, settings: Settings) -> None:
    slow = settings.model_copy(update={"concurrency": 2})
    async with local_cluster(slow, workers=1) as producer, open_lane(producer) as lane:
        batch = await producer.submit([f"b{i} [[mock latency_ms=300]]" for i in range(20)])

        async def busy() -> bool:
            return int(await redis.hlen(keys.inflight(batch.id))) == 2

        await wait_until(busy, what="both slots busy with bulk work")
        line, _chat_id = await lane.send(lane.validate(chat_body("urgent")), timeout_s=20)
        info = await batch.info(with_stats=False)
        assert line["error"] is None
        # the chat request took the first slot that freed, not a slot after the bulk queue
        assert info.status is Status.IN_PROGRESS
        assert info.done <= 6, info
        await batch.wait(timeout_s=30)


async def test_expired_and_unreadable_entries_are_dropped_unsent(
    redis: ArqRedis, settings: Settings, mock: MockServer, caplog: pytest.LogCaptureFixture
) -> None:
    replica = new_chat_id()
    expired = ChatEntry(id=new_chat_id(), body=chat_body("late"), replica=replica, deadline=1.0)
    fresh = ChatEntry(
        id=new_chat_id(), body=chat_body("on time"), replica=replica, deadline=time.time() + 60
    )
    planted = [
        b"x" * 40,
        b"\xff" * 40,  # not even text
        new_chat_id().encode() + b'{"body": "not an object"}',
    ]
    await redis.rpush(keys.CHAT_QUEUE, expired.encode(), *planted, fresh.encode())
    async with local_cluster(settings, workers=1):

        async def answered() -> Any:
            return await redis.lpop(keys.chat_replies(replica))

        line = orjson.loads(await wait_until(answered, what="the fresh request's answer"))
        await wait_until(lambda: _chat_keys_gone(redis), what="the worker to forget them all")
    assert line["custom_id"] == fresh.id
    assert mock.stats.requests == 1  # the expired one was never sent
    assert caplog.text.count("dropped a chat request") == 3


async def _chat_keys_gone(redis: ArqRedis) -> bool:
    return await chat_keys(redis) == []


async def test_a_dead_workers_chat_requests_are_handed_back_and_answered(
    redis: ArqRedis, settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    async with open_lane(Producer(redis, settings=settings)) as lane:
        waiting = asyncio.create_task(lane.send(lane.validate(chat_body("orphan")), timeout_s=30))

        async def queued() -> bool:
            return int(await redis.llen(keys.CHAT_QUEUE)) == 1

        await wait_until(queued, what="the request in the chat queue")
        # a worker takes it and dies before answering (no heartbeat key, an old beat)
        taken = await ChatQueue(redis).take_more("dead-worker", 10)
        assert len(taken) == 1
        await redis.zadd(keys.WORKERS, {"dead-worker": 1.0})
        async with local_cluster(settings, workers=1):
            line, _chat_id = await waiting
    assert line["error"] is None
    assert "worker dead-worker died: handed 1 chat request(s) back" in caplog.text
    assert await chat_keys(redis) == []


async def test_a_draining_worker_hands_unfinished_chat_requests_back(
    redis: ArqRedis, settings: Settings, mock: MockServer
) -> None:
    draining = settings.model_copy(update={"shutdown_grace_s": 0.1})
    async with open_lane(Producer(redis, settings=settings)) as lane:
        async with in_process_worker(draining) as worker:
            slow = lane.validate(chat_body("slow [[mock latency_ms=1500]]"))
            waiting = asyncio.create_task(lane.send(slow, timeout_s=30))
            held = keys.worker_chat(worker.worker_id)

            async def taken() -> bool:
                return int(await redis.llen(held)) == 1

            await wait_until(taken, what="the worker to take the request")
        # closed with a 0.1 s grace: the 1.5 s request was handed back
        assert await redis.llen(keys.CHAT_QUEUE) == 1
        assert not waiting.done()
        async with local_cluster(settings, workers=1):
            line, _chat_id = await waiting
    assert line["error"] is None
    assert mock.stats.requests == 2  # the interrupted send, then the one that answered


async def test_chat_requests_count_against_the_queue_limit(
    redis: ArqRedis, settings: Settings
) -> None:
    capped = settings.model_copy(update={"max_queued": 2})
    async with open_lane(Producer(redis, settings=capped)) as lane:  # no workers
        first = [
            asyncio.create_task(lane.send(lane.validate(chat_body(t)), timeout_s=20)) for t in "ab"
        ]

        async def queued() -> bool:
            return int(await redis.llen(keys.CHAT_QUEUE)) == 2

        await wait_until(queued, what="two chat requests queued")
        with pytest.raises(QueueFull, match="PROMPTQ_MAX_QUEUED"):
            await lane.send(lane.validate(chat_body("c")), timeout_s=20)
        assert await Producer(redis, settings=capped).queued_requests() == 2
        await lane.close()
        for task in first:
            with pytest.raises(LaneClosed):
                await task
    await redis.delete(keys.CHAT_QUEUE)


async def test_a_timed_out_request_is_not_sent_later(
    redis: ArqRedis, settings: Settings, mock: MockServer
) -> None:
    async with open_lane(Producer(redis, settings=settings)) as lane:  # no workers yet
        with pytest.raises(TimeoutError):
            await lane.send(lane.validate(chat_body("impatient")), timeout_s=0.2)
        assert await redis.llen(keys.CHAT_QUEUE) == 1
        async with local_cluster(settings, workers=1):
            # only the open lane's own push counter is left
            only_the_counter = [keys.chat_pushed(lane.replica_id).encode()]

            async def dropped() -> bool:
                return await chat_keys(redis) == only_the_counter

            await wait_until(dropped, what="the entry to be dropped")
    assert mock.stats.requests == 0
    assert await chat_keys(redis) == []  # the closed lane took its counter with it


async def test_an_answer_redis_refuses_is_dropped_without_holding_up_batches(
    redis: ArqRedis, settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    replica = new_chat_id()
    await redis.set(keys.chat_replies(replica), "not a list")  # a wrong-type key in the way
    entry = ChatEntry(
        id=new_chat_id(), body=chat_body("lost"), replica=replica, deadline=time.time() + 60
    )
    await redis.rpush(keys.CHAT_QUEUE, entry.encode())
    async with local_cluster(settings, workers=1) as producer:
        batch = await producer.submit(["a", "b", "c"])
        stats = await batch.wait(timeout_s=20)
        await wait_until(
            lambda: _only_the_planted_key_left(redis, replica), what="the answer dropped"
        )
    assert stats.succeeded == 3
    assert "dropped 1 chat answer(s)" in caplog.text


async def _only_the_planted_key_left(redis: ArqRedis, replica: str) -> bool:
    return await chat_keys(redis) == [keys.chat_replies(replica).encode()]


async def test_a_dead_worker_with_an_empty_id_does_not_take_our_requests(
    redis: ArqRedis, settings: Settings, mock: MockServer, caplog: pytest.LogCaptureFixture
) -> None:
    async with (
        open_lane(Producer(redis, settings=settings)) as lane,
        in_process_worker(settings) as worker,
    ):
        slow = asyncio.create_task(
            lane.send(lane.validate(chat_body("slow [[mock latency_ms=800]]")), timeout_s=20)
        )
        held = keys.worker_chat(worker.worker_id)

        async def taken() -> bool:
            return int(await redis.llen(held)) == 1

        await wait_until(taken, what="the worker to take the request")
        await redis.zadd(keys.WORKERS, {"": 1.0})  # a stale entry with an empty id
        assert await worker.engine.recovery.reap_dead() == 0
        line, _chat_id = await slow
    assert line["error"] is None
    assert mock.stats.requests == 1  # not handed back and sent a second time
    assert "chat request(s) back" not in caplog.text
