"""The stores' Lua scripts, against the real Redis and fakeredis (the embedded mode's store)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import orjson
import pytest
from arq.connections import ArqRedis

from promptq.shared import keys
from promptq.shared.batches import BatchStore, record_args
from promptq.shared.chatqueue import Answer, ChatEntry, ChatQueue, new_chat_id
from promptq.shared.connection import EmbeddedRedis, connect
from promptq.shared.errors import BatchError, UpstreamError
from promptq.shared.models import QueuedRequest, Result
from promptq.shared.registry import WorkerRegistry
from promptq.shared.results import FIELDS, Outcome, result_line, stop_template
from promptq.shared.scripts import prelude
from promptq.shared.status import CLAIMABLE, RUNNING, STOPPABLE, TERMINAL, Status


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


async def make_batch(r: ArqRedis, ids: list[str], *, queue: bool = True) -> BatchStore:
    s = BatchStore(r)
    assert await s.create(B, {"total": len(ids), "endpoint": "/v1/chat/completions"}) == ""
    await s.append(B, [QueuedRequest(custom_id=i, body={}, line=n) for n, i in enumerate(ids)])
    if queue:
        await s.queue(B, len(ids))
    return s


def ok_result(cid: str, ok: int = 1, retries: int = 0, latency_ms: float = 10.0) -> list[object]:
    """The record arguments of one result (a success with usage, or a server error)."""
    outcome = Outcome(
        status_code=200 if ok else 500,
        body={"usage": {"prompt_tokens": 3, "completion_tokens": 2}} if ok else None,
        request_id="r",
        error=None if ok else UpstreamError("boom", code="server_error"),
        attempts=retries + 1,
        latency_ms=latency_ms,
    )
    return list(record_args(cid, orjson.dumps({"custom_id": cid}), outcome, cost=(0.5, 0.0)))


async def test_create_refuses_taken_ids_but_restarts_abandoned_ones(store: ArqRedis) -> None:
    s = await make_batch(store, ["a"], queue=False)
    # still 'validating' (its producer died): a new submit may take the id over
    assert await s.create(B, {"total": 1}) == ""
    assert await store.llen(keys.pending(B)) == 0
    await store.flushdb()
    s = await make_batch(store, ["a"])
    assert await s.create(B, {"total": 1}) == "queued"


async def test_queue_refuses_an_incomplete_batch(store: ArqRedis) -> None:
    s = await make_batch(store, ["a", "b"], queue=False)
    with pytest.raises(BatchError, match="incomplete:2"):
        await s.queue(B, 3)
    assert await store.hget(keys.batch(B), "status") == b"validating"
    assert await store.zcard(keys.BATCHES) == 0
    assert await store.zcard(keys.RUNNABLE) == 0


async def test_claim_moves_requests_in_flight_and_starts_the_batch(store: ArqRedis) -> None:
    s = await make_batch(store, ["a", "b", "c"])
    assert await s.runnable(10) == [B]
    claim = await s.claim(B, 2, "w1")
    assert claim.remaining == 1
    assert claim.endpoint == "/v1/chat/completions"
    assert [r.custom_id for r in claim.requests] == ["a", "b"]
    assert await store.hgetall(keys.inflight(B)) == {b"a": b"w1", b"b": b"w1"}
    assert await store.hget(keys.batch(B), "status") == b"in_progress"
    last = await s.claim(B, 5, "w1")
    assert (last.remaining, [r.custom_id for r in last.requests]) == (0, ["c"])
    assert await s.runnable(10) == []  # nothing pending: no longer listed
    empty = await s.claim(B, 5, "w1")
    assert (empty.remaining, empty.requests) == (0, [])
    assert await s.owned(B, "w1") == {"a", "b", "c"}


async def test_a_claim_sent_again_takes_the_same_requests(store: ArqRedis) -> None:
    """redis-py sends a command again when the connection broke before the reply: the
    claim's token makes the second run return what the first took, nothing more."""
    s = await make_batch(store, ["a", "b", "c", "d"])
    script = s._claim  # the same call twice, as a retry would send it
    claim_keys = [keys.batch(B), keys.pending(B), keys.inflight(B), keys.requests(B),
                  keys.claims(B), keys.RUNNABLE]  # fmt: skip
    first = await script(keys=claim_keys, args=[2, "w1", B, "t1", ""])
    again = await script(keys=claim_keys, args=[2, "w1", B, "t1", ""])
    assert first[3:] == again[3:]
    assert await store.llen(keys.pending(B)) == 2
    # the worker's next claim forgets this one; finishing the batch forgets them all
    await script(keys=claim_keys, args=[2, "w1", B, "t2", "t1"])
    assert await store.hkeys(keys.claims(B)) == [b"t2"]


async def test_claim_refuses_batches_that_are_not_runnable(store: ArqRedis) -> None:
    s = await make_batch(store, ["a"])
    await store.hset(keys.batch(B), "status", "cancelled")
    assert (await s.claim(B, 5, "w1")).remaining == -1
    assert await store.llen(keys.pending(B)) == 1
    assert await s.runnable(10) == []


async def test_batches_take_turns_and_urgent_ones_go_first(store: ArqRedis) -> None:
    s = BatchStore(store)
    for batch_id, priority in [("bulk1", "bulk"), ("bulk2", "bulk"), ("urgent", "urgent")]:
        await s.create(batch_id, {"total": 4, "priority": priority})
        await s.append(batch_id, [QueuedRequest(f"{batch_id}-{i}", {}, i) for i in range(4)])
        await s.queue(batch_id, 4)
    assert (await s.runnable(3))[0] == "urgent"
    await s.claim("bulk1", 1, "w1")  # bulk1 had its turn: bulk2 comes before it now
    assert await s.runnable(3) == ["urgent", "bulk2", "bulk1"]


async def test_record_counts_each_request_once_and_finalizes_once(store: ArqRedis) -> None:
    s = await make_batch(store, ["a", "b"])
    await s.claim(B, 2, "w1")
    recorded = await s.record(B, ok_result("a"))
    assert (recorded.added, recorded.became_final, recorded.too_many_failures) == (1, False, False)
    # the same request recorded again (it ran twice after a crash): ignored
    assert (await s.record(B, ok_result("a"))).added == 0
    fail = ok_result("b", ok=0, retries=2)
    last = await s.record(B, fail)
    assert (last.added, last.became_final) == (1, True)
    assert (await s.record(B, fail)).became_final is False
    batch = await store.hgetall(keys.batch(B))
    assert (batch[b"succeeded"], batch[b"failed"], batch[b"retries"]) == (b"1", b"1", b"2")
    assert batch[b"status"] == b"finalizing"
    assert await store.hlen(keys.inflight(B)) == 0
    assert await store.xlen(keys.events(B)) == 2
    # the tally counted each once; the success's request body is gone, the failure's kept
    tally = await s.tally(B)
    assert (tally["in"], tally["out"], tally["lat_n"], tally["e:server_error"]) == (
        "3", "2", "2", "1",
    )  # fmt: skip
    assert await store.hkeys(keys.requests(B)) == [b"b"]


async def test_finish_writes_stats_status_end_marker_and_ttl(store: ArqRedis) -> None:
    s = await make_batch(store, ["a"])
    await s.claim(B, 1, "w1")
    await s.record(B, ok_result("a"))
    assert await s.finish(B, ttl_s=60, stats={"p50_ms": "1.0"}) == "completed"
    assert await s.finish(B, ttl_s=60, stats={"p50_ms": "2.0"}) == "completed"  # no-op
    assert await store.hget(keys.stats(B), "p50_ms") == b"1.0"
    entries = await store.xrange(keys.events(B))
    assert entries[-1][1] == {b"end": b"completed"}
    assert 0 < await store.ttl(keys.batch(B)) <= 60
    # big keys are swept (UNLINKed) when the TTL is up; their own TTL is only a backstop
    assert await store.ttl(keys.results(B)) > 60
    seconds, _ = await store.time()
    assert abs(float(await store.zscore(keys.SWEEP, B) or 0) - (seconds + 60)) < 2
    assert await s.active() == []
    assert await s.sweep() == 0  # not due yet


async def test_a_finished_batch_is_swept_once_its_ttl_is_up(store: ArqRedis) -> None:
    s = await make_batch(store, ["a", "b"])
    await s.claim(B, 2, "w1")
    await s.record(B, ok_result("a") + ok_result("b", ok=0))
    await s.finish(B, ttl_s=1, stats={"p50_ms": "1.0"})
    await store.zadd(keys.SWEEP, {B: 1.0})  # due long ago
    assert await s.sweep() == 1
    left = [k async for k in store.scan_iter(match=f"promptq:batch:{{{B}}}*")]
    assert left == []
    assert await store.zcard(keys.SWEEP) == 0


async def test_release_hands_unfinished_requests_back_and_lists_the_batch(
    store: ArqRedis,
) -> None:
    s = await make_batch(store, ["a", "b", "c"])
    await s.claim(B, 3, "w1")
    assert await s.runnable(10) == []
    await s.record(B, ok_result("a"))
    assert await s.release(B, ["a", "b"]) == 1  # "a" already has its result
    assert await store.lrange(keys.pending(B), 0, -1) == [b"b"]
    assert await s.runnable(10) == [B]
    assert await s.release(B, owner="w1") == 1  # what w1 still held: "c"
    assert await store.lrange(keys.pending(B), 0, -1) == [b"c", b"b"]
    assert await s.release(B, owner="w1") == 0


async def test_record_flags_a_failure_rate_over_the_limit_after_the_sample(
    store: ArqRedis,
) -> None:
    ids = [f"r{i}" for i in range(10)]
    s = await make_batch(store, ids)
    await store.hset(keys.batch(B), mapping={"max_failure_rate": 0.5, "failure_min_sample": 4})
    await s.claim(B, 10, "w1")
    flags = []
    for i, ok in enumerate([0, 0, 0, 1, 0]):  # 3 failures in 3: under the sample size
        flags.append((await s.record(B, ok_result(ids[i], ok=ok))).too_many_failures)
    assert flags == [False, False, False, True, True]  # from 4 finished on: 3/4, then 4/5


async def test_stop_ends_never_sent_requests_with_the_result_line_shape(
    store: ArqRedis,
) -> None:
    s = await make_batch(store, ["a", 'b"/{x}', "c"])
    await s.claim(B, 1, "w1")  # "a" is in flight
    status, final = await s.stop(
        B, code="insufficient_quota", message="quota", final_status="failed", reason="r"
    )
    assert (status, final) == ("in_progress", False)
    assert await s.runnable(10) == []
    lines = {r.custom_id: r for r in [Result.model_validate_json(v) async for v in
                                      s.result_lines(B)]}  # fmt: skip
    assert set(lines) == {'b"/{x}', "c"}
    for line in lines.values():
        assert line.error is not None
        assert (line.error.code, line.attempts, line.response, line.route) == (
            "insufficient_quota", 0, None, "realtime",
        )  # fmt: skip
        assert line.id.startswith("batch_req_")
    await s.record(B, ok_result("a"))
    assert await s.status(B) is Status.FINALIZING  # the last result made it final


def test_a_result_line_has_the_models_fields_and_so_does_a_stopped_one() -> None:
    outcome = Outcome(status_code=200, body={}, request_id="r", error=None, attempts=1,
                      latency_ms=1.0)  # fmt: skip
    assert tuple(result_line("q", outcome)) == FIELDS
    assert set(FIELDS) | {"cached"} == set(Result.model_fields)  # the cache's marker
    cached = Outcome(status_code=200, body={}, request_id="r", error=None, attempts=0,
                     latency_ms=0.0, cached=True)  # fmt: skip
    assert tuple(result_line("q", cached)) == (*FIELDS, "cached")
    prefix, middle, suffix = stop_template("c", "m")
    stopped = orjson.loads(prefix + '"id1"' + middle + '"q"' + suffix)
    assert tuple(stopped) == FIELDS


def test_the_lua_prelude_is_generated_from_the_state_machine() -> None:
    text = prelude()
    for status in Status:
        assert f"{status.name}='{status.value}'" in text
    for name, members in [("CLAIMABLE", CLAIMABLE), ("RUNNING", RUNNING),
                          ("STOPPABLE", STOPPABLE), ("TERMINAL", TERMINAL)]:  # fmt: skip
        line = next(line for line in text.splitlines() if line.startswith(f"local {name} "))
        assert sorted(m.value for m in members) == sorted(
            part.split("=")[0].strip(" {") for part in line.split("{", 1)[1].split(",")
        )


async def test_chat_push_queues_once_and_take_hands_each_entry_to_one_worker(
    store: ArqRedis,
) -> None:
    q = ChatQueue(store)
    replica = new_chat_id()
    entries = [ChatEntry(new_chat_id(), {"n": i}, replica, 1e12) for i in range(3)]
    assert await q.push(replica, 1, entries) == 3
    first = await q.take("w1", block_s=0.1)
    more = await q.take_more("w2", 5)
    assert first == entries[0].encode()
    assert more == [e.encode() for e in entries[1:]]
    assert await q.owned("w1") == [entries[0].encode()]
    assert await q.take("w1", block_s=0.1) is None  # nothing left: timed out
    # answered: the line reaches the replica, the entry leaves the worker's list
    answers = [Answer(first, replica, b'{"custom_id": "x"}'), Answer(more[0], replica, b"y")]
    assert await q.reply("w1", answers[:1]) == 1
    assert await q.owned("w1") == []
    assert await q.wait_for_answers(replica, block_s=0.1) == [b'{"custom_id": "x"}']
    await q.reply("w2", answers[1:])
    assert await q.wait_for_answers(replica, block_s=0.1) == [b"y"]
    # not forgotten yet: read again after a dropped connection
    assert await q.undelivered(replica) == [b'{"custom_id": "x"}', b"y"]
    await q.delivered(replica)
    assert await q.undelivered(replica) == []
    # one flush's answers to one replica travel as one element
    lines = [b'{"custom_id": "a"}', b'{"custom_id": "b"}']
    await q.reply("w3", [Answer(b"e1", replica, lines[0]), Answer(b"e2", replica, lines[1])])
    assert await q.wait_for_answers(replica, block_s=0.1) == lines
    await q.delivered(replica)
    # a dead worker's entries go back to the front of the queue, in order
    assert await q.requeue("w2") == 1
    assert await store.lrange(keys.CHAT_QUEUE, 0, -1) == [entries[2].encode()]


async def test_a_chat_push_sent_again_queues_nothing_twice(store: ArqRedis) -> None:
    q = ChatQueue(store)
    replica = new_chat_id()
    entry = ChatEntry(new_chat_id(), {}, replica, 1e12)
    assert await q.push(replica, 1, [entry]) == 1
    assert await q.push(replica, 1, [entry]) == 0  # redis-py's retry of the same push
    assert await q.length() == 1
    assert await q.push(replica, 2, [entry]) == 1  # the next push
    await q.forget_replica(replica)
    assert [k async for k in store.scan_iter(match="promptq:{chat}:*")] == [
        keys.CHAT_QUEUE.encode()
    ]


async def test_liveness_is_measured_on_redis_clock(store: ArqRedis) -> None:
    registry = WorkerRegistry(store, heartbeat_s=0.5)
    await registry.beat("w1", {"pid": 1, "host": "h"})
    assert await registry.live_ids() == ["w1"]
    (beat,) = await registry.live()
    assert (beat["id"], beat["pid"], beat["host"]) == ("w1", 1, "h")
    seconds, _ = await store.time()
    assert abs(beat["last_beat"] - seconds) < 2
    await store.zadd(keys.WORKERS, {"gone": seconds - 60})  # its hash expired long ago
    assert await registry.dead(me="w1") == ["gone"]
    await store.zadd(keys.WORKERS, {"late": seconds - 60})
    await store.hset(keys.worker("late"), "pid", 2)  # beat late, but its hash lives
    assert await registry.dead(me="w1") == ["gone"]
