"""A network partition: workers in their own network namespace (``ip netns``, veth pairs,
on this machine only) lose Redis mid-batch, then get it back. Nothing is lost or counted
twice, and the time the batch takes to recover is printed.

The namespace reaches Redis and the mock upstream over two separate veth pairs, so the
cut drops only Redis traffic (``ip link set ... down``: packets vanish, no reset, as in
a real partition). Needs root (CAP_NET_ADMIN); where namespaces cannot be created the
test is skipped and says why.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from promptq import Producer, Status
from promptq.mock import MockConfig, MockServer
from promptq.shared import keys
from promptq.shared.connection import connect
from promptq.shared.settings import Settings

from ..conftest import redis_server, wait_until, worker_env

pytestmark = pytest.mark.e2e

#: the partition lasts this long: longer than 3 heartbeats, so liveness lapses too
CUT_S = 4.0


def _ip(*args: str, ns: str | None = None) -> None:
    command = ["ip", *args] if ns is None else ["ip", "netns", "exec", ns, "ip", *args]
    subprocess.run(command, check=True, capture_output=True, text=True)


def _why_not() -> str | None:
    """None when network namespaces can be made here, else the reason."""
    if shutil.which("ip") is None:
        return "the `ip` command (iproute2) is missing"
    probe = f"pq-probe-{os.getpid()}"
    try:
        _ip("netns", "add", probe)
    except subprocess.CalledProcessError as exc:
        return f"`ip netns add` failed ({exc.stderr.strip() or exc}); it needs root"
    _ip("netns", "del", probe)
    return None


class Net:
    """A namespace with two links to the host: ``redis_ip`` and ``upstream_ip`` (host
    sides), cut and healed separately."""

    def __init__(self) -> None:
        n = os.getpid() % 200 + 20
        self.ns = f"pq-part-{os.getpid()}"
        self.redis_ip, self.upstream_ip = f"10.231.{n}.1", f"10.232.{n}.1"
        self.links = {
            "redis": (f"pqr{n}h", f"pqr{n}n", self.redis_ip, f"10.231.{n}.2"),
            "upstream": (f"pqu{n}h", f"pqu{n}n", self.upstream_ip, f"10.232.{n}.2"),
        }

    def up(self) -> None:
        _ip("netns", "add", self.ns)
        _ip("link", "set", "lo", "up", ns=self.ns)
        for host, inner, host_ip, inner_ip in self.links.values():
            _ip("link", "add", host, "type", "veth", "peer", "name", inner)
            _ip("link", "set", inner, "netns", self.ns)
            _ip("addr", "add", f"{host_ip}/24", "dev", host)
            _ip("link", "set", host, "up")
            _ip("addr", "add", f"{inner_ip}/24", "dev", inner, ns=self.ns)
            _ip("link", "set", inner, "up", ns=self.ns)

    def cut(self, name: str) -> None:
        _ip("link", "set", self.links[name][0], "down")

    def heal(self, name: str) -> None:
        _ip("link", "set", self.links[name][0], "up")

    def down(self) -> None:
        for host, *_ in self.links.values():
            subprocess.run(["ip", "link", "del", host], capture_output=True)
        subprocess.run(["ip", "netns", "del", self.ns], capture_output=True)


def _worker_in(net: Net, env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    """A real ``promptq worker`` process inside the namespace."""
    with log.open("wb") as out:
        return subprocess.Popen(
            ["ip", "netns", "exec", net.ns, sys.executable, "-m", "promptq", "--log-level",
             "INFO", "worker"],
            env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )  # fmt: skip


@pytest.fixture
def net() -> Iterator[Net]:
    reason = _why_not()
    if reason is not None:
        pytest.skip(f"network namespaces cannot be created here: {reason}")
    made = Net()
    try:
        made.up()
        yield made
    finally:
        made.down()


async def test_workers_cut_off_from_redis_mid_batch_lose_and_duplicate_nothing(
    net: Net, settings: Settings, tmp_path: Path
) -> None:
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.fail("this test starts a redis-server: apt-get install redis-server")
    total = 400
    # not loopback: Redis' protected mode would refuse the namespace's connections
    with redis_server(binary, "--protected-mode", "no", bind=net.redis_ip) as url:
        async with MockServer(MockConfig(latency_ms=50), host=net.upstream_ip) as mock:
            local = settings.model_copy(update={"redis_url": url, "upstream_url": mock.url})
            env = worker_env(local, PROMPTQ_CONCURRENCY="8")
            logs = [tmp_path / f"worker-{i}.log" for i in range(2)]
            procs = [_worker_in(net, env, log) for log in logs]
            redis = await connect(url)
            try:

                async def two_workers() -> bool:
                    return int(await redis.zcard(keys.WORKERS)) == 2

                await wait_until(two_workers, timeout_s=30, what="2 workers in the namespace")
                async with Producer(redis, settings=local) as producer:
                    batch = await producer.submit([f"partition {i}" for i in range(total)])

                    async def some_done() -> bool:
                        return (await batch.info()).done >= total // 5

                    await wait_until(some_done, timeout_s=30, what="a fifth of the batch")
                    net.cut("redis")
                    cut_at = time.monotonic()
                    before = (await batch.info()).done  # the producer still reaches Redis
                    await asyncio.sleep(CUT_S)  # the partition itself (not a condition)
                    during = (await batch.info()).done
                    net.heal("redis")
                    healed = time.monotonic()

                    async def moving() -> bool:
                        return (await batch.info()).done > during

                    await wait_until(moving, timeout_s=60, what="progress after the heal")
                    resumed_s = time.monotonic() - healed
                    await batch.wait(timeout_s=120)
                    finished_s = time.monotonic() - healed
                    info = await batch.info()
                    results = [r async for r in batch.results()]
            finally:
                for proc in procs:
                    proc.terminate()
                for proc in procs:
                    try:
                        proc.wait(timeout=30)
                    except subprocess.TimeoutExpired:
                        proc.kill()
                await redis.aclose()
    print(
        f"\npartition of {CUT_S:g} s at {before}/{total} done ({during - before} recorded "
        f"meanwhile): progress again {resumed_s:.2f} s after the heal, batch done "
        f"{finished_s:.2f} s after it ({time.monotonic() - cut_at:.1f} s after the cut)"
    )
    assert info.status is Status.COMPLETED
    assert len(results) == total
    assert len({r.custom_id for r in results}) == total  # none twice
    assert all(r.ok for r in results), [r for r in results if not r.ok][:3]
    assert (info.succeeded, info.failed) == (total, 0)
    assert during == before  # nothing reached Redis while cut off
    log = "\n".join(p.read_text(errors="replace") for p in logs)
    assert "Traceback" not in log, log[-3000:]
