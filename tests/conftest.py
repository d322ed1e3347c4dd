"""Shared fixtures.

Redis: ``PROMPTQ_TEST_REDIS_URL`` if set (use a database of its own, e.g.
``redis://127.0.0.1:6379/15``: every test FLUSHDBs it), else a throwaway
``redis-server`` started on a free port for the session. With neither, Redis tests
fail and say how to get one.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from arq.connections import ArqRedis
from openai import AsyncOpenAI

from promptq import Producer
from promptq.api.lane import ChatLane
from promptq.mock import MockConfig, MockServer
from promptq.shared import keys
from promptq.shared.connection import RedisHealth, connect
from promptq.shared.settings import Settings
from promptq.worker import LocalWorker

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    url = os.environ.get("PROMPTQ_TEST_REDIS_URL")
    if url:
        yield url
        return
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.fail(
            "These tests need Redis. Set PROMPTQ_TEST_REDIS_URL=redis://HOST:PORT/DB (a "
            "database the tests may flush) or install redis-server (apt-get install "
            "redis-server) so the suite can start a throwaway one.",
            pytrace=False,
        )
    with redis_server(binary) as url:
        yield url


@contextlib.contextmanager
def redis_server(binary: str, *extra: str, bind: str = "127.0.0.1") -> Iterator[str]:
    """A throwaway ``redis-server`` on a free port (``extra``: more of its flags)."""
    port = free_port()
    workdir = tempfile.mkdtemp(prefix="promptq-test-redis-")
    proc = subprocess.Popen(
        [binary, "--port", str(port), "--bind", bind, "--save", "", "--appendonly", "no",
         "--dir", workdir, *extra],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.monotonic() + 10
    while True:
        try:
            with socket.create_connection((bind, port), timeout=0.2):
                break
        except OSError:
            if time.monotonic() > deadline or proc.poll() is not None:
                proc.kill()
                pytest.fail(f"redis-server did not start on port {port}", pytrace=False)
            time.sleep(0.02)
    try:
        yield f"redis://{bind}:{port}/0"
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[ArqRedis]:
    client = await connect(redis_url)
    await client.flushdb()
    try:
        yield client
    finally:
        await client.flushdb()
        await client.aclose()


@pytest.fixture
async def mock() -> AsyncIterator[MockServer]:
    async with MockServer(MockConfig(model="mock-gpt")) as server:
        yield server


@pytest.fixture
def settings(redis_url: str, mock: MockServer) -> Settings:
    return Settings(
        redis_url=redis_url,
        upstream_url=mock.url,
        model="mock-gpt",
        concurrency=16,
        max_attempts=4,
        timeout_s=5,
        heartbeat_s=0.5,
    )


async def wait_until(
    check: Callable[[], Awaitable[Any]], *, timeout_s: float = 10.0, what: str = "condition"
) -> Any:
    """Poll ``check`` until it returns something truthy; fail after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = await check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
        await asyncio.sleep(0.02)


def chat_body(text: str) -> dict[str, Any]:
    """A chat completion request body for the mock."""
    return {"model": "mock-gpt", "messages": [{"role": "user", "content": text}]}


async def chat_keys(redis: ArqRedis) -> list[bytes]:
    """Every key of the chat lane (none left once every request is answered)."""
    return [k async for k in redis.scan_iter(match="promptq:{chat}:*")]


@contextlib.asynccontextmanager
async def open_lane(producer: Producer) -> AsyncIterator[ChatLane]:
    """The API's chat lane on ``producer``, closed on the way out."""
    lane = ChatLane(producer)
    try:
        yield lane
    finally:
        await lane.close()


@contextlib.asynccontextmanager
async def in_process_worker(settings: Settings) -> AsyncIterator[LocalWorker]:
    """A worker running in this event loop (its stores can be patched), from started to
    stopped (as on SIGTERM: in-flight requests get ``shutdown_grace_s``)."""
    health = RedisHealth()
    redis = await connect(settings.redis_url_or_default, health=health)
    worker = LocalWorker(redis, settings, health=health)
    try:
        await worker.start()
        yield worker
    finally:
        try:
            await worker.stop()
        finally:
            await redis.aclose()


def worker_env(settings: Settings, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PROMPTQ_")}
    env.update(
        PROMPTQ_REDIS_URL=settings.redis_url_or_default,
        PROMPTQ_UPSTREAM_URL=settings.upstream_url,
        PROMPTQ_MODEL=settings.model,
        PROMPTQ_CONCURRENCY=str(settings.concurrency),
        PROMPTQ_MAX_ATTEMPTS=str(settings.max_attempts),
        PROMPTQ_TIMEOUT_S=str(settings.timeout_s),
        PROMPTQ_HEARTBEAT_S=str(settings.heartbeat_s),
    )
    env.update(extra)
    return env


class WorkerProcs:
    """Real ``promptq worker`` processes; logs kept in files for assertions."""

    def __init__(self, settings: Settings, tmp_path: Path) -> None:
        self.settings = settings
        self.tmp_path = tmp_path
        self.procs: list[subprocess.Popen[bytes]] = []
        self.logs: list[Path] = []

    def use(self, mock: MockServer, **update: object) -> Settings:
        """Point the workers started from now on at ``mock``, with ``update`` applied;
        returns their settings."""
        self.settings = self.settings.model_copy(update={"upstream_url": mock.url, **update})
        return self.settings

    async def launch(self, redis: ArqRedis, count: int, **env: str) -> None:
        """Start ``count`` workers and wait until ``count`` heartbeats are in Redis."""
        self.start(count, **env)
        await self.wait_ready(redis, count)

    def start(self, count: int, **env: str) -> None:
        for _ in range(count):
            log = self.tmp_path / f"worker-{len(self.procs)}.log"
            with log.open("wb") as out:
                self.procs.append(
                    subprocess.Popen(
                        [sys.executable, "-m", "promptq", "--log-level", "INFO", "worker"],
                        env=worker_env(self.settings, **env),
                        stdout=out,
                        stderr=subprocess.STDOUT,
                        stdin=subprocess.DEVNULL,
                    )
                )
            self.logs.append(log)

    async def wait_ready(self, redis: ArqRedis, count: int) -> None:
        async def live() -> bool:
            return int(await redis.zcard(keys.WORKERS)) >= count

        await wait_until(live, timeout_s=20, what=f"{count} worker heartbeat(s)")

    def kill(self, index: int) -> None:
        """SIGKILL: no shutdown hook runs, as in a crash or an OOM kill."""
        self.procs[index].kill()
        self.procs[index].wait()

    async def terminate(self, index: int, *, timeout_s: float = 30) -> int:
        """SIGTERM and wait (without blocking the loop the mock runs on): the graceful
        path of a deploy. Returns the exit code."""
        self.procs[index].send_signal(signal.SIGTERM)
        return await asyncio.to_thread(self.procs[index].wait, timeout_s)

    def log_text(self) -> str:
        return "\n".join(p.read_text(errors="replace") for p in self.logs if p.exists())

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@pytest.fixture
def worker_procs(settings: Settings, tmp_path: Path) -> Iterator[WorkerProcs]:
    procs = WorkerProcs(settings, tmp_path)
    try:
        yield procs
    finally:
        procs.stop()


#: the bearer token of the `promptq serve` process that `base_url` starts
TOKEN = "sdk-test-token"


@pytest.fixture
async def base_url(redis: ArqRedis, settings: Settings, tmp_path: Path) -> AsyncIterator[str]:
    """A real `promptq serve` process (bearer token TOKEN); yields its /v1 URL."""
    port = free_port()
    log = tmp_path / "serve.log"
    with log.open("wb") as out:
        proc = await asyncio.create_subprocess_exec(
            *(sys.executable, "-m", "promptq", "serve", "--port", str(port)),
            env=worker_env(settings, PROMPTQ_API_TOKEN=TOKEN),
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    root = f"http://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession() as session:

            async def healthy() -> bool:
                assert proc.returncode is None, f"promptq serve exited:\n{log.read_text()}"
                try:
                    async with session.get(f"{root}/healthz") as resp:
                        return resp.status == 200
                except aiohttp.ClientConnectionError:
                    return False

            await wait_until(healthy, timeout_s=20, what="promptq serve to answer /healthz")
        yield f"{root}/v1"
    finally:
        proc.terminate()
        async with asyncio.timeout(15):
            await proc.wait()
    assert "Traceback" not in log.read_text(), log.read_text()


@pytest.fixture
async def client(base_url: str) -> AsyncIterator[AsyncOpenAI]:
    async with AsyncOpenAI(base_url=base_url, api_key=TOKEN, max_retries=0) as sdk:
        yield sdk
