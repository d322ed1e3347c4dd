"""End to end: 1,000 requests through 2 real worker processes and the mock upstream."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from arq.connections import ArqRedis

from promptq import Producer, Status
from promptq.mock import MockServer, expected_content
from promptq.shared import keys
from promptq.shared.settings import Settings

from .conftest import WorkerProcs, wait_until, worker_env

pytestmark = pytest.mark.e2e


def request(i: int) -> dict[str, str]:
    if i % 50 == 7:
        text = f"flaky {i} [[mock status=500 fail=1]]"
    elif i % 70 == 3:
        text = f"limited {i} [[mock status=429 fail=1 retry_after_ms=100]]"
    elif i in (11, 500, 999):
        text = f"bad {i} [[mock status=400]]"
    else:
        text = f"prompt number {i}"
    return {"custom_id": f"r{i}", "prompt": text}


async def test_thousand_requests_two_worker_processes(
    redis: ArqRedis, settings: Settings, mock: MockServer, worker_procs: WorkerProcs
) -> None:
    settings = settings.model_copy(update={"concurrency": 32})
    worker_procs.settings = settings
    await worker_procs.launch(redis, 2)
    items = [request(i) for i in range(1000)]
    recovered = sum(1 for it in items if "fail=1" in it["prompt"])
    async with Producer.from_url(settings.redis_url_or_default, settings=settings) as producer:
        batch = await producer.submit(items)
        streamed = [r async for r in batch.as_completed()]
        stats = await batch.wait(timeout_s=120)
        info = await batch.info()
        stored = {r.custom_id: r async for r in batch.results()}

    async def both_worked() -> bool:
        beats = [await redis.hgetall(keys.worker(w.decode()))
                 for w in await redis.zrange(keys.WORKERS, 0, -1)]  # fmt: skip
        return len(beats) == 2 and all(int(b[b"done"]) + int(b[b"failed"]) > 0 for b in beats)

    # exactly one result per custom_id, streamed and stored alike
    assert len(streamed) == 1000
    assert {r.custom_id for r in streamed} == {it["custom_id"] for it in items}
    assert set(stored) == {it["custom_id"] for it in items}
    for it in items:
        result = stored[it["custom_id"]]
        if "status=400" in it["prompt"]:
            assert result.error is not None
            assert result.response is not None
            assert (result.attempts, result.response.status_code) == (1, 400)
            continue
        assert result.ok, result
        body = {"messages": [{"role": "user", "content": it["prompt"]}]}
        assert result.content == expected_content(body)  # each answer belongs to its request
        assert result.attempts == (2 if "fail=1" in it["prompt"] else 1)

    assert info.status is Status.COMPLETED
    assert (info.succeeded, info.failed, info.retries) == (997, 3, recovered)
    assert (stats.succeeded, stats.failed) == (997, 3)
    assert sum(stats.errors_by_code.values()) == 3
    assert stats.p50_ms <= stats.p95_ms <= stats.max_ms
    assert stats.wall_s > 0
    # both worker processes took part (their heartbeats count what they did)
    await wait_until(both_worked, timeout_s=10, what="both workers to report work done")
    assert "Traceback" not in worker_procs.log_text()


async def test_plain_arq_runs_a_promptq_worker(
    redis: ArqRedis, settings: Settings, mock: MockServer, tmp_path: Path
) -> None:
    """`arq promptq.worker.WorkerSettings`: arq runs the process, its on_startup hook starts
    promptq's engine, and SIGTERM drains it."""
    env = worker_env(settings)
    log = tmp_path / "arq.log"
    with log.open("wb") as out:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "arq", "promptq.worker.WorkerSettings",
            env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )  # fmt: skip
    try:
        await WorkerProcs(settings, tmp_path).wait_ready(redis, 1)
        async with Producer.from_url(settings.redis_url_or_default, settings=settings) as p:
            batch = await p.submit([f"arq {i}" for i in range(30)])
            stats = await batch.wait(timeout_s=30)
        assert stats.succeeded == 30
    finally:
        proc.send_signal(signal.SIGTERM)
        code = await asyncio.wait_for(proc.wait(), 30)
    assert code == 0, log.read_text()
    assert int(await redis.zcard(keys.WORKERS)) == 0  # drained and gone
    assert "Traceback" not in log.read_text()
