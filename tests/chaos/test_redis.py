"""Redis dies mid-batch and comes back: workers and followers ride it out.

A private ``redis-server`` with AOF (``appendfsync always``: a SIGKILL loses nothing
acknowledged), real worker processes, the mock upstream with latency so that requests
are in flight when Redis goes down.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from arq.connections import ArqRedis
from redis.exceptions import ConnectionError as RedisConnectionError

from promptq import Producer, Status
from promptq.embedded import local_cluster
from promptq.mock import MockConfig, MockServer
from promptq.shared.chatqueue import ChatQueue
from promptq.shared.connection import connect
from promptq.shared.settings import Settings

from ..conftest import (
    WorkerProcs,
    chat_body,
    chat_keys,
    free_port,
    in_process_worker,
    open_lane,
    wait_until,
)

pytestmark = pytest.mark.e2e

REQUESTS = 300


class PrivateRedis:
    """A ``redis-server`` of this test's own, with AOF, that it may kill and restart."""

    def __init__(self, binary: str, workdir: Path, *args: str) -> None:
        self.binary = binary
        self.workdir = workdir
        self.args = args
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def spawn(self) -> None:
        self.starts += 1
        with (self.workdir / f"redis-{self.starts}.log").open("wb") as log:
            self.proc = subprocess.Popen(
                [self.binary, "--port", str(self.port), "--bind", "127.0.0.1",
                 "--dir", str(self.workdir), "--save", "", "--appendonly", "yes",
                 "--appendfsync", "always", *self.args],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )  # fmt: skip

    async def start(self) -> None:
        """Start it (on the same port and dir as before) and wait until it serves."""
        self.spawn()

        async def answers() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"redis-server exited with {self.proc.returncode}")
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
            except OSError:
                return False
            try:
                writer.write(b"PING\r\n")
                await writer.drain()
                # LOADING while the AOF is replayed; +PONG (or NOAUTH) once it serves
                return (await reader.readline()).startswith((b"+PONG", b"-NOAUTH"))
            except OSError:
                return False
            finally:
                writer.close()
                await writer.wait_closed()

        await wait_until(answers, timeout_s=10, what="redis-server to answer")

    def kill(self) -> None:
        """SIGKILL: no shutdown, no final save; only the AOF survives."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=10)


@contextlib.asynccontextmanager
async def running_redis(tmp_path: Path, *args: str) -> AsyncIterator[PrivateRedis]:
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("needs the redis-server binary to start (and kill) a Redis of its own")
    workdir = tmp_path / "redis"
    workdir.mkdir()
    server = PrivateRedis(binary, workdir, *args)
    await server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
async def private_redis(tmp_path: Path) -> AsyncIterator[PrivateRedis]:
    async with running_redis(tmp_path) as server:
        yield server


@pytest.fixture
async def slow_mock() -> AsyncIterator[MockServer]:
    async with MockServer(MockConfig(latency_ms=200)) as server:
        yield server


async def two_workers_on(
    server: PrivateRedis, settings: Settings, mock: MockServer, procs: WorkerProcs
) -> Settings:
    """Start two worker processes on ``server`` and ``mock``; returns their settings."""
    settings = procs.use(mock, redis_url=server.url, concurrency=10)
    client = await connect(server.url)
    try:
        await procs.launch(client, 2)
    finally:
        await client.aclose()
    return settings


# An immediate restart (redis-py's own retries ride it out) and an outage longer than
# those retries (about 3 s), which promptq's loops must ride out themselves.
@pytest.mark.parametrize("outage_s", [0.0, 4.0], ids=["restart", "down-4s"])
async def test_redis_killed_and_restarted_mid_batch_loses_nothing(
    outage_s: float,
    settings: Settings,
    slow_mock: MockServer,
    private_redis: PrivateRedis,
    worker_procs: WorkerProcs,
) -> None:
    settings = await two_workers_on(private_redis, settings, slow_mock, worker_procs)
    arrivals: list[tuple[float, str]] = []  # (monotonic time, custom_id) as followed

    async with Producer.from_url(private_redis.url, settings=settings) as producer:
        batch = await producer.submit([f"p{i}" for i in range(REQUESTS)])

        async def follow() -> None:
            async for result in batch.as_completed():
                arrivals.append((time.monotonic(), result.custom_id))

        follower = asyncio.create_task(follow())

        async def a_third_done() -> bool:
            if follower.done():
                follower.result()  # surface the follower's error
            return len(arrivals) >= REQUESTS // 3

        await wait_until(a_third_done, timeout_s=30, what="a third of the results")
        private_redis.kill()
        killed_at = time.monotonic()
        await asyncio.sleep(outage_s)  # the fault itself: Redis stays down this long
        await private_redis.start()
        down_s = time.monotonic() - killed_at
        # the follower rides out the restart on its own; wait() too
        stats = await batch.wait(timeout_s=60)
        await asyncio.wait_for(follower, 30)
        info = await batch.info()
        stored = [r async for r in batch.results()]

    assert info.status is Status.COMPLETED
    followed = [cid for _, cid in arrivals]
    assert sorted(followed) == sorted(f"line-{i}" for i in range(1, REQUESTS + 1))
    assert len({r.custom_id for r in stored}) == len(stored) == REQUESTS
    assert all(r.ok for r in stored), [r.error for r in stored if not r.ok][:3]
    assert (info.succeeded, info.failed) == (REQUESTS, 0)
    assert stats.succeeded == REQUESTS
    times = [killed_at] + [t for t, _ in arrivals if t >= killed_at]
    stall_s = max(b - a for a, b in itertools.pairwise(times))
    print(f"Redis down {down_s:.2f} s; longest stall without a new result {stall_s:.2f} s")
    assert stall_s < down_s + 5

    # the workers reconnected instead of crashing, and said so briefly
    assert all(proc.poll() is None for proc in worker_procs.procs), worker_procs.log_text()
    log = worker_procs.log_text()
    assert "Traceback" not in log, log
    warnings = [line for line in log.splitlines() if " WARNING " in line or " ERROR " in line]
    assert len(warnings) <= 8, "\n".join(warnings)


@pytest.mark.parametrize("outage_s", [0.0, 4.0], ids=["restart", "down-4s"])
async def test_redis_killed_and_restarted_with_chat_requests_in_flight(
    outage_s: float,
    settings: Settings,
    slow_mock: MockServer,
    private_redis: PrivateRedis,
    worker_procs: WorkerProcs,
) -> None:
    """Queued, claimed and answered-but-unread chat requests all live in Redis (AOF):
    every waiting handler gets its answer once Redis is back."""
    settings = await two_workers_on(private_redis, settings, slow_mock, worker_procs)
    bodies = [chat_body(f"r{i}") for i in range(60)]
    async with (
        Producer.from_url(private_redis.url, settings=settings) as producer,
        open_lane(producer) as lane,
    ):
        sent = [asyncio.create_task(lane.send(lane.validate(b), timeout_s=60)) for b in bodies]

        async def some_answered() -> bool:
            return sum(t.done() for t in sent) >= 5

        await wait_until(some_answered, timeout_s=30, what="the first answers")
        private_redis.kill()
        await asyncio.sleep(outage_s)  # the fault itself: Redis stays down this long
        await private_redis.start()
        answers = await asyncio.wait_for(asyncio.gather(*sent), 60)
    assert len({chat_id for _line, chat_id in answers}) == 60
    assert all(line["error"] is None for line, _id in answers)
    assert all(proc.poll() is None for proc in worker_procs.procs), worker_procs.log_text()
    assert "Traceback" not in worker_procs.log_text()


def test_worker_exits_with_a_clear_message_when_redis_is_unreachable() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PROMPTQ_")}
    env.update(PROMPTQ_REDIS_URL="redis://127.0.0.1:1", PROMPTQ_REDIS_CONNECT_WAIT_S="0.3")
    done = subprocess.run(
        [sys.executable, "-m", "promptq", "worker"],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        stdin=subprocess.DEVNULL,
    )
    assert done.returncode == 1
    assert "cannot reach Redis at redis://127.0.0.1:1" in done.stderr
    assert "Traceback" not in done.stderr
    assert done.stdout == ""


async def test_requests_claimed_by_a_lost_reply_are_handed_back(
    redis: ArqRedis, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Redis ran a claim but the reply never came back, and redis-py gave up: the
    requests are marked as the worker's, yet it never got them. (A reply lost once is
    covered by the claim's token: redis-py's retry returns the same requests,
    ``test_store``.)"""
    async with in_process_worker(settings) as worker:
        store = worker.engine.store
        real_claim = store.claim
        lost: list[str] = []

        async def claim_with_a_lost_reply(
            batch_id: str, n: int, worker_id: str, **kwargs: Any
        ) -> Any:
            claim = await real_claim(batch_id, n, worker_id, **kwargs)
            if claim.requests and not lost:
                lost.extend(r.custom_id for r in claim.requests)  # ran, reply lost
                raise RedisConnectionError("Connection reset by peer")
            return claim

        monkeypatch.setattr(store, "claim", claim_with_a_lost_reply)
        async with Producer.from_url(settings.redis_url_or_default, settings=settings) as p:
            batch = await p.submit([f"l{i}" for i in range(40)])
            await batch.wait(timeout_s=20)
            info = await batch.info()
            results = [r async for r in batch.results()]
    assert lost  # the scenario happened
    assert info.status is Status.COMPLETED
    assert (info.succeeded, info.failed) == (40, 0)
    assert len({r.custom_id for r in results}) == len(results) == 40
    assert {r.custom_id for r in results} >= set(lost)


async def test_chat_requests_taken_by_a_lost_reply_are_handed_back(
    redis: ArqRedis, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The chat lane's version: the take moved requests into the worker's list, the reply
    was lost, the worker never started them; the recheck after the disruption puts them
    back in the chat queue and they are answered."""
    real_take = ChatQueue.take
    lost: list[bytes] = []

    async def take_with_a_lost_reply(self: ChatQueue, worker_id: str, *, block_s: float) -> Any:
        entry = await real_take(self, worker_id, block_s=block_s)
        if entry is not None and not lost:
            lost.append(entry)  # ran, reply lost
            raise RedisConnectionError("Connection reset by peer")
        return entry

    # patched before the worker starts: its first take is already the patched one
    monkeypatch.setattr(ChatQueue, "take", take_with_a_lost_reply)
    async with (
        in_process_worker(settings),
        Producer.from_url(settings.redis_url_or_default, settings=settings) as p,
        open_lane(p) as lane,
    ):
        bodies = [chat_body(f"c{i}") for i in range(10)]
        answers = await asyncio.gather(*(lane.send(lane.validate(b), timeout_s=20) for b in bodies))
    assert lost  # the scenario happened
    assert all(line["error"] is None for line, _id in answers)
    assert await chat_keys(redis) == []


async def test_an_answer_moved_before_the_apis_connection_dropped_is_delivered(
    redis: ArqRedis, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The API's listener moved an answer into its delivery list, then lost the reply: it
    waits there and is handed to its handler on the next round, not lost (the client
    would otherwise wait for its 504)."""
    async with (
        in_process_worker(settings),
        Producer.from_url(settings.redis_url_or_default, settings=settings) as p,
        open_lane(p) as lane,
    ):
        queue = lane._queue
        real_wait = queue.wait_for_answers
        dropped: list[bytes] = []

        async def wait_with_a_lost_reply(replica: str, *, block_s: float) -> Any:
            lines = await real_wait(replica, block_s=block_s)
            if lines and not dropped:
                dropped.extend(lines)  # moved, reply lost
                raise RedisConnectionError("Connection reset by peer")
            return lines

        monkeypatch.setattr(queue, "wait_for_answers", wait_with_a_lost_reply)
        bodies = [chat_body(f"d{i}") for i in range(5)]
        answers = await asyncio.wait_for(
            asyncio.gather(*(lane.send(lane.validate(b), timeout_s=20) for b in bodies)), 15
        )
    assert dropped  # the scenario happened
    assert all(line["error"] is None for line, _id in answers)
    assert await chat_keys(redis) == []


async def test_an_acl_user_limited_to_promptq_keys_runs_a_batch(
    settings: Settings, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The README's ACL line is enough: keys promptq:* and arq:*, channel promptq:*,
    every command but the dangerous ones; the password never shows in logs."""
    acl = ["--user", "default", "off", "--user", "promptq", "on", ">s3cret-pw",
           "~promptq:*", "~arq:*", "&promptq:*", "+@all", "-@dangerous"]  # fmt: skip
    caplog.set_level(logging.DEBUG)
    async with running_redis(tmp_path, *acl) as server:
        url = server.url.replace("redis://", "redis://promptq:s3cret-pw@")
        settings = settings.model_copy(update={"redis_url": url})
        async with local_cluster(settings, workers=1) as producer:
            batch = await producer.submit([f"acl {i}" for i in range(20)])
            stats = await batch.wait(timeout_s=20)
    assert stats.succeeded == 20
    assert "s3cret-pw" not in caplog.text
