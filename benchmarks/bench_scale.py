"""Scale: 10k / 200k / 1M-line batches end to end, memory and Redis stalls included.

Run ``python benchmarks/bench_scale.py`` (about 8 minutes on 2 cores; ``--sizes 10000``
for a smoke run). It starts a throwaway ``redis-server`` (so that it may turn Redis'
latency monitor on), the mock upstream with 0 ms latency, and for each size: writes a
JSONL file of short prompts, starts 2 worker processes (concurrency 250 each), runs
``promptq submit`` on the file, waits for the batch, runs ``promptq results`` on it,
stops the workers, and waits until the batch's keys have been swept (a result TTL of a
few seconds). Every process is its own, so its peak RSS is its own (``wait4``).

Printed for each size:

* submit: wall time (validation and enqueueing) and peak RSS;
* time to first result: the batch's first result event minus its ``created_at`` (both
  on Redis' clock; ``created_at`` is when the producer starts streaming requests in);
* throughput: the batch's ``stats.throughput_rps``;
* worker peak RSS (the larger of the two), aggregation time (``finalizing_at`` to
  ``completed_at``);
* export: ``promptq results`` wall time and peak RSS;
* Redis bytes per request: ``used_memory`` at the end of the batch minus before it;
* the longest stall seen by a PING probe (one PING every 2 ms from submit until the keys
  are gone) and the longest event of Redis' LATENCY monitor (threshold 10 ms).

Then ``promptq run`` in the embedded mode (no Redis server) at ``--embedded-sizes``:
wall time and peak RSS, and from the two the process memory per request.

Targets at 1M: producer peak RSS <= 200 MB, worker peak RSS <= 200 MB, aggregation
<= 5 s, first result <= 2 s, no latency event >= 20 ms, throughput no lower than at 10k.
The last line printed is one JSON object with every number.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, *, timeout_s: float = 20) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"nothing listens on {port}") from None
            time.sleep(0.05)


def finish(
    proc: subprocess.Popen[bytes], *, term: bool = False, timeout_s: float = 600
) -> tuple[int, float]:
    """Wait for a child; (exit code, peak RSS in MB) from wait4."""
    if term:
        proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            proc.returncode = os.waitstatus_to_exitcode(status)
            return proc.returncode, usage.ru_maxrss / 1024
        if time.monotonic() > deadline:
            proc.kill()
        time.sleep(0.02)


def write_input(path: Path, n: int) -> None:
    with path.open("w") as f:
        for i in range(n):
            f.write(f'{{"custom_id": "r{i}", "prompt": "Summarise fact number {i}"}}\n')


class Probe:
    """PINGs Redis every 2 ms and keeps the longest round trip."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.longest_ms = 0.0
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        client = aioredis.from_url(self.url)
        try:
            while True:
                start = time.perf_counter()
                await client.ping()
                self.longest_ms = max(self.longest_ms, (time.perf_counter() - start) * 1000)
                await asyncio.sleep(0.002)
        finally:
            await client.aclose()

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)


async def one_size(
    n: int, *, redis_url: str, mock_url: str, workdir: Path, concurrency: int, ttl_s: int
) -> dict[str, Any]:
    redis = aioredis.from_url(redis_url)
    await redis.flushdb()
    await redis.config_set("latency-monitor-threshold", 10)
    await redis.execute_command("LATENCY", "RESET")
    src = workdir / f"in-{n}.jsonl"
    write_input(src, n)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PROMPTQ_")}
    env.update(
        PROMPTQ_REDIS_URL=redis_url,
        PROMPTQ_UPSTREAM_URL=mock_url,
        PROMPTQ_MODEL="m",
        PROMPTQ_CONCURRENCY=str(concurrency),
        PROMPTQ_RESULT_TTL_S=str(ttl_s),
        PROMPTQ_HEARTBEAT_S="1",
    )
    workers = [
        subprocess.Popen(
            [sys.executable, "-m", "promptq", "--log-level", "WARNING", "worker"],
            env=env,
            stdin=subprocess.DEVNULL,
        )
        for _ in range(2)
    ]
    while int(await redis.zcard("promptq:workers")) < 2:
        await asyncio.sleep(0.05)
    before = int((await redis.info("memory"))["used_memory"])
    probe = Probe(redis_url)
    probe.start()
    batch_id = f"scale-{n}"
    started = time.perf_counter()
    submit = subprocess.Popen(
        [sys.executable, "-m", "promptq", "submit", str(src), "--batch-id", batch_id],
        env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
    )  # fmt: skip
    code, submit_rss = await asyncio.to_thread(finish, submit)
    submit_s = time.perf_counter() - started
    assert code == 0, f"submit exited {code}"
    key = f"promptq:batch:{{{batch_id}}}"
    while (await redis.hget(key, "status")) not in (b"completed", b"failed"):
        await asyncio.sleep(0.1)
    after = int((await redis.info("memory"))["used_memory"])
    raw = {k.decode(): v.decode() for k, v in (await redis.hgetall(key)).items()}
    stats = {k.decode(): v.decode() for k, v in (await redis.hgetall(f"{key}:stats")).items()}
    first = await redis.xrange(f"{key}:events", count=1)
    first_ms = int(first[0][0].decode().split("-")[0]) if first else 0
    started_export = time.perf_counter()
    export = subprocess.Popen(
        [sys.executable, "-m", "promptq", "results", batch_id, "-o", str(workdir / "out.jsonl")],
        env=env, stdin=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    code, export_rss = await asyncio.to_thread(finish, export)
    export_s = time.perf_counter() - started_export
    worker_rss = [(await asyncio.to_thread(finish, w, term=True))[1] for w in workers]
    # one more worker sweeps the keys once their TTL is up
    sweeper = subprocess.Popen([sys.executable, "-m", "promptq", "worker"], env=env,
                               stdin=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.monotonic() + ttl_s + 120
    while await redis.exists(f"{key}:results") and time.monotonic() < deadline:
        await asyncio.sleep(0.2)
    swept = not await redis.exists(f"{key}:results")
    await asyncio.to_thread(finish, sweeper, term=True)
    await probe.stop()
    latest = await redis.execute_command("LATENCY", "LATEST")
    worst_event = max((int(row[3]) for row in latest), default=0)
    events = {row[0].decode(): int(row[3]) for row in latest}
    await redis.flushdb()
    await redis.aclose()
    src.unlink()
    created = float(raw["created_at"])
    return {
        "n": n,
        "submit_s": round(submit_s, 2),
        "submit_rss_mb": round(submit_rss, 1),
        "first_result_s": round(first_ms / 1000 - created, 3) if first_ms else None,
        "throughput_rps": float(stats.get("throughput_rps", 0)),
        "worker_rss_mb": round(max(worker_rss), 1),
        "aggregation_s": round(float(raw["completed_at"]) - float(raw["finalizing_at"]), 3),
        "export_s": round(export_s, 2),
        "export_rss_mb": round(export_rss, 1),
        "redis_bytes_per_request": round((after - before) / n),
        "longest_ping_ms": round(probe.longest_ms, 1),
        "latency_monitor_worst_ms": worst_event,
        "latency_events": events,
        "swept": swept,
    }


def embedded_run(n: int, *, mock_url: str, workdir: Path) -> dict[str, Any]:
    """``promptq run`` in the embedded mode (no Redis server): wall time and peak RSS."""
    src = workdir / f"embedded-{n}.jsonl"
    write_input(src, n)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PROMPTQ_")}
    env.update(PROMPTQ_UPSTREAM_URL=mock_url, PROMPTQ_MODEL="m", PROMPTQ_CONCURRENCY="250")
    started = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", "promptq", "run", str(src), "-o", str(workdir / "e.jsonl")],
        env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    code, rss = finish(proc, timeout_s=1800)
    src.unlink()
    for leftover in workdir.glob("e.*"):
        leftover.unlink()
    return {"n": n, "exit": code, "wall_s": round(time.perf_counter() - started, 1),
            "rss_mb": round(rss, 1)}  # fmt: skip


async def main(args: argparse.Namespace) -> list[dict[str, Any]]:
    workdir = Path(tempfile.mkdtemp(prefix="promptq-scale-"))
    redis_port, mock_port = free_port(), free_port()
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("needs redis-server on PATH (apt-get install redis-server)")
    redis_proc = subprocess.Popen(
        [binary, "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "",
         "--appendonly", "no", "--dir", str(workdir)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    mock = subprocess.Popen(
        [sys.executable, "-m", "promptq", "mock-llm", "--port", str(mock_port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    rows = []
    try:
        wait_port(redis_port)
        wait_port(mock_port)
        for n in args.sizes:
            row = await one_size(
                n,
                redis_url=f"redis://127.0.0.1:{redis_port}/0",
                mock_url=f"http://127.0.0.1:{mock_port}/v1",
                workdir=workdir,
                concurrency=args.concurrency,
                ttl_s=args.ttl_s,
            )
            rows.append(row)
            print(" ".join(f"{k}={v}" for k, v in row.items()), flush=True)
        embedded = [
            await asyncio.to_thread(
                embedded_run, n, mock_url=f"http://127.0.0.1:{mock_port}/v1", workdir=workdir
            )
            for n in args.embedded_sizes
        ]
        for row in embedded:
            print("embedded " + " ".join(f"{k}={v}" for k, v in row.items()), flush=True)
        if len(embedded) >= 2:
            a, b = embedded[0], embedded[-1]
            per_request = (b["rss_mb"] - a["rss_mb"]) * 2**20 / (b["n"] - a["n"])
            print(f"embedded: {per_request:,.0f} bytes of process memory per request")
            rows.append({"embedded": embedded, "embedded_bytes_per_request": round(per_request)})
    finally:
        mock.terminate()
        redis_proc.terminate()
        mock.wait(timeout=10)
        redis_proc.wait(timeout=10)
        shutil.rmtree(workdir, ignore_errors=True)
    return rows


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 200_000, 1_000_000])
    parser.add_argument("--concurrency", type=int, default=250, help="slots per worker")
    parser.add_argument("--ttl-s", type=int, default=5, help="result TTL of the batches")
    parser.add_argument(
        "--embedded-sizes", type=int, nargs="*", default=[10_000, 200_000],
        help="embedded `promptq run` sizes (their peak RSS gives the cost per request)",
    )  # fmt: skip
    return parser.parse_args(argv)


if __name__ == "__main__":
    print(json.dumps(asyncio.run(main(parse_args()))))
