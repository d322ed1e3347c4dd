"""promptq's defaults against a llama.cpp server, beside a plain gather at its parallelism.

Run ``python benchmarks/bench_llamacpp.py`` (about a minute; ``--quick`` for a smoke
run). It starts a throwaway ``redis-server`` and, unless ``--upstream URL`` names a real
``llama-server`` (e.g. ``http://127.0.0.1:8080/v1``), ``promptq mock-llm --flavour
llamacpp`` as its own process: 4 slots, 8 HTTP threads, 5 s keep-alive, as
``llama-server --parallel 4`` starts; ``--latency-ms`` (default 50) per request. The
server's parallelism is read from its ``GET /props`` (``total_slots``). In turns, it times
``--n`` (default 40) chat prompts:

* **gather**: one aiohttp session, ``asyncio.Semaphore(P)`` at the server's parallelism P
  and ``asyncio.gather``: the best a client can do;
* **promptq**: ``--workers`` (default 2) ``promptq worker`` processes with the default
  settings (concurrency 64 each), ``submit`` to the batch's end;
* **promptq keep-alive on**: the same with ``PROMPTQ_UPSTREAM_KEEPALIVE=on`` (what
  promptq did before: the stall), unless ``--skip-keepalive-on``.

For each: wall time (median of ``--reps``), throughput ratio to gather, p50/p99 request
latency, and the most TCP connections to the server open at once (sampled from
``/proc/net/tcp`` every 10 ms). The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp

from _procs import free_port, start_redis, wait_port
from promptq.producer import Producer
from promptq.shared import keys
from promptq.shared.connection import connect
from promptq.shared.settings import Settings

MODEL = "tiny"


def start_mock(latency_ms: float) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "promptq", "mock-llm", "--flavour", "llamacpp", "--port",
         str(port), "--latency-ms", str(latency_ms)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    wait_port(port, "mock-llm")
    return proc, f"http://127.0.0.1:{port}/v1"


def start_workers(count: int, redis_url: str, upstream: str, **env: str) -> list[Any]:
    full = {k: v for k, v in os.environ.items() if not k.startswith("PROMPTQ_")}
    full.update(PROMPTQ_REDIS_URL=redis_url, PROMPTQ_UPSTREAM_URL=upstream, PROMPTQ_MODEL=MODEL)
    full.update(env)
    return [
        subprocess.Popen(
            [sys.executable, "-m", "promptq", "--log-level", "WARNING", "worker"],
            env=full,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for _ in range(count)
    ]


def stop(procs: list[Any]) -> None:
    for proc in procs:
        proc.send_signal(signal.SIGTERM)
    for proc in procs:
        proc.wait(timeout=60)


class ConnectionSampler:
    """The most ESTABLISHED TCP connections to ``port`` seen at once (client side)."""

    def __init__(self, port: int) -> None:
        self.hex_port = f"{port:04X}"
        self.peak = 0
        self._task: asyncio.Task[None] | None = None

    def count(self) -> int:
        total = 0
        for table in ("/proc/net/tcp", "/proc/net/tcp6"):
            try:
                rows = Path(table).read_text().splitlines()[1:]
            except OSError:
                continue
            for row in rows:
                fields = row.split()
                # remote address is field 2 ("IP:PORT"), state field 3 ("01" = ESTABLISHED)
                if fields[3] == "01" and fields[2].endswith(":" + self.hex_port):
                    total += 1
        return total

    async def _run(self) -> None:
        while True:
            self.peak = max(self.peak, self.count())
            await asyncio.sleep(0.01)

    def __enter__(self) -> ConnectionSampler:
        self._task = asyncio.get_running_loop().create_task(self._run())
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


async def server_slots(url: str) -> int:
    root = url.removesuffix("/v1")
    async with aiohttp.ClientSession() as session, session.get(f"{root}/props") as resp:
        props = await resp.json()
    return int(props["total_slots"])


def body(i: int) -> dict[str, Any]:
    return {"model": MODEL, "max_tokens": 8,
            "messages": [{"role": "user", "content": f"Say something about {i}."}]}  # fmt: skip


async def gather(url: str, n: int, parallelism: int, port: int) -> dict[str, float]:
    semaphore = asyncio.Semaphore(parallelism)
    latencies: list[float] = []
    async with aiohttp.ClientSession() as session:

        async def one(i: int) -> None:
            async with semaphore:
                started = time.monotonic()
                async with session.post(f"{url}/chat/completions", json=body(i)) as resp:
                    await resp.read()
                    assert resp.status == 200, resp.status
                latencies.append((time.monotonic() - started) * 1000)

        with ConnectionSampler(port) as sampler:
            started = time.monotonic()
            await asyncio.gather(*(one(i) for i in range(n)))
            wall = time.monotonic() - started
    return {"wall_s": wall, "p50_ms": percentile(latencies, 50),
            "p99_ms": percentile(latencies, 99), "connections": sampler.peak}  # fmt: skip


async def through_promptq(
    redis_url: str, url: str, n: int, workers: int, port: int, **env: str
) -> dict[str, float]:
    redis = await connect(redis_url)
    await redis.flushdb()
    procs = start_workers(workers, redis_url, url, **env)
    try:
        deadline = time.monotonic() + 30
        while int(await redis.zcard(keys.WORKERS)) < workers:
            if time.monotonic() > deadline:
                raise RuntimeError("the workers did not start")
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.5)  # the workers' start checks (GET /models, /props) are done
        settings = Settings(redis_url=redis_url, upstream_url=url, model=MODEL)
        async with Producer(redis, settings=settings) as producer:
            lines = [{"custom_id": f"r{i}", "method": "POST", "url": "/v1/chat/completions",
                      "body": body(i)} for i in range(n)]  # fmt: skip
            with ConnectionSampler(port) as sampler:
                started = time.monotonic()
                batch = await producer.submit(lines)
                stats = await batch.wait(timeout_s=600)
                wall = time.monotonic() - started
        assert stats.succeeded == n, stats
        return {"wall_s": wall, "p50_ms": stats.p50_ms or 0.0, "p99_ms": stats.p99_ms or 0.0,
                "connections": sampler.peak}  # fmt: skip
    finally:
        stop(procs)
        await redis.flushdb()
        await redis.aclose()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--upstream", help="a real llama-server's base URL (ends in /v1)")
    parser.add_argument("--n", type=int, default=40, help="prompts per run")
    parser.add_argument("--workers", type=int, default=2, help="promptq worker processes")
    parser.add_argument("--latency-ms", type=float, default=50.0, help="mock: per request")
    parser.add_argument("--reps", type=int, default=3, help="runs of each (median)")
    parser.add_argument("--skip-keepalive-on", action="store_true", help="skip the stall run")
    parser.add_argument("--quick", action="store_true", help="one rep, no stall run")
    args = parser.parse_args()
    if args.quick:
        args.reps, args.skip_keepalive_on = 1, True
    redis_proc, redis_url = start_redis("bench_llamacpp")
    mock_proc = None
    url = args.upstream
    if url is None:
        mock_proc, url = start_mock(args.latency_ms)
    port = urlsplit(url).port or 80
    try:
        parallelism = await server_slots(url)
        runs: dict[str, list[dict[str, float]]] = {"gather": [], "promptq": []}
        if not args.skip_keepalive_on:
            runs["promptq_keepalive_on"] = []
        for _ in range(args.reps):  # in turns, so a noisy moment hits all of them
            runs["gather"].append(await gather(url, args.n, parallelism, port))
            runs["promptq"].append(
                await through_promptq(redis_url, url, args.n, args.workers, port)
            )
            if not args.skip_keepalive_on:
                runs["promptq_keepalive_on"].append(
                    await through_promptq(
                        redis_url,
                        url,
                        args.n,
                        args.workers,
                        port,
                        PROMPTQ_UPSTREAM_KEEPALIVE="on",
                    )
                )
    finally:
        for proc in (mock_proc, redis_proc):
            if proc is not None:
                proc.terminate()
                proc.wait(timeout=10)
    upstream = "llama-server" if args.upstream else "mock llamacpp"
    out: dict[str, Any] = {
        "upstream": upstream,
        "n": args.n,
        "parallelism": parallelism,
        "workers": args.workers,
    }
    base = statistics.median(r["wall_s"] for r in runs["gather"])
    print(f"{args.n} prompts, server parallelism {parallelism}, {args.reps} rep(s), medians:")
    for name, results in runs.items():
        row = {key: statistics.median(r[key] for r in results) for key in results[0]}
        row["throughput_ratio"] = base / row["wall_s"]
        out[name] = row
        print(
            f"  {name:22s} {row['wall_s']:7.2f} s  x{row['throughput_ratio']:.2f} of gather  "
            f"p50 {row['p50_ms']:7.1f} ms  p99 {row['p99_ms']:7.1f} ms  "
            f"connections {row['connections']:.0f}"
        )
    print(json.dumps(out))


if __name__ == "__main__":
    asyncio.run(main())
