"""The ``python:`` backend: overhead per call, and how pools scale CPU-bound work.

Run ``python benchmarks/bench_backends.py`` (about a minute on 2 cores; ``--quick`` for a
smoke run). Needs no Redis for (a) and (b).

a. Overhead per call. ``Executor`` + ``PythonBackend`` running a no-op ``def`` in a
   thread pool of 1, ``--calls`` calls with 64 outstanding, against the same function
   called directly in a loop: ``overhead`` = (wall per call through promptq) - (wall
   per direct call), in µs. Also for an ``async def`` no-op (awaited on the loop) and
   for a process pool of 1 (pickling the call to another process and back).
b. Pool scaling. A CPU-bound function that holds the GIL (``examples/cpu_backend``'s
   arithmetic, ``--work-ms`` of work per call) through a process pool of 1 and of 2,
   and a thread pool of 2: calls per second and the ratio to the pool of 1. On N cores
   a process pool of N should approach Nx; a thread pool stays near 1x (the GIL).
c. End to end. A batch of ``--batch`` requests through the embedded queue, then through
   a real Redis (``--redis-url``, a database it FLUSHes), and one in-process worker with
   the no-op function in a thread pool of 1: requests per second.

Each measurement is repeated ``--reps`` times; the tables show the median [min-max].
The last line printed is one JSON object with every median (for the README).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))

from promptq.embedded import local_cluster
from promptq.shared.settings import Settings
from promptq.worker.backends.python import PythonBackend
from promptq.worker.execute import Executor
from promptq.worker.retry import RetryPolicy

console = Console()
BODY: dict[str, Any] = {"model": "local", "messages": [{"role": "user", "content": "hi"}]}


def noop(endpoint: str, body: dict[str, Any]) -> dict[str, Any]:
    return {"ok": True}


async def async_noop(endpoint: str, body: dict[str, Any]) -> dict[str, Any]:
    return {"ok": True}


def burn(endpoint: str, body: dict[str, Any]) -> dict[str, Any]:
    """``body['steps']`` steps of GIL-holding arithmetic (a fixed amount of work)."""
    x = 0
    for i in range(body["steps"]):
        x = (x * 1103515245 + 12345 + i) & 0x7FFFFFFF
    return {"x": x}


def steps_for(work_ms: float) -> int:
    """Steps of ``burn`` that take about ``work_ms`` on one core, alone."""
    steps = 100_000
    start = time.perf_counter()
    burn("", {"steps": steps})
    return int(steps * work_ms / 1000 / (time.perf_counter() - start))


def backend(
    function: Callable[..., Any], *, threads: int = 1, processes: int | None = None
) -> PythonBackend:
    return PythonBackend(
        function,
        module_name=__name__ if __name__ != "__main__" else "bench_backends",
        function_name=function.__name__,
        threads=threads,
        processes=processes,
    )


async def through(executor: Executor, calls: int, outstanding: int, body: dict[str, Any]) -> float:
    """Seconds for ``calls`` requests with ``outstanding`` at a time."""
    queue = iter(range(calls))
    start = time.perf_counter()

    async def lane() -> None:
        for _ in queue:
            outcome = await executor.execute("/v1/chat/completions", body)
            assert outcome.ok, outcome.error

    await asyncio.gather(*(lane() for _ in range(outstanding)))
    return time.perf_counter() - start


def direct_s(function: Callable[..., Any], calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        function("/v1/chat/completions", BODY)
    return time.perf_counter() - start


async def measure(
    make: Callable[[], PythonBackend], calls: int, outstanding: int, body: dict[str, Any]
) -> float:
    async with Executor(make(), policy=RetryPolicy(max_attempts=1)) as executor:
        await through(executor, min(calls, 200), outstanding, body)  # warm up (pools start)
        return await through(executor, calls, outstanding, body)


async def end_to_end(n: int, redis_url: str | None) -> float:
    settings = Settings(
        backend="python:bench_backends:noop",
        backend_threads=1,
        concurrency=64,
        model="local",
        redis_url=redis_url,
    )
    async with local_cluster(settings, workers=1) as producer:
        batch = await producer.submit([f"p{i}" for i in range(n)])
        stats = await batch.wait(timeout_s=600)
    return float(stats.throughput_rps)


def med(values: Sequence[float]) -> float:
    return statistics.median(values)


def spread(values: Sequence[float], fmt: str) -> str:
    return f"{med(values):{fmt}} [{min(values):{fmt}}-{max(values):{fmt}}]"


async def repeat(reps: int, run: Callable[[], Awaitable[float]]) -> list[float]:
    return [await run() for _ in range(reps)]


async def main(args: argparse.Namespace) -> dict[str, Any]:
    reps, calls = args.reps, args.calls
    out: dict[str, Any] = {"reps": reps, "calls": calls}

    # a. overhead per call
    direct = [direct_s(noop, calls) / calls * 1e6 for _ in range(reps)]
    rows = []
    for label, make in [
        ("def, thread pool of 1", lambda: backend(noop)),
        ("async def, on the loop", lambda: backend(async_noop)),
        ("def, process pool of 1", lambda: backend(noop, processes=1)),
    ]:
        n = calls if "process" not in label else max(calls // 5, 200)
        per_call = [(await measure(make, n, 64, BODY)) / n * 1e6 - med(direct) for _ in range(reps)]
        rows.append((label, per_call))
        out[f"a_overhead_us[{label}]"] = round(med(per_call), 1)
    table = Table(title=f"a. overhead per call beyond the function (µs), {calls:,} calls")
    table.add_column("backend")
    table.add_column("overhead µs/call", justify="right")
    for label, values in rows:
        table.add_row(label, spread(values, ",.1f"))
    table.add_row("(direct call of the no-op)", spread(direct, ",.2f"))
    console.print(table)

    # b. pool scaling
    work = {**BODY, "steps": steps_for(args.work_ms)}
    n = args.cpu_calls
    results: dict[str, list[float]] = {}
    for label, make in [
        ("process pool of 1", lambda: backend(burn, processes=1)),
        ("process pool of 2", lambda: backend(burn, processes=2)),
        ("thread pool of 2", lambda: backend(burn, threads=2)),
    ]:
        results[label] = [n / await measure(make, n, 8, work) for _ in range(reps)]
    base = med(results["process pool of 1"])
    table = Table(title=f"b. CPU-bound calls ({args.work_ms:g} ms of GIL-holding work each)")
    for column in ("pool", "calls/s", "vs pool of 1"):
        table.add_column(column, justify="right" if column != "pool" else "left")
    for label, values in results.items():
        table.add_row(label, spread(values, ",.1f"), f"{med(values) / base:.2f}x")
        out[f"b_calls_per_s[{label}]"] = round(med(values), 1)
        out[f"b_ratio[{label}]"] = round(med(values) / base, 2)
    console.print(table)

    # c. end to end
    for label, url in [("embedded", None), ("redis", args.redis_url)]:
        if label == "redis":
            await flush(url)
        rps = await repeat(reps, lambda u=url: end_to_end(args.batch, u))  # type: ignore[misc]
        out[f"c_{label}_noop_rps"] = round(med(rps), 1)
        console.print(
            f"c. {args.batch:,} requests, {label} queue, 1 in-process worker, no-op function "
            f"in a thread pool of 1: {spread(rps, ',.0f')} req/s"
        )
        if label == "redis":
            await flush(url)
    return out


async def flush(url: str) -> None:
    import redis.asyncio as aioredis

    client = aioredis.from_url(url)
    await client.flushdb()
    await client.aclose()


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--calls", type=int, default=20_000, help="calls in (a)")
    parser.add_argument("--cpu-calls", type=int, default=40, help="calls in (b)")
    parser.add_argument("--work-ms", type=float, default=50.0, help="work per call in (b)")
    parser.add_argument("--batch", type=int, default=5_000, help="requests in (c)")
    parser.add_argument(
        "--redis-url", default="redis://127.0.0.1:6379/9", help="(c): a database it FLUSHes"
    )
    parser.add_argument("--quick", action="store_true", help="smoke run: 1 rep, few calls")
    args = parser.parse_args(argv)
    if args.quick:
        args.reps, args.calls, args.cpu_calls, args.batch = 1, 2_000, 8, 500
    return args


if __name__ == "__main__":
    sys.modules.setdefault("bench_backends", sys.modules["__main__"])
    print(json.dumps(asyncio.run(main(parse_args()))))
