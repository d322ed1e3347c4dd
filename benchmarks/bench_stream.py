"""Streaming through the queue: what promptq adds to time to first chunk and between chunks.

Run ``python benchmarks/bench_stream.py`` (about a minute; ``--quick`` for a smoke run).
It starts a throwaway ``redis-server``, ``promptq mock-llm`` (``--chunks`` pieces,
``--interval-ms`` apart: 20 and 10 by default), ``promptq serve`` and ``--workers`` (1)
``promptq worker`` processes, then opens ``--streams`` (100) concurrent streamed chat
completions, in turns, directly against the mock and through ``promptq serve``, with a
plain aiohttp SSE reader (the client's own cost is the same both ways).

Printed: time to first chunk (request sent to first event) p50/p99 each way and what
promptq adds; the gaps between chunks p50/p99 each way and what promptq adds; CPU per
chunk in the API process and in the workers (``/proc``), beside the mock's own (an
aiohttp server writing the same events: what any Python server pays per chunk).
Latencies are medians over ``--reps`` runs, CPU is summed over them; the last line is
one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import itertools
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

from _procs import free_port, wait_port

TOKEN = "bench-token"
TICKS = os.sysconf("SC_CLK_TCK")


def spawn(args: list[str], env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    return subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of a live process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


async def one_stream(
    session: aiohttp.ClientSession, url: str, index: int, headers: dict[str, str], delay_s: float
) -> tuple[float, list[float], int]:
    """(time to first event, gaps between events, events) of one streamed request."""
    await asyncio.sleep(delay_s)
    body = {"model": "mock-gpt", "stream": True,
            "messages": [{"role": "user", "content": f"stream number {index}"}]}  # fmt: skip
    sent = time.monotonic()
    arrivals: list[float] = []
    async with session.post(f"{url}/chat/completions", json=body, headers=headers) as resp:
        assert resp.status == 200, (resp.status, await resp.text())
        async for line in resp.content:
            if line.startswith(b"data: "):
                arrivals.append(time.monotonic())
    gaps = [b - a for a, b in itertools.pairwise(arrivals)]
    return arrivals[0] - sent, gaps, len(arrivals)


async def run(
    url: str, streams: int, headers: dict[str, str], stagger_s: float = 0.0
) -> dict[str, Any]:
    connector = aiohttp.TCPConnector(limit=streams)
    # the reader's own garbage collection must not show up as a gap: a full collection
    # here paused it 12 ms at once for every stream (its 99th percentile), in whichever
    # run it fell. So none during a run, and one between runs.
    gc.collect()
    gc.disable()
    try:
        async with aiohttp.ClientSession(connector=connector) as session:
            results = await asyncio.gather(
                *(one_stream(session, url, i, headers, stagger_s * i / streams)
                  for i in range(streams))
            )  # fmt: skip
    finally:
        gc.enable()
    firsts = [r[0] * 1000 for r in results]
    gaps = [g * 1000 for r in results for g in r[1]]
    return {"ttfc_p50": percentile(firsts, 50), "ttfc_p99": percentile(firsts, 99),
            "gap_p50": percentile(gaps, 50), "gap_p99": percentile(gaps, 99),
            "events": sum(r[2] for r in results)}  # fmt: skip


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--streams", type=int, default=100, help="concurrent streams")
    parser.add_argument("--chunks", type=int, default=20, help="content pieces per stream")
    parser.add_argument("--interval-ms", type=float, default=10.0, help="between events")
    parser.add_argument(
        "--workers",
        type=int,
        default=1,
        help="worker processes (default 1: on 2 cores, serve and one worker each get one; "
        "the mock, the client and Redis share them too)",
    )
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument(
        "--burst",
        action="store_true",
        help="start every stream at once (default: starts spread over one stream's length, "
        "so that --streams run concurrently in a steady state)",
    )
    parser.add_argument("--quick", action="store_true", help="one rep of 20 streams")
    args = parser.parse_args()
    if args.quick:
        args.reps, args.streams = 1, 20
    binary = shutil.which("redis-server")
    if binary is None:
        sys.exit("bench_stream needs redis-server on PATH (apt-get install redis-server)")
    redis_port, mock_port, api_port = free_port(), free_port(), free_port()
    procs = [spawn([binary, "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "",
                    "--appendonly", "no", "--dir", tempfile.mkdtemp()])]  # fmt: skip
    wait_port(redis_port, "redis-server")
    procs.append(spawn([sys.executable, "-m", "promptq", "mock-llm", "--port", str(mock_port),
                        "--stream-chunks", str(args.chunks),
                        "--stream-interval-ms", str(args.interval_ms)]))  # fmt: skip
    wait_port(mock_port, "mock-llm")
    mock_url = f"http://127.0.0.1:{mock_port}/v1"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PROMPTQ_")}
    env.update(PROMPTQ_REDIS_URL=f"redis://127.0.0.1:{redis_port}/0",
               PROMPTQ_UPSTREAM_URL=mock_url, PROMPTQ_API_TOKEN=TOKEN,
               PROMPTQ_CONCURRENCY="250")  # fmt: skip
    api = spawn([sys.executable, "-m", "promptq", "--log-level", "WARNING", "serve",
                 "--port", str(api_port)], env)  # fmt: skip
    workers = [spawn([sys.executable, "-m", "promptq", "--log-level", "WARNING", "worker"], env)
               for _ in range(args.workers)]  # fmt: skip
    procs += [api, *workers]
    wait_port(api_port, "promptq serve")
    api_url = f"http://127.0.0.1:{api_port}/v1"
    auth = {"Authorization": f"Bearer {TOKEN}"}
    stagger = 0.0 if args.burst else args.chunks * args.interval_ms / 1000
    try:
        await asyncio.sleep(2)  # the workers' start (heartbeat, checks)
        await run(api_url, 5, auth)  # warm up: connections, scripts loaded
        direct, through, api_cpu, worker_cpu, mock_cpu, events = [], [], [], [], [], []
        mock = procs[1]
        for _ in range(args.reps):
            before_mock = cpu_s(mock.pid)
            direct.append(await run(mock_url, args.streams, {}, stagger))
            mock_cpu.append(cpu_s(mock.pid) - before_mock)
            before_api = cpu_s(api.pid)
            before_workers = sum(cpu_s(w.pid) for w in workers)
            result = await run(api_url, args.streams, auth, stagger)
            api_cpu.append(cpu_s(api.pid) - before_api)
            worker_cpu.append(sum(cpu_s(w.pid) for w in workers) - before_workers)
            events.append(result["events"])
            through.append(result)
    finally:
        for proc in reversed(procs):
            proc.send_signal(signal.SIGTERM)
        for proc in procs:
            proc.wait(timeout=30)

    def med(rows: list[dict[str, Any]], key: str) -> float:
        return statistics.median(r[key] for r in rows)

    out: dict[str, Any] = {"streams": args.streams, "chunks": args.chunks, "burst": args.burst,
                           "interval_ms": args.interval_ms, "workers": args.workers}  # fmt: skip
    for key in ("ttfc_p50", "ttfc_p99", "gap_p50", "gap_p99"):
        out[f"direct_{key}_ms"] = med(direct, key)
        out[f"promptq_{key}_ms"] = med(through, key)
        out[f"added_{key}_ms"] = med(through, key) - med(direct, key)
    # CPU: all runs' seconds over all their chunks (/proc counts in 10 ms ticks: one
    # run's figure alone would be coarse)
    out["api_cpu_us_per_chunk"] = sum(api_cpu) / sum(events) * 1e6
    out["worker_cpu_us_per_chunk"] = sum(worker_cpu) / sum(events) * 1e6
    out["mock_cpu_us_per_chunk"] = sum(mock_cpu) / sum(r["events"] for r in direct) * 1e6
    print(f"{args.streams} concurrent streams, {args.chunks} chunks {args.interval_ms:g} ms "
          f"apart, {'all at once' if args.burst else 'starts spread'}, {args.workers} workers, "
          f"{args.reps} rep(s), medians:")  # fmt: skip
    print(f"  time to first chunk  direct {out['direct_ttfc_p50_ms']:.1f} / "
          f"{out['direct_ttfc_p99_ms']:.1f} ms  promptq {out['promptq_ttfc_p50_ms']:.1f} / "
          f"{out['promptq_ttfc_p99_ms']:.1f} ms  added {out['added_ttfc_p50_ms']:+.1f} / "
          f"{out['added_ttfc_p99_ms']:+.1f} ms (p50 / p99)")  # fmt: skip
    print(f"  gap between chunks   direct {out['direct_gap_p50_ms']:.1f} / "
          f"{out['direct_gap_p99_ms']:.1f} ms  promptq {out['promptq_gap_p50_ms']:.1f} / "
          f"{out['promptq_gap_p99_ms']:.1f} ms  added {out['added_gap_p50_ms']:+.1f} / "
          f"{out['added_gap_p99_ms']:+.1f} ms")  # fmt: skip
    print(f"  CPU per chunk        API {out['api_cpu_us_per_chunk']:.0f} µs, workers "
          f"{out['worker_cpu_us_per_chunk']:.0f} µs (the mock itself, an aiohttp "
          f"server writing the same events: {out['mock_cpu_us_per_chunk']:.0f} µs)")  # fmt: skip
    print(json.dumps(out))


if __name__ == "__main__":
    asyncio.run(main())
