"""The ``python:MODULE:FUNCTION`` backend: local functions instead of an HTTP upstream,
with real worker processes where the process matters (pools, heartbeats, startup)."""

from __future__ import annotations

import asyncio
import itertools
import os
import time
from pathlib import Path

import pytest
from arq.connections import ArqRedis

from promptq import Producer, Status
from promptq.embedded import local_cluster
from promptq.shared import keys
from promptq.shared.settings import Settings

from .conftest import REPO, WorkerProcs, wait_until
from .test_cli import cli

FNS = "python:tests.backend_fns"


def calls(log: Path) -> list[list[str]]:
    """The call log: kind, key, pid, start, end per call."""
    return [line.split("\t") for line in log.read_text().splitlines()] if log.exists() else []


def backend_env(log: Path, backend: str, **extra: str) -> dict[str, str]:
    path = os.pathsep.join([str(REPO), str(REPO / "examples")])
    return {"PROMPTQ_BACKEND": backend, "PROMPTQ_TEST_CALL_LOG": str(log), "PYTHONPATH": path,
            **extra}  # fmt: skip


async def test_real_workers_answer_each_request_with_the_function(
    redis: ArqRedis, settings: Settings, worker_procs: WorkerProcs, tmp_path: Path
) -> None:
    log = tmp_path / "calls.log"
    await worker_procs.launch(redis, 2, **backend_env(log, f"{FNS}:echo"))
    async with Producer.from_url(settings.redis_url_or_default, settings=settings) as producer:
        batch = await producer.submit([{"custom_id": f"e{i}", "prompt": f"p{i}"}
                                       for i in range(50)])  # fmt: skip
        stats = await batch.wait(timeout_s=30)
        results = {r.custom_id: r async for r in batch.results()}
    assert (stats.succeeded, stats.failed) == (50, 0)
    for i in range(50):
        r = results[f"e{i}"]
        assert r.response is not None
        assert r.response.status_code == 200
        assert r.response.body["echo"] == f"p{i}"  # its own answer
        assert r.response.body["endpoint"] == "/v1/chat/completions"
        assert (r.attempts, r.route) == (1, "realtime")
    assert len(calls(log)) == 50  # each request called the function once
    assert len({c[2] for c in calls(log)}) == 2  # both worker processes took some
    assert stats.input_tokens == 50  # usage counted as for an HTTP upstream


async def test_a_process_pool_runs_gil_holding_calls_side_by_side(
    redis: ArqRedis, settings: Settings, worker_procs: WorkerProcs, tmp_path: Path
) -> None:
    log = tmp_path / "calls.log"
    env = backend_env(log, f"{FNS}:hold_gil", PROMPTQ_BACKEND_PROCESSES="2")
    await worker_procs.launch(redis, 1, **env)
    async with Producer.from_url(settings.redis_url_or_default, settings=settings) as producer:
        batch = await producer.submit([f"work {i} 0.4" for i in range(6)])
        stats = await batch.wait(timeout_s=60)
    assert stats.succeeded == 6
    rows = calls(log)
    assert len(rows) == 6
    pids = {pid for _kind, _key, pid, _s, _e in rows}
    assert len(pids) == 2  # two pool processes, neither of them the worker itself
    assert str(worker_procs.procs[0].pid) not in pids
    spans = sorted((float(s), float(e)) for *_head, s, e in rows)
    overlaps = sum(1 for (s1, e1), (s2, _e2) in itertools.pairwise(spans) if s2 < e1)
    assert overlaps >= 2  # calls ran at the same time, not one after another


async def test_heartbeats_stay_on_time_while_threads_hold_the_gil(
    redis: ArqRedis, settings: Settings, worker_procs: WorkerProcs, tmp_path: Path
) -> None:
    log = tmp_path / "calls.log"
    env = backend_env(log, f"{FNS}:hold_gil", PROMPTQ_BACKEND_THREADS="4")
    await worker_procs.launch(redis, 1, **env)
    (worker_id,) = [w.decode() for w in await redis.zrange(keys.WORKERS, 0, -1)]
    beats: list[float] = []
    async with Producer.from_url(settings.redis_url_or_default, settings=settings) as producer:
        batch = await producer.submit([f"hold {i} 2.5" for i in range(8)])  # 2 rounds of 4

        async def finished() -> bool:
            last = await redis.hget(keys.worker(worker_id), "last_beat")
            if last is not None and (not beats or float(last) != beats[-1]):
                beats.append(float(last))
            return (await batch.info(with_stats=False)).status is Status.COMPLETED

        await wait_until(finished, timeout_s=60, what="the batch")
        results = [r async for r in batch.results()]
    gaps = [b - a for a, b in itertools.pairwise(beats)]
    print("heartbeat gaps (s):", [round(g, 2) for g in gaps])
    assert len(beats) >= 6  # it beat all along (about every 0.5 s for 5 s)
    assert max(gaps) < 3 * settings.heartbeat_s, gaps  # never late enough to look dead
    assert len(calls(log)) == 8  # no request ran twice
    assert all(r.ok and r.attempts == 1 for r in results)
    assert "died" not in worker_procs.log_text()


async def test_backend_errors_are_retried_only_when_they_say_so(
    redis: ArqRedis, settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    log = tmp_path / "calls.log"
    monkeypatch.setenv("PROMPTQ_TEST_CALL_LOG", str(log))
    flaky = settings.model_copy(update={"backend": f"{FNS}:flaky", "max_attempts": 4})
    async with local_cluster(flaky, workers=1) as producer:
        batch = await producer.submit(["busy", "fatal", "boom", "list"])
        stats = await batch.wait(timeout_s=30)
        results = {r.custom_id: r async for r in batch.results()}
    busy, fatal, boom, listed = (results[f"line-{i}"] for i in range(1, 5))
    assert (busy.ok, busy.attempts) == (True, 3)  # retryable: failed twice, then answered
    assert fatal.error is not None
    assert fatal.response is not None
    assert (fatal.attempts, fatal.error.code, fatal.response.status_code) == (1, "refused", 422)
    assert "the model refused this input" in fatal.error.message
    assert boom.error is not None
    assert (boom.attempts, boom.error.code) == (1, "backend_error")
    assert "ValueError: something inside the function broke" in boom.error.message
    assert listed.error is not None
    assert "not a dict" in listed.error.message
    assert stats.errors_by_code == {"refused": 1, "backend_error": 2}
    assert int(await redis.hget(keys.batch(batch.id), "retries") or 0) == 2


async def test_an_async_function_is_awaited_on_the_loop(
    redis: ArqRedis, settings: Settings
) -> None:
    async_backend = settings.model_copy(update={"backend": f"{FNS}:async_echo"})
    async with local_cluster(async_backend, workers=1) as producer:
        batch = await producer.submit([f"a{i}" for i in range(20)])
        stats = await batch.wait(timeout_s=30)
        results = [r async for r in batch.results()]
    assert stats.succeeded == 20
    assert all(r.response is not None and r.response.body["async"] for r in results)


async def test_the_cpu_bound_example_answers_chat_and_embeddings(
    redis: ArqRedis, settings: Settings, worker_procs: WorkerProcs, tmp_path: Path
) -> None:
    env = backend_env(tmp_path / "unused.log", "python:cpu_backend:complete",
                      PROMPTQ_BACKEND_PROCESSES="2")  # fmt: skip
    await worker_procs.launch(redis, 1, **env)
    async with Producer.from_url(settings.redis_url_or_default, settings=settings) as producer:
        chat = await producer.submit([{"prompt": "one two three", "max_tokens": 4}] * 3)
        embed = await producer.submit(
            [{"custom_id": f"v{i}", "method": "POST", "url": "/v1/embeddings",
              "body": {"model": "local", "input": f"text {i}"}} for i in range(3)]
        )  # fmt: skip
        await chat.wait(timeout_s=30)
        await embed.wait(timeout_s=30)
        answers = [r async for r in chat.results()]
        vectors = [r async for r in embed.results()]
    assert {r.content for r in answers} == {"three two one"}
    assert all(r.response is not None and len(r.response.body["data"][0]["embedding"]) == 8
               for r in vectors)  # fmt: skip


@pytest.mark.parametrize(
    ("backend", "message"),
    [
        ("python:no_such_module_here:fn", "cannot import module 'no_such_module_here'"),
        (f"{FNS}:missing", "has no 'missing'"),
        (f"{FNS}:not_callable", "'not_callable' is not a function"),
        ("python:justonepart", "expected python:MODULE:FUNCTION"),
        ("grpc", "unknown backend 'grpc'"),
    ],
)
async def test_a_backend_that_cannot_load_is_a_clear_startup_error(
    backend: str, message: str, tmp_path: Path
) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PROMPTQ_")}
    env.update(backend_env(tmp_path / "x.log", backend))
    env["PROMPTQ_REDIS_URL"] = "redis://127.0.0.1:1"  # never reached: it fails before
    started = time.monotonic()
    code, stdout, stderr = await cli("worker", env=env, timeout_s=30)
    assert code == 2, stderr
    assert message in stderr
    assert "Traceback" not in stderr
    assert stdout == ""
    assert time.monotonic() - started < 20


def test_backend_error_survives_a_process_pool() -> None:
    import pickle

    from promptq import BackendError

    error = pickle.loads(pickle.dumps(BackendError("x", status_code=409, code="c", retryable=True)))
    assert (error.message, error.status_code, error.code, error.retryable) == ("x", 409, "c", True)


async def test_backend_threads_cap_what_a_worker_claims(
    redis: ArqRedis, settings: Settings
) -> None:
    threaded = settings.model_copy(
        update={"backend": f"{FNS}:echo", "backend_threads": 3, "concurrency": 50}
    )
    async with local_cluster(threaded, workers=1) as producer:
        beat = await wait_until(lambda: _beat(redis), what="the heartbeat")
        await (await producer.submit(["x"])).wait(timeout_s=20)
    assert beat[b"concurrency"] == b"3"  # no request waits inside the worker for a thread


async def _beat(redis: ArqRedis) -> dict[bytes, bytes]:
    ids = await redis.zrange(keys.WORKERS, 0, -1)
    return await redis.hgetall(keys.worker(ids[0].decode())) if ids else {}


_ = asyncio  # the module's tests are async (asyncio_mode = auto)
