"""The Lua scripts, against the real Redis and fakeredis (the embedded mode's store)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import orjson
import pytest
from arq.connections import ArqRedis

from promptq.shared import keys
from promptq.shared.connection import EmbeddedRedis, connect
from promptq.shared.scripts import Scripts


@pytest.fixture(params=["real", "fake"])
async def store(request: pytest.FixtureRequest, redis_url: str) -> AsyncIterator[ArqRedis]:
    client = await connect(redis_url) if request.param == "real" else EmbeddedRedis().client()
    await client.flushdb()
    try:
        yield client
    finally:
        await client.flushdb()
        await client.aclose()


B = "b1"


async def make_batch(r: ArqRedis, ids: list[str], *, publish: bool = True) -> Scripts:
    s = Scripts(r)
    assert (
        await s.create(
            keys=[keys.batch(B), keys.requests(B), keys.pending(B)],
            args=["total", len(ids), "endpoint", "/v1/chat/completions"],
        )
        == b""
    )
    await r.hset(
        keys.requests(B), mapping={i: orjson.dumps({"custom_id": i, "body": {}}) for i in ids}
    )
    await r.rpush(keys.pending(B), *ids)
    if publish:
        flipped, _ = await s.publish(
            keys=[keys.batch(B), keys.pending(B), keys.BATCHES], args=[B, len(ids)]
        )
        assert flipped == 1
    return s


def claim_keys() -> list[str]:
    return [keys.batch(B), keys.pending(B), keys.inflight(B), keys.requests(B)]


def record_keys() -> list[str]:
    return [keys.batch(B), keys.results(B), keys.inflight(B), keys.events(B)]


async def test_create_refuses_taken_ids_but_restarts_abandoned_ones(store: ArqRedis) -> None:
    s = await make_batch(store, ["a"], publish=False)
    # still 'validating' (its producer died): a new submit may take the id over
    assert (
        await s.create(keys=[keys.batch(B), keys.requests(B), keys.pending(B)], args=["total", 1])
        == b""
    )
    assert await store.llen(keys.pending(B)) == 0
    await store.flushdb()
    s = await make_batch(store, ["a"])
    assert (
        await s.create(keys=[keys.batch(B), keys.requests(B), keys.pending(B)], args=["total", 1])
        == b"queued"
    )


async def test_publish_refuses_an_incomplete_batch(store: ArqRedis) -> None:
    s = await make_batch(store, ["a", "b"], publish=False)
    flipped, detail = await s.publish(
        keys=[keys.batch(B), keys.pending(B), keys.BATCHES], args=[B, 3]
    )
    assert (flipped, detail) == (0, b"incomplete:2")
    assert await store.hget(keys.batch(B), "status") == b"validating"
    assert await store.zcard(keys.BATCHES) == 0


async def test_claim_moves_requests_in_flight_and_starts_the_batch(store: ArqRedis) -> None:
    s = await make_batch(store, ["a", "b", "c"])
    reply = await s.claim(keys=claim_keys(), args=[2, "w1"])
    assert reply[0] == 1
    assert [orjson.loads(x)["custom_id"] for x in reply[1:]] == ["a", "b"]
    assert await store.hgetall(keys.inflight(B)) == {b"a": b"w1", b"b": b"w1"}
    assert await store.hget(keys.batch(B), "status") == b"in_progress"
    last = await s.claim(keys=claim_keys(), args=[5, "w1"])
    assert last == [0, await store.hget(keys.requests(B), "c")]
    assert await s.claim(keys=claim_keys(), args=[5, "w1"]) == [0]


async def test_claim_refuses_batches_that_are_not_runnable(store: ArqRedis) -> None:
    s = await make_batch(store, ["a"])
    await store.hset(keys.batch(B), "status", "cancelled")
    assert await s.claim(keys=claim_keys(), args=[5, "w1"]) == [-1]
    assert await store.llen(keys.pending(B)) == 1


async def test_record_counts_each_request_once_and_finalizes_once(store: ArqRedis) -> None:
    s = await make_batch(store, ["a", "b"])
    await s.claim(keys=claim_keys(), args=[2, "w1"])
    ok = [1, "a", b'{"custom_id":"a"}', 1, 0]
    assert await s.record(keys=record_keys(), args=ok) == [1, 0, 0]
    # the same request recorded again (it ran twice after a crash): ignored
    assert await s.record(keys=record_keys(), args=ok) == [0, 0, 0]
    fail = [1, "b", b'{"custom_id":"b"}', 0, 2]
    assert await s.record(keys=record_keys(), args=fail) == [1, 1, 0]
    assert await s.record(keys=record_keys(), args=fail) == [0, 0, 0]
    batch = await store.hgetall(keys.batch(B))
    assert (batch[b"succeeded"], batch[b"failed"], batch[b"retries"]) == (b"1", b"1", b"2")
    assert batch[b"status"] == b"finalizing"
    assert await store.hlen(keys.inflight(B)) == 0
    assert await store.xlen(keys.events(B)) == 2


async def test_finish_writes_stats_status_end_marker_and_ttl(store: ArqRedis) -> None:
    s = await make_batch(store, ["a"])
    await s.claim(keys=claim_keys(), args=[1, "w1"])
    await s.record(keys=record_keys(), args=[1, "a", b"{}", 1, 0])
    finish_keys = [keys.batch(B), keys.stats(B), keys.events(B), keys.results(B)]
    assert await s.finish(keys=finish_keys, args=[60, "p50_ms", "1.0"]) == b"completed"
    assert await s.finish(keys=finish_keys, args=[60, "p50_ms", "2.0"]) == b"completed"  # no-op
    assert await store.hget(keys.stats(B), "p50_ms") == b"1.0"
    entries = await store.xrange(keys.events(B))
    assert entries[-1][1] == {b"end": b"completed"}
    assert 0 < await store.ttl(keys.results(B)) <= 60


async def test_release_hands_unfinished_requests_back(store: ArqRedis) -> None:
    s = await make_batch(store, ["a", "b", "c"])
    await s.claim(keys=claim_keys(), args=[2, "w1"])
    await s.record(keys=record_keys(), args=[1, "a", b"{}", 1, 0])
    released = await s.release(
        keys=[keys.pending(B), keys.inflight(B), keys.results(B)], args=["a", "b"]
    )
    assert released == 1  # "a" already has its result
    assert await store.lrange(keys.pending(B), 0, -1) == [b"b", b"c"]


async def test_record_flags_a_failure_rate_over_the_limit_after_the_sample(
    store: ArqRedis,
) -> None:
    ids = [f"r{i}" for i in range(10)]
    s = await make_batch(store, ids)
    await store.hset(keys.batch(B), mapping={"max_failure_rate": 0.5, "failure_min_sample": 4})
    await s.claim(keys=claim_keys(), args=[10, "w1"])
    flags = []
    for i, ok in enumerate([0, 0, 0, 1, 0]):  # 3 failures in 3: under the sample size
        flags.append((await s.record(keys=record_keys(), args=[1, ids[i], b"{}", ok, 0]))[2])
    assert flags == [0, 0, 0, 1, 1]  # from 4 finished on: 3/4 > 0.5, then 4/5
