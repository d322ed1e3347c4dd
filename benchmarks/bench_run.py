"""``promptq.run`` beside the textbook ``asyncio.gather``, on the same mock upstream.

Run ``python benchmarks/bench_run.py`` (about 20 s; ``--quick`` for a smoke run). It
starts ``promptq mock-llm`` as its own process (``--latency-ms``, default 200) and, in
turns (A B A B ...), times:

* **gather**: the seed's pipeline: one aiohttp session, ``asyncio.Semaphore(C)`` and
  ``asyncio.gather`` over ``--n`` prompts, results kept in a list;
* **promptq.run**: ``promptq.run(prompts, concurrency=C)`` from a plain script, in the
  embedded mode (an in-process queue and worker, no Redis): wall time from the call to
  the returned results, the queue's start and stop included.

Target: promptq.run of 100 prompts at 200 ms in <= 0.35 s. The last line printed is one
JSON object with the medians.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Any

import aiohttp

import promptq


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_mock(latency_ms: float) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "promptq", "mock-llm", "--port", str(port),
         "--latency-ms", str(latency_ms)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.monotonic() + 20
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return proc, f"http://127.0.0.1:{port}/v1"
        except OSError:
            if time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError("mock-llm did not start") from None
            time.sleep(0.05)


async def gather(url: str, prompts: Sequence[str], concurrency: int) -> list[Any]:
    semaphore = asyncio.Semaphore(concurrency)
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def one(prompt: str) -> Any:
            async with semaphore:
                body = {"model": "m", "messages": [{"role": "user", "content": prompt}]}
                async with session.post(f"{url}/chat/completions", json=body) as resp:
                    return await resp.json()

        return await asyncio.gather(*(one(p) for p in prompts))


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--n", type=int, default=100)
    parser.add_argument("--concurrency", type=int, default=100)
    parser.add_argument("--latency-ms", type=float, default=200.0)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    if args.quick:
        args.reps = 1
    os.environ.pop("PROMPTQ_REDIS_URL", None)  # the embedded mode
    mock, url = start_mock(args.latency_ms)
    prompts = [f"question {i}" for i in range(args.n)]
    walls: dict[str, list[float]] = {"gather": [], "promptq.run": []}
    try:
        asyncio.run(gather(url, prompts[:5], 5))  # warm the mock up
        for _ in range(args.reps):
            start = time.perf_counter()
            answers = asyncio.run(gather(url, prompts, args.concurrency))
            walls["gather"].append(time.perf_counter() - start)
            assert len(answers) == args.n
            start = time.perf_counter()
            run = promptq.run(prompts, concurrency=args.concurrency, upstream_url=url, model="m")
            walls["promptq.run"].append(time.perf_counter() - start)
            assert run.stats.succeeded == args.n, run
    finally:
        mock.terminate()
        mock.wait(timeout=10)
    summary: dict[str, Any] = {"n": args.n, "concurrency": args.concurrency,
                               "latency_ms": args.latency_ms, "reps": args.reps}  # fmt: skip
    for name, values in walls.items():
        med = statistics.median(values)
        summary[f"{name}_wall_s"] = round(med, 3)
        print(f"{name:12} wall {med:.3f} s  [{min(values):.3f}-{max(values):.3f}] "
              f"over {len(values)} runs")  # fmt: skip
    print(f"promptq.run / gather: {summary['promptq.run_wall_s'] / summary['gather_wall_s']:.2f}x"
          " the wall time (target: promptq.run <= 0.35 s)")  # fmt: skip
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
