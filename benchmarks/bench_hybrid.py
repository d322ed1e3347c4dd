"""The hybrid pipeline: the batch-api route's download and record, its polling cost, and
the CPU that cost accounting and the response cache add to the realtime path.

Run ``python benchmarks/bench_hybrid.py`` (about 2 minutes; ``--lines 5000 --runs 1``
for a smoke run). It starts a throwaway ``redis-server`` (its command counters are then
ours alone) and the mock upstream (a provider with instant turnaround), and measures:

1. **Download + record**: a ``--lines``-line batch of the batch-api route (one shard),
   one worker process (``PROMPTQ_BATCH_API_POLL_S=0.05``). From the moment the mock's
   provider batch says ``completed`` (polled every 5 ms over HTTP) to promptq's batch
   ``completed`` (results downloaded, recorded, aggregated): lines per second, and the
   worker's peak RSS (``VmHWM``) after it. Baseline in the same run: the same lines through the
   realtime route (the mock at 0 ms), requests per second. Aim: >= 20,000 lines/s.
2. **Polling**: one shard held ``in_progress`` by the mock (``[[mock batch=hold]]``),
   polled every 0.5 s for ``--poll-window`` seconds: Redis commands and provider HTTP
   calls per poll, minus an idle worker's over the same window; scaled to an hour at the
   default ``PROMPTQ_BATCH_API_POLL_S`` (30 s). The idle worker's own commands per hour
   (heartbeat, index looks) are printed too.
3. **CPU per request**: cost accounting on the realtime path (price lookup, spend,
   record arguments; always on), and the response cache on (a miss, a hit; 64 requests
   at a time, as a worker's slots run them) against the Redis, in this process
   (``time.process_time``). Aim: <= 10 us off, <= 50 us on.

Medians of ``--runs``; the last line printed is one JSON object with every number.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

from promptq import Producer
from promptq.mock import MockConfig, MockServer
from promptq.shared import keys
from promptq.shared.batches import record_args
from promptq.shared.connection import connect
from promptq.shared.prices import PriceTable, Spend
from promptq.shared.results import Outcome
from promptq.shared.settings import Settings
from promptq.worker.cache import ResponseCache

MODEL = "gpt-4o-mini"
DEFAULT_POLL_S = 30.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_redis() -> tuple[subprocess.Popen[bytes], str, str]:
    binary = shutil.which("redis-server")
    if binary is None:
        sys.exit("bench_hybrid needs redis-server on PATH (apt-get install redis-server)")
    port = free_port()
    workdir = tempfile.mkdtemp(prefix="promptq-bench-redis-")
    proc = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly",
         "no", "--dir", workdir],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.monotonic() + 10
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError("redis-server did not start") from None
            time.sleep(0.05)
    return proc, f"redis://127.0.0.1:{port}/0", workdir


def start_worker(redis_url: str, upstream: str, **env: str) -> subprocess.Popen[bytes]:
    full = {k: v for k, v in os.environ.items() if not k.startswith("PROMPTQ_")}
    full.update(
        PROMPTQ_REDIS_URL=redis_url,
        PROMPTQ_UPSTREAM_URL=upstream,
        PROMPTQ_MODEL=MODEL,
        PROMPTQ_CONCURRENCY="250",
        **env,
    )
    return subprocess.Popen(
        [sys.executable, "-m", "promptq", "--log-level", "WARNING", "worker"],
        env=full, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip


def peak_rss_mb(pid: int) -> float:
    """A live process's peak RSS so far (Linux: VmHWM)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def stop_worker(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM and wait. (Not wait4's peak RSS: on Linux it counts this process's memory
    that the child had between fork and exec.)"""
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=60)


async def wait_workers(redis: Any, count: int) -> None:
    deadline = time.monotonic() + 30
    while int(await redis.zcard(keys.WORKERS)) < count:
        if time.monotonic() > deadline:
            raise RuntimeError("the worker did not start")
        await asyncio.sleep(0.05)


def prompts(n: int, *, hold: bool = False) -> list[dict[str, str]]:
    suffix = " [[mock batch=hold]]" if hold else ""
    return [{"custom_id": f"r{i}", "prompt": f"Summarise fact number {i}{suffix}"}
            for i in range(n)]  # fmt: skip


async def download_run(redis_url: str, mock: MockServer, lines: int) -> dict[str, float]:
    redis = await connect(redis_url)
    await redis.flushdb()
    worker = start_worker(redis_url, mock.url, PROMPTQ_BATCH_API_POLL_S="0.05")
    settings = Settings(redis_url=redis_url, upstream_url=mock.url, model=MODEL)
    try:
        await wait_workers(redis, 1)
        items = prompts(lines)
        async with Producer(redis, settings=settings) as producer, aiohttp.ClientSession() as http:
            batch = await producer.submit(items, route="batch-api")
            provider_batch = None
            while provider_batch is None:
                provider_batch = await redis.hget(keys.shards(batch.id), "0:provider_batch")
                await asyncio.sleep(0.005)
            url = f"{mock.url}/batches/{provider_batch.decode()}"
            while True:
                async with http.get(url) as resp:
                    if (await resp.json())["status"] == "completed":
                        provider_done = time.monotonic()
                        break
                await asyncio.sleep(0.005)
            stats = await batch.wait(timeout_s=600)
            recorded = time.monotonic()
            assert stats.succeeded == lines, stats
            batch_api_rss = peak_rss_mb(worker.pid)
            # the same lines in real time (the baseline of this run)
            started = time.monotonic()
            realtime = await producer.submit(items)
            rt_stats = await realtime.wait(timeout_s=600)
            rt_wall = time.monotonic() - started
            assert rt_stats.succeeded == lines, rt_stats
            rss = peak_rss_mb(worker.pid)
    finally:
        stop_worker(worker)
        await redis.flushdb()
        await redis.aclose()
    return {
        "record_s": recorded - provider_done,
        "lines_per_s": lines / (recorded - provider_done),
        "worker_rss_mb": batch_api_rss,
        "worker_rss_after_realtime_mb": rss,
        "realtime_rps": lines / rt_wall,
    }


async def commands(redis: Any) -> int:
    info = await redis.info("stats")
    return int(info["total_commands_processed"])


async def polling(redis_url: str, mock: MockServer, window_s: float) -> dict[str, float]:
    redis = await connect(redis_url)
    await redis.flushdb()
    poll_s = 0.5
    worker = start_worker(redis_url, mock.url, PROMPTQ_BATCH_API_POLL_S=str(poll_s))
    settings = Settings(redis_url=redis_url, upstream_url=mock.url, model=MODEL)
    try:
        await wait_workers(redis, 1)
        await asyncio.sleep(2)  # past start-up
        before = await commands(redis)
        await asyncio.sleep(window_s)
        idle = await commands(redis) - before - 2  # minus our own INFO calls
        async with Producer(redis, settings=settings) as producer:
            batch = await producer.submit(prompts(10, hold=True), route="batch-api")
            while True:  # a poll with a deadline would be nicer; the bench fails loudly
                if (await batch.info(with_stats=False)).status.value == "in_progress":
                    break
                await asyncio.sleep(0.05)
            await asyncio.sleep(1)
            retrieves = mock.stats.batch_calls.get("retrieve", 0)
            before = await commands(redis)
            await asyncio.sleep(window_s)
            held = await commands(redis) - before - 2
            polls = mock.stats.batch_calls.get("retrieve", 0) - retrieves
            await batch.cancel()
            await batch.wait(timeout_s=60)
    finally:
        stop_worker(worker)
        await redis.flushdb()
        await redis.aclose()
    per_poll = (held - idle) / max(polls, 1)
    per_hour = 3600 / DEFAULT_POLL_S
    return {
        "polls": polls,
        "redis_cmds_per_poll": per_poll,
        "http_calls_per_poll": 1.0,
        "redis_cmds_per_hour_per_shard": per_poll * per_hour,
        "http_calls_per_hour_per_shard": per_hour,
        "idle_worker_redis_cmds_per_hour": idle / window_s * 3600,
    }


async def cpu_per_request(redis_url: str) -> dict[str, float]:
    prices = PriceTable.load()
    spend = Spend()
    body = {
        "id": "chatcmpl-1", "object": "chat.completion", "model": MODEL,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "echo: hi"},
                     "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 12, "completion_tokens": 30, "total_tokens": 42},
    }  # fmt: skip
    outcome = Outcome(200, body, "req_1", None, 1, 12.5)
    line = b'{"id":"x"}'
    n = 200_000
    started = time.process_time()
    for _ in range(n):
        record_args("r1", line, outcome, cost=None)
    base = time.process_time() - started
    started = time.process_time()
    for _ in range(n):
        cost = prices.cost_of(body, MODEL, batch=False)
        spend.add(cost)
        record_args("r1", line, outcome, cost=cost)
    with_cost = time.process_time() - started
    accounting_us = (with_cost - base) / n * 1e6

    redis = await connect(redis_url)
    await redis.flushdb()
    cache = ResponseCache(redis, worker_id="bench", timeout_s=60)

    async def send() -> Outcome:
        return outcome

    m, group = 6400, 64  # requests run 64 at a time, as a worker's slots do

    async def through_cache(offset: int) -> None:
        await asyncio.gather(*(
            cache.run("/v1/chat/completions", {"i": i}, ttl_s=60, send=send)
            for i in range(offset, offset + group)
        ))  # fmt: skip

    async def without_cache(offset: int) -> None:
        await asyncio.gather(*(send() for _ in range(group)))

    timings = {}
    # every request new: misses (lookup and lock, then store and unlock); then the same
    # again: hits; then the baseline, what the gather itself costs
    for name, step in (("miss", through_cache), ("hit", through_cache), ("none", without_cache)):
        started = time.process_time()
        for offset in range(0, m, group):
            await step(offset)
        timings[name] = (time.process_time() - started) / m * 1e6
    miss_us, hit_us, none_us = timings["miss"], timings["hit"], timings["none"]
    await redis.flushdb()
    await redis.aclose()
    return {
        "cost_accounting_us": accounting_us,
        "cache_miss_us": miss_us - none_us,
        "cache_hit_us": hit_us - none_us,
    }


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lines", type=int, default=50_000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--poll-window", type=float, default=10.0)
    args = parser.parse_args()
    redis_proc, redis_url, workdir = start_redis()
    out: dict[str, Any] = {"lines": args.lines, "runs": args.runs}
    try:
        async with MockServer(MockConfig(model=MODEL)) as mock:
            runs = []
            for i in range(args.runs):
                run = await download_run(redis_url, mock, args.lines)
                runs.append(run)
                print(
                    f"run {i + 1}: {run['lines_per_s']:,.0f} lines/s recorded "
                    f"({run['record_s']:.2f} s), worker peak RSS {run['worker_rss_mb']:.0f} "
                    f"MB; realtime baseline {run['realtime_rps']:,.0f} req/s",
                    flush=True,
                )
            for name in runs[0]:
                out[name] = statistics.median(r[name] for r in runs)
            out["record_vs_realtime"] = out["lines_per_s"] / out["realtime_rps"]
            out.update(await polling(redis_url, mock, args.poll_window))
        out.update(await cpu_per_request(redis_url))
    finally:
        redis_proc.terminate()
        redis_proc.wait(timeout=10)
        shutil.rmtree(workdir, ignore_errors=True)
    print(
        f"\nbatch-api, {args.lines:,} lines, median of {args.runs}: provider completed -> "
        f"promptq completed in {out['record_s']:.2f} s = {out['lines_per_s']:,.0f} lines/s "
        f"({out['record_vs_realtime']:.1f}x the realtime route's {out['realtime_rps']:,.0f} "
        f"req/s in the same run); worker peak RSS {out['worker_rss_mb']:.0f} MB"
    )
    print(
        f"polling one shard: {out['redis_cmds_per_poll']:.1f} Redis commands and 1 HTTP call "
        f"per poll ({out['polls']} polls measured) -> at the default 30 s, "
        f"{out['redis_cmds_per_hour_per_shard']:,.0f} Redis commands and "
        f"{out['http_calls_per_hour_per_shard']:,.0f} HTTP calls per hour per shard; an idle "
        f"worker: {out['idle_worker_redis_cmds_per_hour']:,.0f} Redis commands per hour"
    )
    print(
        f"CPU per realtime request: cost accounting {out['cost_accounting_us']:.1f} us (always "
        f"on); the cache on: a miss {out['cache_miss_us']:.0f} us, a hit "
        f"{out['cache_hit_us']:.0f} us (client side, Redis round trips included)"
    )
    print(json.dumps(out))


if __name__ == "__main__":
    asyncio.run(main())
