"""`promptq run --batch-id ID` after a crash resumes the batch instead of sending it again.

The crash is simulated by submitting with the Python API (the "first run" that died);
then `promptq run` is started as a real process on the same input and the same id.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import orjson
import pytest
from arq.connections import ArqRedis

from promptq import BatchError, Producer, Status
from promptq.mock import MockConfig, MockServer
from promptq.producer import parse_file
from promptq.producer.parsing import SpooledBatch
from promptq.shared import keys
from promptq.shared.settings import Settings

from .conftest import WorkerProcs, wait_until, worker_env

pytestmark = pytest.mark.e2e

N = 60


@pytest.fixture
async def slow_mock() -> AsyncIterator[MockServer]:
    async with MockServer(MockConfig(latency_ms=200)) as server:
        yield server


def write_input(path: Path, n: int = N, *, word: str = "resume") -> Path:
    lines = [orjson.dumps({"custom_id": f"r{i}", "prompt": f"{word} {i}"}) for i in range(n)]
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


async def promptq_run(
    settings: Settings, tmp_path: Path, input_path: Path, batch_id: str, *, workers: int = 0
) -> tuple[int, str, list[dict[str, object]]]:
    """`promptq run` as its own process (asynchronously: the mock runs on this loop).
    Returns the exit code, stderr and every output line (successes and failures)."""
    out = tmp_path / "out.jsonl"
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "promptq", "run", str(input_path), "-o", str(out),
        "--batch-id", batch_id, "--workers", str(workers),
        env=worker_env(settings),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    _, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    lines = []
    for path in (out, tmp_path / "out.errors.jsonl"):
        if path.exists():
            lines += [orjson.loads(line) for line in path.read_bytes().splitlines()]
    return proc.returncode, err.decode(), lines


async def test_run_resumes_a_batch_whose_producer_died_without_sending_twice(
    redis: ArqRedis,
    settings: Settings,
    slow_mock: MockServer,
    worker_procs: WorkerProcs,
    tmp_path: Path,
) -> None:
    settings = worker_procs.use(slow_mock, concurrency=10)
    await worker_procs.launch(redis, 1)
    input_path = write_input(tmp_path / "in.jsonl")
    async with Producer.from_url(settings.redis_url_or_default, settings=settings) as producer:
        batch = await producer.submit_file(input_path, batch_id="nightly-1")

        async def some_done() -> bool:
            return (await batch.info()).done >= 10

        await wait_until(some_done, what="a few results before the 'crash'")
    # the first run died here; the second one, same input, same id:
    code, err, lines = await promptq_run(settings, tmp_path, input_path, "nightly-1")
    assert code == 0, err
    assert "resuming" in err
    assert sorted(str(line["custom_id"]) for line in lines) == sorted(f"r{i}" for i in range(N))
    assert all(line["error"] is None for line in lines)
    assert slow_mock.stats.requests == N  # nothing was sent twice
    assert int(await redis.hget(keys.batch("nightly-1"), "total")) == N  # type: ignore[misc]

    # a finished batch resumes too: its results are written again, nothing is sent
    code, err, lines = await promptq_run(settings, tmp_path, input_path, "nightly-1")
    assert code == 0, err
    assert len(lines) == N
    assert slow_mock.stats.requests == N


async def test_run_resumes_a_batch_whose_workers_and_tickets_are_all_gone(
    redis: ArqRedis,
    settings: Settings,
    slow_mock: MockServer,
    worker_procs: WorkerProcs,
    tmp_path: Path,
) -> None:
    settings = worker_procs.use(slow_mock, concurrency=10)
    await worker_procs.launch(redis, 1)
    input_path = write_input(tmp_path / "in.jsonl")
    async with Producer.from_url(settings.redis_url_or_default, settings=settings) as producer:
        batch = await producer.submit_file(input_path, batch_id="nightly-2")

        async def some_in_flight() -> bool:
            return (
                int(await redis.hlen(keys.inflight(batch.id))) > 0  # type: ignore[misc]
                and (await batch.info()).done >= 10
            )

        await wait_until(some_in_flight, what="requests in flight")
        worker_procs.kill(0)  # the machine went down: producer and worker
        await redis.delete(keys.RUNNABLE)  # and, as if Redis lost it, the runnable index
        assert (await batch.info()).status is Status.IN_PROGRESS
    code, err, lines = await promptq_run(settings, tmp_path, input_path, "nightly-2", workers=1)
    assert code == 0, err
    assert sorted(str(line["custom_id"]) for line in lines) == sorted(f"r{i}" for i in range(N))
    # only requests in flight at the crash may have been sent twice
    assert slow_mock.stats.requests <= N + settings.concurrency


async def test_resume_lists_a_batch_the_runnable_index_lost(
    redis: ArqRedis, settings: Settings, worker_procs: WorkerProcs, tmp_path: Path
) -> None:
    # a SpooledBatch: the requests wait in a spool file, deleted on close
    with parse_file(write_input(tmp_path / "in.jsonl"), settings=settings) as parsed:
        await _resume_after_losing_the_index(redis, settings, worker_procs, parsed)


async def _resume_after_losing_the_index(
    redis: ArqRedis, settings: Settings, worker_procs: WorkerProcs, parsed: SpooledBatch
) -> None:
    async with Producer.from_url(settings.redis_url_or_default, settings=settings) as producer:
        await producer.submit(parsed, batch_id="nightly-5")
        await redis.delete(keys.RUNNABLE)  # the index lost it; no worker holds anything
        batch = await producer.submit(parsed, batch_id="nightly-5", resume=True)
        assert await redis.zscore(keys.RUNNABLE, batch.id) is not None  # listed again
        # nothing enqueued twice
        assert int(await redis.llen(keys.pending(batch.id))) == N  # type: ignore[misc]
        worker_procs.start(1)
        await batch.wait(timeout_s=30)
        assert (await batch.info()).succeeded == N


async def test_run_refuses_to_resume_a_batch_from_other_input(
    redis: ArqRedis, settings: Settings, tmp_path: Path
) -> None:
    first = write_input(tmp_path / "first.jsonl")
    async with Producer.from_url(settings.redis_url_or_default, settings=settings) as producer:
        await producer.submit_file(first, batch_id="nightly-3")
        # same custom_ids, other prompts: the Python API says no too
        other_input = write_input(tmp_path / "other.jsonl", word="other")
        with (
            parse_file(other_input, settings=settings) as other,
            pytest.raises(BatchError, match="other requests"),
        ):
            await producer.submit(other, batch_id="nightly-3", resume=True)
    for changed in (
        write_input(tmp_path / "fewer.jsonl", N - 1),
        tmp_path / "other.jsonl",
    ):
        code, err, lines = await promptq_run(settings, tmp_path, changed, "nightly-3")
        assert code == 2
        assert "nightly-3" in err
        assert "other requests" in err
        assert "Traceback" not in err
        assert lines == []
    # nothing was enqueued again
    assert int(await redis.llen(keys.pending("nightly-3"))) == N  # type: ignore[misc]
    assert int(await redis.hlen(keys.requests("nightly-3"))) == N  # type: ignore[misc]


async def test_run_starts_over_a_batch_its_producer_left_validating(
    redis: ArqRedis,
    settings: Settings,
    mock: MockServer,
    worker_procs: WorkerProcs,
    tmp_path: Path,
) -> None:
    await worker_procs.launch(redis, 1)
    # a producer died while writing the requests: half of them, and the status says so
    half = [f"r{i}" for i in range(N // 2)]
    await redis.hset(keys.batch("nightly-4"), mapping={"status": "validating", "total": N})  # type: ignore[misc]
    await redis.rpush(keys.pending("nightly-4"), *half)  # type: ignore[misc]
    input_path = write_input(tmp_path / "in.jsonl")
    code, err, lines = await promptq_run(settings, tmp_path, input_path, "nightly-4")
    assert code == 0, err
    assert "resuming" not in err
    assert sorted(str(line["custom_id"]) for line in lines) == sorted(f"r{i}" for i in range(N))
    assert mock.stats.requests == N


async def test_resume_needs_a_batch_id(redis: ArqRedis, settings: Settings) -> None:
    async with Producer.from_url(settings.redis_url_or_default, settings=settings) as producer:
        with pytest.raises(ValueError, match="batch_id"):
            await producer.submit(["hi"], resume=True)
        # an id that names nothing yet: an ordinary submit
        batch = await producer.submit(["hi"], batch_id="fresh-1", resume=True)
        assert (await batch.info()).total == 1
