"""Flow-control benchmark: rate accuracy, urgent-lane latency, limiter overhead.

    python benchmarks/bench_flow.py            # about 3 minutes
    python benchmarks/bench_flow.py --quick    # about 40 s, shorter windows

Uses Redis database 9 at --redis-url (flushed before and after each scenario, nothing
else touched), real `promptq worker` processes and the mock upstream in this process.

1. **Rate accuracy**: 4 workers share PROMPTQ_RPM; a batch big enough to last the window
   (2 minutes by default) runs against a fast mock. Observed RPM = requests sent / time
   from the first to the last send; the ratio to the configured RPM should be 0.9-1.0.
2. **Urgent lane**: one worker, every slot busy with 20,000 queued bulk requests at
   150-250 ms upstream latency; single-request urgent batches are submitted one after
   another.
   Queue wait = submit-to-result time minus the request's own latency (``latency_ms``):
   how long an urgent request waited for a slot. Target p99 <= 100 ms.
3. **Limiter overhead**: the same 0 ms batch with no limits and with limits so high they
   never bind: Redis commands per request (INFO commandstats) and worker CPU per request.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import statistics
import subprocess
import sys
import time
from typing import Any

import orjson
from rich.console import Console
from rich.table import Table

from promptq import Producer, Settings
from promptq.mock import MockConfig, MockServer
from promptq.shared import keys
from promptq.shared.connection import connect

console = Console()


def start_workers(n: int, env: dict[str, str]) -> list[subprocess.Popen[bytes]]:
    full = {**os.environ, **env}
    return [
        subprocess.Popen(
            [sys.executable, "-m", "promptq", "--log-level", "WARNING", "worker"],
            env=full,
            stdin=subprocess.DEVNULL,
        )
        for _ in range(n)
    ]


def stop_workers(procs: list[subprocess.Popen[bytes]]) -> None:
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in procs:
        try:
            p.wait(timeout=20)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def wait_workers(producer: Producer, n: int) -> None:
    deadline = time.monotonic() + 30
    while int(await producer.redis.zcount(keys.WORKERS, time.time() - 10, "+inf")) < n:
        if time.monotonic() > deadline:
            raise RuntimeError("workers did not start")
        await asyncio.sleep(0.05)


def base_env(redis_url: str, mock: MockServer, **extra: str) -> dict[str, str]:
    return {
        "PROMPTQ_REDIS_URL": redis_url,
        "PROMPTQ_UPSTREAM_URL": mock.url,
        "PROMPTQ_MODEL": "mock-gpt",
        **extra,
    }


async def rate_accuracy(redis_url: str, *, rpm: int, window_s: float) -> dict[str, Any]:
    n = int(rpm / 60 * window_s) + 1
    async with MockServer(MockConfig(latency_ms=20)) as mock:
        procs = start_workers(4, base_env(redis_url, mock, PROMPTQ_RPM=str(rpm)))
        try:
            async with Producer.from_url(redis_url, settings=Settings(model="mock-gpt")) as p:
                await p.redis.flushdb()
                await wait_workers(p, 4)
                batch = await p.submit([f"rate {i}" for i in range(n)])
                stats = await batch.wait()
        finally:
            stop_workers(procs)
    # wall_s runs from batch creation (about the first send) to the last result (the
    # last send + one 20 ms answer): n - 1 intervals between sends
    observed = (n - 1) / stats.wall_s * 60
    return {"rpm": rpm, "requests": n, "observed_rpm": observed, "ratio": observed / rpm}


async def urgent_lane(redis_url: str, *, samples: int) -> dict[str, Any]:
    concurrency = 50
    # Jitter, as real upstreams have: with a fixed latency the slots would free in
    # synchronized waves and "the next free slot" would be up to a whole latency away.
    async with MockServer(MockConfig(latency_ms=150, jitter_ms=100)) as mock:
        env = base_env(redis_url, mock, PROMPTQ_CONCURRENCY=str(concurrency))
        procs = start_workers(1, env)
        try:
            async with Producer.from_url(redis_url, settings=Settings(model="mock-gpt")) as p:
                await p.redis.flushdb()
                await wait_workers(p, 1)
                bulk = await p.submit([f"bulk {i}" for i in range(20_000)])
                async with contextlib.aclosing(bulk.as_completed()) as flowing:
                    async for _ in flowing:  # every slot busy and results flowing
                        if (await bulk.info()).done >= 2 * concurrency:
                            break
                waits = []
                for i in range(samples):
                    start = time.monotonic()
                    urgent = await p.submit([f"urgent {i}"], priority="urgent")
                    async with contextlib.aclosing(urgent.as_completed()) as results:
                        result = await anext(results)
                    total_ms = (time.monotonic() - start) * 1000
                    waits.append(total_ms - (result.latency_ms or 0))
                bulk_done = (await bulk.info()).done
                await bulk.cancel()
        finally:
            stop_workers(procs)
    waits.sort()
    return {
        "samples": samples,
        "wait_p50_ms": statistics.median(waits),
        "wait_p99_ms": waits[min(len(waits) - 1, int(len(waits) * 0.99))],
        "wait_max_ms": waits[-1],
        "bulk_done_meanwhile": bulk_done,
    }


async def limiter_overhead(redis_url: str, *, n: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    async with MockServer(MockConfig()) as mock:
        for label, extra in (
            ("no limits", {}),
            ("limits (never binding)", {"PROMPTQ_RPM": "100000000", "PROMPTQ_TPM": "10000000000"}),
        ):
            procs = start_workers(1, base_env(redis_url, mock, **extra))
            try:
                async with Producer.from_url(redis_url, settings=Settings(model="mock-gpt")) as p:
                    await p.redis.flushdb()
                    await wait_workers(p, 1)
                    redis = await connect(redis_url)
                    await redis.config_resetstat()
                    cpu0 = cpu_s(procs[0].pid)
                    stats = await (await p.submit([f"o{i}" for i in range(n)])).wait()
                    cpu1 = cpu_s(procs[0].pid)
                    info = await redis.info("commandstats")
                    # round trips from workers are mostly script calls (EVALSHA); the
                    # total also counts the commands those scripts run inside Redis
                    calls = sum(v["calls"] for v in info.values() if isinstance(v, dict))
                    scripts = info.get("cmdstat_evalsha", {}).get("calls", 0)
                    await redis.aclose()
            finally:
                stop_workers(procs)
            out[label] = {
                "redis_calls_per_req": calls / n,
                "script_calls_per_req": scripts / n,
                "worker_cpu_us_per_req": (cpu1 - cpu0) / n * 1e6,
                "throughput_rps": stats.throughput_rps,
            }
    return out


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/9")
    parser.add_argument("--quick", action="store_true", help="short windows, for a smoke run")
    args = parser.parse_args()
    window_s = 20.0 if args.quick else 120.0
    rate = await rate_accuracy(args.redis_url, rpm=1200, window_s=window_s)
    urgent = await urgent_lane(args.redis_url, samples=20 if args.quick else 60)
    overhead = await limiter_overhead(args.redis_url, n=2000 if args.quick else 5000)
    async with Producer.from_url(args.redis_url) as p:
        await p.redis.flushdb()

    table = Table(title="flow control", title_justify="left")
    table.add_column("measure")
    table.add_column("value", justify="right")
    table.add_column("target", justify="right")
    table.add_row(
        f"rate accuracy, 4 workers, {window_s:.0f} s at {rate['rpm']} RPM",
        f"{rate['observed_rpm']:.0f} RPM = {rate['ratio']:.3f}x",
        "0.9-1.0x",
    )
    table.add_row(
        "urgent queue wait behind 20,000 bulk (p50 / p99 / max)",
        f"{urgent['wait_p50_ms']:.0f} / {urgent['wait_p99_ms']:.0f} / "
        f"{urgent['wait_max_ms']:.0f} ms",
        "p99 <= 100 ms",
    )
    for label, o in overhead.items():
        table.add_row(
            f"{label}: script calls / Redis commands / worker CPU per request",
            f"{o['script_calls_per_req']:.2f} / {o['redis_calls_per_req']:.1f} / "
            f"{o['worker_cpu_us_per_req']:.0f} µs",
            "",
        )
    console.print(table)
    print(orjson.dumps({"rate": rate, "urgent": urgent, "overhead": overhead}).decode())


if __name__ == "__main__":
    asyncio.run(main())
