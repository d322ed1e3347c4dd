"""Big batches in flat memory: the streaming producer, the loading protocol, the tally
the aggregator reads, limits refused early. Memory is checked by what is allocated
(tracemalloc), not by timings."""

from __future__ import annotations

import io
import random
import tracemalloc
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from arq.connections import ArqRedis

import promptq.producer.parsing as parsing
from promptq import Producer, Status
from promptq.embedded import local_cluster
from promptq.producer.parsing import parse_jsonl, spool_jsonl
from promptq.shared import keys
from promptq.shared.batches import BatchStore
from promptq.shared.errors import InputError
from promptq.shared.settings import Settings
from promptq.shared.stats import compute_stats, stats_from_tally

from .conftest import in_process_worker, wait_until


def jsonl(n: int, *, start: int = 0) -> bytes:
    return b"".join(
        orjson.dumps({"custom_id": f"r{i}", "prompt": f"Summarise fact number {i} " * 3}) + b"\n"
        for i in range(start, start + n)
    )


def test_validating_a_file_keeps_a_few_bytes_a_line_not_the_file() -> None:
    data = jsonl(100_000)  # about 9 MB of input
    stream = io.BytesIO(data)
    tracemalloc.start()
    try:
        with spool_jsonl(stream, source="big.jsonl", default_model="m") as batch:
            _, peak = tracemalloc.get_traced_memory()
            assert batch.total == 100_000
    finally:
        tracemalloc.stop()
    # holding the requests (parsed dicts, QueuedRequests) would take well over 100 MB;
    # what is kept is 8 bytes of hash a line in a set, plus the reading buffer
    assert peak < 25 * 1024 * 1024, f"{peak / 2**20:.1f} MB"
    tracemalloc.start()
    try:
        parse_jsonl(data, source="big.jsonl", default_model="m", max_lines=200_000)
        _, in_memory = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert in_memory > 4 * peak  # the in-memory parser is what the spool avoids


def test_a_file_over_the_limit_is_refused_after_reading_no_more_than_it_needs() -> None:
    class Counting(io.BytesIO):
        lines_read = 0

        def __iter__(self) -> Iterator[bytes]:
            while line := self.readline():
                Counting.lines_read += 1
                yield line

    stream = Counting(jsonl(5_000))
    with pytest.raises(InputError) as refused:
        spool_jsonl(stream, source="big.jsonl", default_model="m", max_lines=100)
    assert Counting.lines_read == 101  # it stopped at the first line over the limit
    message = str(refused.value)
    assert "more than 100 lines" in message
    assert "PROMPTQ_MAX_LINES" in message
    with pytest.raises(InputError, match="PROMPTQ_MAX_FILE_BYTES"):
        spool_jsonl(io.BytesIO(jsonl(100)), source="x", default_model="m", max_bytes=1000)


def test_custom_ids_that_share_a_hash_are_told_apart(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(parsing, "id_key", lambda custom_id: 42)  # every id collides
    distinct = jsonl(50)
    with spool_jsonl(io.BytesIO(distinct), source="x", default_model="m") as batch:
        assert batch.total == 50  # no false duplicate
    duplicated = distinct + orjson.dumps({"custom_id": "r7", "prompt": "again"}) + b"\n"
    with pytest.raises(InputError) as bad:
        spool_jsonl(io.BytesIO(duplicated), source="x", default_model="m")
    (error,) = bad.value.errors
    assert (error.line, error.field) == (51, "custom_id")
    assert "duplicate custom_id 'r7' (first on line 8)" in error.message


def test_the_fingerprint_ignores_line_order_but_not_content() -> None:
    one = spool_jsonl(io.BytesIO(jsonl(20)), source="a", default_model="m")
    lines = jsonl(20).splitlines(keepends=True)
    shuffled = spool_jsonl(io.BytesIO(b"".join(reversed(lines))), source="b", default_model="m")
    other_model = spool_jsonl(io.BytesIO(jsonl(20)), source="c", default_model="other")
    with one, shuffled, other_model:
        assert one.fingerprint == shuffled.fingerprint
        assert one.fingerprint != other_model.fingerprint


def test_stats_from_the_tally_match_a_recomputation_from_the_lines() -> None:
    rng = random.Random(7)
    latencies = [rng.lognormvariate(5, 1.2) for _ in range(5000)] + [0.2, 0.0004, 90_000.0]
    buckets: dict[str, str] = {}
    lines = []
    tally: dict[str, Any] = {"lat_n": 0, "lat_sum": 0.0, "lat_max": 0.0, "in": 0, "out": 0}
    for i, latency in enumerate(latencies):
        ok = i % 9 != 0
        lines.append({"custom_id": f"c{i}", "attempts": 1, "latency_ms": latency,
                      "error": None if ok else {"code": "server_error", "message": "x"},
                      "response": {"body": {"usage": {"prompt_tokens": 2,
                                                      "completion_tokens": 3}}}})  # fmt: skip
        bucket = f"h:{parsing_bucket(latency)}"
        buckets[bucket] = str(int(buckets.get(bucket, "0")) + 1)
        tally["lat_n"] += 1
        tally["lat_sum"] += latency
        tally["lat_max"] = max(tally["lat_max"], latency)
        tally["in"] += 2
        tally["out"] += 3
    failed = sum(1 for line in lines if line["error"])
    tally.update(buckets)
    tally["e:server_error"] = failed
    exact = compute_stats(lines, wall_s=10.0)
    from_tally = stats_from_tally(
        {k: str(v) for k, v in tally.items()},
        succeeded=len(lines) - failed,
        failed=failed,
        wall_s=10.0,
    )
    for field in ("p50_ms", "p90_ms", "p95_ms", "p99_ms"):
        assert getattr(from_tally, field) == pytest.approx(getattr(exact, field), rel=1e-3)
    for field in ("succeeded", "failed", "success_rate", "input_tokens", "output_tokens",
                  "errors_by_code", "throughput_rps"):  # fmt: skip
        assert getattr(from_tally, field) == getattr(exact, field), field
    assert from_tally.mean_ms == pytest.approx(exact.mean_ms, rel=1e-9)
    assert from_tally.max_ms == pytest.approx(exact.max_ms, rel=1e-9)


def parsing_bucket(latency: float) -> int:
    from promptq.shared.stats import latency_bucket

    return latency_bucket(latency)


async def test_a_batch_s_stats_equal_a_recomputation_from_its_result_lines(
    redis: ArqRedis, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    items = [f"q{i} [[mock latency_ms={5 + 7 * (i % 13)}]]" for i in range(150)]
    items += ["bad [[mock status=400]]", "flaky [[mock status=500 fail=1]]", "quota-ok"]

    async def no_reading_results(self: BatchStore, batch_id: str) -> Any:
        raise AssertionError("the aggregator must not read every result line")
        yield b""  # pragma: no cover

    monkeypatch.setattr(BatchStore, "result_lines", no_reading_results)
    async with local_cluster(settings, workers=2) as producer:
        batch = await producer.submit(items)
        stats = await batch.wait(timeout_s=30)
    monkeypatch.undo()
    lines = [orjson.loads(v) async for v in BatchStore(redis).result_lines(batch.id)]
    exact = compute_stats(lines, wall_s=stats.wall_s)
    assert (stats.succeeded, stats.failed, stats.errors_by_code) == (
        exact.succeeded, exact.failed, exact.errors_by_code,
    )  # fmt: skip
    assert (stats.input_tokens, stats.output_tokens) == (exact.input_tokens, exact.output_tokens)
    for field in ("p50_ms", "p90_ms", "p99_ms"):
        assert getattr(stats, field) == pytest.approx(getattr(exact, field), rel=1e-3, abs=1e-3)
    assert stats.max_ms == pytest.approx(exact.max_ms, abs=1e-3)


async def test_workers_start_before_the_last_request_is_written(
    redis: ArqRedis, settings: Settings, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    real_append = BatchStore.append
    results_before_the_last_chunk: list[int] = []
    appended = 0

    async def slow_append(self: BatchStore, batch_id: str, requests: Any, **kw: Any) -> Any:
        nonlocal appended
        appended += 1
        if appended == 8:  # the last chunk (8 x 500): have workers answered some already?

            async def answered() -> bool:
                return int(await redis.hlen(keys.results(batch_id))) > 0

            await wait_until(answered, what="results while the batch is loading")
            results_before_the_last_chunk.append(int(await redis.hlen(keys.results(batch_id))))
            assert await redis.hget(keys.batch(batch_id), "loading") == b"1"
        return await real_append(self, batch_id, requests, **kw)

    monkeypatch.setattr(BatchStore, "append", slow_append)
    src = tmp_path / "in.jsonl"
    src.write_bytes(jsonl(4000))
    async with (
        in_process_worker(settings),
        Producer.from_url(settings.redis_url_or_default, settings=settings) as producer,
    ):
        batch = await producer.submit_file(src)
        stats = await batch.wait(timeout_s=60)
    assert results_before_the_last_chunk
    assert results_before_the_last_chunk[0] > 0
    assert stats.succeeded == 4000
    assert await redis.hget(keys.batch(batch.id), "loading") is None


async def test_a_producer_dying_while_loading_is_completed_by_resuming(
    redis: ArqRedis, settings: Settings, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    real_append = BatchStore.append
    calls = 0

    async def dies_at_the_third_chunk(
        self: BatchStore, batch_id: str, requests: Any, **kw: Any
    ) -> Any:
        nonlocal calls
        calls += 1
        if calls == 3:
            raise ConnectionError("the producer's machine went away")
        return await real_append(self, batch_id, requests, **kw)

    src = tmp_path / "in.jsonl"
    src.write_bytes(jsonl(2000))
    async with Producer.from_url(settings.redis_url_or_default, settings=settings) as producer:
        monkeypatch.setattr(BatchStore, "append", dies_at_the_third_chunk)
        with pytest.raises(ConnectionError):
            await producer.submit_file(src, batch_id="half-loaded")
        monkeypatch.undo()
        raw = await redis.hgetall(keys.batch("half-loaded"))
        assert (raw[b"status"], raw[b"written"], raw[b"loading"]) == (b"queued", b"1000", b"1")
        async with in_process_worker(settings):
            batch = await producer.submit_file(src, batch_id="half-loaded", resume=True)
            stats = await batch.wait(timeout_s=60)
        results = [orjson.loads(v) async for v in BatchStore(redis).result_lines(batch.id)]
    assert stats.succeeded == 2000
    assert sorted(int(r["custom_id"][1:]) for r in results) == list(range(2000))  # once each


async def test_a_cancel_while_loading_still_gives_every_request_a_line(
    redis: ArqRedis, settings: Settings, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    real_append = BatchStore.append
    calls = 0

    async def cancel_midway(self: BatchStore, batch_id: str, requests: Any, **kw: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls == 3:
            await BatchStore(redis).cancel(batch_id)
        return await real_append(self, batch_id, requests, **kw)

    monkeypatch.setattr(BatchStore, "append", cancel_midway)
    src = tmp_path / "in.jsonl"
    src.write_bytes(jsonl(3000))
    async with Producer.from_url(settings.redis_url_or_default, settings=settings) as producer:
        batch = await producer.submit_file(src)
        async with in_process_worker(settings):
            await batch.wait(timeout_s=60)
        info = await batch.info()
        results = [r async for r in batch.results()]
    assert info.status is Status.CANCELLED
    assert len(results) == 3000
    assert len({r.custom_id for r in results}) == 3000
    assert sum(1 for r in results if r.error and r.error.code == "batch_cancelled") >= 2000
