"""HTTP API benchmark: ``promptq serve`` in front of real workers and the mock upstream.

Run ``python benchmarks/bench_api.py`` (about 5 minutes on 2 cores; ``--quick`` for a
smoke run). It starts a throwaway ``redis-server`` on a free port (or uses
``--redis-url``, whose database it FLUSHes), the mock upstream, ``--workers`` worker
processes and one ``promptq serve``, each its own process; the benchmark's clients
run in this process, on the same machine.

a. Chat latency, for each ``--chat LATENCY_MS:CLIENTS`` (default 1000:200, 200:200 and
   0:1). CLIENTS concurrent clients (one aiohttp session, closed loop: each sends its
   next request when its last one is answered) post chat completions for
   ``--seconds``, straight to a mock upstream with that latency (``direct``), then to
   ``POST /v1/chat/completions`` of promptq serve (``promptq``: through the chat lane,
   Redis and a worker). The clients' first requests are spread evenly over one upstream
   latency, so requests arrive at a steady rate, as a web app's users' do;
   ``--lockstep`` starts them all at once instead, and since the mock's latency is
   fixed they then keep arriving in one burst per round trip (the worst case). Runs
   alternate direct / promptq; the warm-up (the stagger plus one second) is not
   measured. ``added`` = promptq percentile - direct percentile, per repetition; the
   summary shows medians over repetitions. Targets: added p50 <= 5 ms, p99 <= 20 ms
   at 200 clients. ``CPU ms/req``: CPU time of the API process and of the workers
   (``/proc/<pid>/stat``) per answered request.
b. Big batch. With the official SDK: upload a ``--lines``-line JSONL file
   (``files.create``), create the batch (``batches.create``) and poll until a worker
   has started on it (promptq status ``in_progress``, read from Redis). Target: < 3 s.
   ``API RSS`` is the growth of the API process's resident memory over its size before
   the upload: the peak (sampled every 5 ms) and what is left once the batch runs.

The last line printed is one JSON object with every median (for the README).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import aiohttp
import redis.asyncio as aioredis
from openai import AsyncOpenAI

from promptq.shared import keys

MODEL = "mock-gpt"
TOKEN = "bench-token"
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE_KB = os.sysconf("SC_PAGE_SIZE") / 1024


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def cpu_s(pid: int) -> float:
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def rss_mb(pid: int) -> float:
    return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE_KB / 1024


def pct(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


class Procs:
    """Child processes, stopped (SIGTERM, then SIGKILL) in reverse order on exit."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []
        self.logdir = Path(tempfile.mkdtemp(prefix="promptq-bench-api-"))

    def start(
        self, name: str, *args: str, env: dict[str, str] | None = None, promptq: bool = True
    ) -> int:
        """Start ``python -m promptq ARGS`` (or ``ARGS`` as a command); return its pid."""
        log = (self.logdir / f"{name}.log").open("wb")
        cmd = [sys.executable, "-m", "promptq", "--log-level", "WARNING", *args]
        if not promptq:
            cmd = list(args)
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        self.procs.append(proc)
        return proc.pid

    def stop(self, pid: int | None = None) -> None:
        for proc in reversed(self.procs):
            if (pid is None or proc.pid == pid) and proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


async def wait_http(url: str, what: str, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    async with aiohttp.ClientSession() as session:
        while True:
            with contextlib.suppress(aiohttp.ClientError, OSError):
                async with session.get(url) as resp:
                    if resp.status == 200:
                        return
            if time.monotonic() > deadline:
                raise RuntimeError(f"{what} not answering at {url}")
            await asyncio.sleep(0.05)


async def wait_workers(redis: aioredis.Redis, count: int) -> None:
    deadline = time.monotonic() + 30
    while int(await redis.zcard(keys.WORKERS)) < count:
        if time.monotonic() > deadline:
            raise RuntimeError("workers did not start")
        await asyncio.sleep(0.05)


@contextlib.asynccontextmanager
async def stack(
    procs: Procs,
    redis_url: str,
    *,
    latency_ms: float,
    workers: int,
    concurrency: int,
    poll_delay_s: float | None = None,
) -> AsyncIterator[tuple[str, str, list[int]]]:
    """Mock + workers + promptq serve; yields (mock v1 URL, API v1 URL, pids of API+workers)."""
    flusher = aioredis.Redis.from_url(redis_url)
    await flusher.flushdb()  # nothing left over from the previous scenario
    await flusher.aclose()
    mock_port, api_port = free_port(), free_port()
    mock_pid = procs.start(
        "mock", "mock-llm", "--port", str(mock_port), "--latency-ms", str(latency_ms)
    )
    mock_v1 = f"http://127.0.0.1:{mock_port}/v1"
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("PROMPTQ_")},
        "PROMPTQ_REDIS_URL": redis_url,
        "PROMPTQ_UPSTREAM_URL": mock_v1,
        "PROMPTQ_MODEL": MODEL,
        "PROMPTQ_CONCURRENCY": str(concurrency),
        "PROMPTQ_API_TOKEN": TOKEN,
    }
    if poll_delay_s is not None:
        env["PROMPTQ_POLL_DELAY_S"] = str(poll_delay_s)
    pids = [procs.start("serve", "serve", "--port", str(api_port), env=env)]
    pids += [procs.start(f"worker{i}", "worker", env=env) for i in range(workers)]
    redis = aioredis.Redis.from_url(redis_url)
    try:
        await wait_http(f"{mock_v1}/models", "mock")
        await wait_http(f"http://127.0.0.1:{api_port}/healthz", "promptq serve")
        await wait_workers(redis, workers)
        yield mock_v1, f"http://127.0.0.1:{api_port}/v1", pids
    finally:
        await redis.aclose()
        for pid in pids:
            procs.stop(pid)
        procs.stop(mock_pid)


# -- a. chat latency ------------------------------------------------------------------


async def closed_loop(
    url: str,
    *,
    clients: int,
    seconds: float,
    warmup_s: float,
    headers: dict[str, str],
    stagger_s: float,
) -> tuple[list[float], int]:
    """Latencies (ms) of answered requests after the warm-up, and the count of errors.

    Client ``i`` starts ``i * stagger_s / clients`` seconds in (0: all at once)."""
    latencies: list[float] = []
    errors = 0
    start = time.perf_counter()
    measure_from, end = start + warmup_s, start + warmup_s + seconds
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector, headers=headers) as session:

        async def client(i: int) -> None:
            nonlocal errors
            n = 0
            await asyncio.sleep(i * stagger_s / clients)
            while (sent := time.perf_counter()) < end:
                n += 1
                body = {"model": MODEL, "messages": [{"role": "user", "content": f"c{i} r{n}"}]}
                try:
                    async with session.post(url, json=body) as resp:
                        await resp.read()
                        ok = resp.status == 200
                except aiohttp.ClientError:
                    ok = False
                if not ok:
                    errors += 1
                elif sent >= measure_from:
                    latencies.append((time.perf_counter() - sent) * 1000)

        await asyncio.gather(*(client(i) for i in range(clients)))
    return latencies, errors


async def chat_scenario(
    procs: Procs, redis_url: str, args: argparse.Namespace, latency_ms: float, clients: int
) -> dict[str, Any]:
    runs: dict[str, list[dict[str, float]]] = {"direct": [], "promptq": []}
    async with stack(
        procs,
        redis_url,
        latency_ms=latency_ms,
        workers=args.workers,
        concurrency=args.concurrency,
        poll_delay_s=args.poll_delay_s,
    ) as (mock_v1, api_v1, pids):
        for rep in range(args.reps):
            for side in ("direct", "promptq"):
                url = f"{mock_v1 if side == 'direct' else api_v1}/chat/completions"
                headers = {"Authorization": f"Bearer {TOKEN}"}
                cpu_before = [cpu_s(p) for p in pids]
                # staggered: clients spread their first request over one upstream
                # latency, so requests arrive at a steady rate, as a web app's users
                # do; lockstep: all start at once and, since the mock's latency is
                # fixed, keep arriving in one burst per round trip
                stagger_s = 0.0 if args.lockstep else max(latency_ms / 1000, 0.05)
                lat, errors = await closed_loop(
                    url,
                    clients=clients,
                    seconds=args.seconds,
                    warmup_s=1.0 + stagger_s,
                    headers=headers,
                    stagger_s=stagger_s,
                )
                cpu = [cpu_s(p) - b for p, b in zip(pids, cpu_before, strict=True)]
                run = {
                    "p50": pct(lat, 0.5),
                    "p90": pct(lat, 0.9),
                    "p99": pct(lat, 0.99),
                    "rps": len(lat) / args.seconds,
                    "errors": errors,
                    "api_cpu_ms_per_req": cpu[0] * 1000 / max(len(lat), 1),
                    "workers_cpu_ms_per_req": sum(cpu[1:]) * 1000 / max(len(lat), 1),
                }
                runs[side].append(run)
                print(
                    f"  {latency_ms:g} ms x {clients} clients, rep {rep + 1} {side:8} "
                    + " ".join(f"{k}={v:.1f}" for k, v in run.items()),
                    flush=True,
                )
    added = {
        q: statistics.median(
            p[q] - d[q] for d, p in zip(runs["direct"], runs["promptq"], strict=True)
        )
        for q in ("p50", "p90", "p99")
    }
    med = {
        side: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for side, rs in runs.items()
    }
    return {"upstream_latency_ms": latency_ms, "clients": clients, "added_ms": added, **med}


# -- b. a big batch through the SDK ---------------------------------------------------


class RssSampler:
    """Peak resident memory of a process, sampled every 5 ms until ``stop()``."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.before = self.peak = rss_mb(pid)
        self._task = asyncio.create_task(self._sample())

    async def _sample(self) -> None:
        while True:
            self.peak = max(self.peak, rss_mb(self.pid))
            await asyncio.sleep(0.005)

    async def stop(self) -> tuple[float, float]:
        """(RSS before, peak RSS), in MB."""
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)
        return self.before, max(self.peak, rss_mb(self.pid))


def big_file(lines: int) -> bytes:
    rows = []
    for i in range(lines):
        body = {
            "model": MODEL,
            "messages": [
                {
                    "role": "user",
                    "content": f"Summarise item {i:06d} of the benchmark in one short sentence.",
                }
            ],
            "max_tokens": 64,
        }
        rows.append(
            json.dumps(
                {
                    "custom_id": f"req-{i}",
                    "method": "POST",
                    "url": "/v1/chat/completions",
                    "body": body,
                }
            )
        )
    return ("\n".join(rows) + "\n").encode()


async def batch_scenario(procs: Procs, redis_url: str, args: argparse.Namespace) -> dict[str, Any]:
    data = big_file(args.lines)
    runs: list[dict[str, float]] = []
    redis = aioredis.Redis.from_url(redis_url)
    async with stack(procs, redis_url, latency_ms=1000, workers=args.workers, concurrency=64) as (
        _mock,
        api_v1,
        pids,
    ):
        api_pid = pids[0]
        async with AsyncOpenAI(base_url=api_v1, api_key=TOKEN, max_retries=0, timeout=120) as sdk:
            for rep in range(args.reps):
                rss = RssSampler(api_pid)
                t0 = time.perf_counter()
                uploaded = await sdk.files.create(file=("big.jsonl", data), purpose="batch")
                t1 = time.perf_counter()
                batch = await sdk.batches.create(
                    input_file_id=uploaded.id,
                    endpoint="/v1/chat/completions",
                    completion_window="24h",
                )
                t2 = time.perf_counter()
                while await redis.hget(keys.batch(batch.id), "status") != b"in_progress":
                    if time.perf_counter() - t0 > 60:
                        raise RuntimeError("batch did not start within 60 s")
                    await asyncio.sleep(0.005)
                t3 = time.perf_counter()
                base_rss, peak = await rss.stop()
                after = rss_mb(api_pid)
                await sdk.batches.cancel(batch.id)
                run = {
                    "upload_s": t1 - t0,
                    "create_s": t2 - t1,
                    "to_in_progress_s": t3 - t0,
                    "file_mb": len(data) / 1e6,
                    "rss_before_mb": base_rss,
                    "rss_peak_growth_mb": peak - base_rss,
                    "rss_after_growth_mb": after - base_rss,
                }
                runs.append(run)
                print(
                    f"  {args.lines}-line batch rep {rep + 1} "
                    + " ".join(f"{k}={v:.2f}" for k, v in run.items()),
                    flush=True,
                )
    await redis.aclose()
    return {"lines": args.lines, **{k: statistics.median(r[k] for r in runs) for k in runs[0]}}


# -- main -----------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument(
        "--redis-url", help="use this Redis (its db is FLUSHed) instead of a throwaway redis-server"
    )
    parser.add_argument(
        "--chat",
        nargs="+",
        default=["1000:200", "200:200", "0:1"],
        metavar="LATENCY_MS:CLIENTS",
        help="scenario a runs: mock latency and concurrent clients",
    )
    parser.add_argument("--seconds", type=float, default=10.0, help="measured seconds a run")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--concurrency", type=int, default=256, help="slots per worker")
    parser.add_argument("--lines", type=int, default=50_000, help="0 = skip scenario b")
    parser.add_argument(
        "--poll-delay-s", type=float, help="the workers' PROMPTQ_POLL_DELAY_S [default: 0.5]"
    )
    parser.add_argument(
        "--lockstep",
        action="store_true",
        help="chat clients all start at once (default: their first requests are spread "
        "over one upstream latency)",
    )
    parser.add_argument("--quick", action="store_true", help="smoke run: 1 rep, short runs")
    args = parser.parse_args(argv)
    if args.quick:
        args.reps, args.seconds, args.chat, args.lines = 1, 3.0, ["200:200"], 5000
    return args


async def main(args: argparse.Namespace) -> dict[str, Any]:
    procs = Procs()
    redis_url = args.redis_url
    try:
        if redis_url is None:
            binary = shutil.which("redis-server")
            if binary is None:
                raise SystemExit("no redis-server on PATH: install it or pass --redis-url")
            port = free_port()
            procs.start(
                "redis",
                binary,
                "--port",
                str(port),
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(procs.logdir),
                promptq=False,
            )
            redis_url = f"redis://127.0.0.1:{port}/0"
        redis = aioredis.Redis.from_url(redis_url)
        for attempt in range(200):
            try:
                await redis.flushdb()
                break
            except (OSError, aioredis.ConnectionError):
                if attempt == 199:
                    raise
                await asyncio.sleep(0.05)
        await redis.aclose()
        print(f"cores: {os.cpu_count()}, logs in {procs.logdir}", flush=True)
        chat = []
        for run in args.chat:
            latency_ms, clients = run.split(":")
            chat.append(
                await chat_scenario(procs, redis_url, args, float(latency_ms), int(clients))
            )
        big = await batch_scenario(procs, redis_url, args) if args.lines else None
        return {"chat": chat, "batch": big}
    finally:
        procs.stop()


if __name__ == "__main__":
    summary = asyncio.run(main(parse_args()))
    for row in summary["chat"]:
        d, p, a = row["direct"], row["promptq"], row["added_ms"]
        print(
            f"upstream {row['upstream_latency_ms']:g} ms, {row['clients']} clients: direct "
            f"p50 {d['p50']:.1f} p99 {d['p99']:.1f} ms ({d['rps']:.0f} req/s); promptq p50 "
            f"{p['p50']:.1f} p99 {p['p99']:.1f} ms ({p['rps']:.0f} req/s, "
            f"CPU ms/req: API {p['api_cpu_ms_per_req']:.2f}, workers "
            f"{p['workers_cpu_ms_per_req']:.2f}); added p50 {a['p50']:+.1f} "
            f"p99 {a['p99']:+.1f} ms"
        )
    b = summary["batch"]
    if b is not None:
        print(
            f"{b['lines']:,}-line batch ({b['file_mb']:.1f} MB): upload {b['upload_s']:.2f} s, "
            f"create {b['create_s']:.3f} s, in_progress after {b['to_in_progress_s']:.2f} s; API "
            f"RSS +{b['rss_peak_growth_mb']:.0f} MB peak, +{b['rss_after_growth_mb']:.0f} MB after"
        )
    print(json.dumps(summary))
