"""End-to-end benchmark: promptq (Redis + 2 worker processes) against an in-process baseline.

Run ``python benchmarks/bench_pipeline.py`` (about a minute on 2 cores) or add ``--quick``
for a smoke run (one repetition, small batches). Needs a Redis server; the benchmark uses
one database only (``--redis-url``, default db 9), FLUSHes it before every scenario and
at the end, and never touches another database.

What runs
---------
* A mock OpenAI-compatible upstream per latency setting, each its own process
  (``python -m promptq mock-llm --latency-ms L``). It answers every request after a fixed
  latency, so with latency L and concurrency C no client can beat ``C / L`` requests/s.
* **baseline**: the textbook single-process pipeline: one aiohttp ``ClientSession``
  (``TCPConnector(limit=C)``), ``asyncio.Semaphore(C)`` and ``asyncio.gather`` over every
  prompt, results kept in memory. Throughput = prompts / wall time of the gather.
* **promptq**: two real worker processes (``python -m promptq worker``, C/2 slots each),
  started once per scenario and warmed up with one unmeasured batch of 2 x C prompts (so
  both hold their upstream connections, as long-running workers do); the benchmark
  submits with ``Producer.submit`` and waits with ``Batch.wait``. ``rps`` is the batch's
  own ``stats.throughput_rps`` (batch creation in Redis to its last result);
  ``client rps`` is prompts / (``submit()`` call start to ``wait()`` return), so it also
  counts validating and writing the batch and noticing that it finished.

Baseline and promptq runs alternate (A B A B ...) so machine noise hits both; the tables
show the median with [min-max] over the repetitions, and ``ratio`` = median promptq rps /
median baseline rps.

Scenarios
---------
a. 200 ms latency, 5,000 prompts, concurrency 500: latency-bound; the upper bound is
   2,500 req/s. Target: promptq >= 0.9x baseline.
b. 0 ms latency, 20,000 prompts (``--n-cpu``), concurrency 500: CPU-bound (mock,
   clients, Redis share the cores); measures per-request overhead. Target: promptq >=
   0.5x baseline.
c. 200 ms latency, 100 prompts: how long a small batch takes end to end
   (``stats.wall_s``, median of 5). One upstream round trip is the floor (0.2 s).
   Target: <= 0.35 s.
d. Cost, from scenario b's promptq runs: worker CPU (utime + stime of both worker
   processes from ``/proc/<pid>/stat``) and Redis CPU (``INFO cpu``) per request, in
   microseconds; and Redis memory per queued request (``used_memory`` before/after
   submitting 10,000 ~60-character prompts with no worker running). The baseline
   process's own CPU per request is printed beside them for scale.

Reading the numbers
-------------------
In (a) both sides should sit near the ``C / L`` ceiling: a ratio near 1 means the queue
adds no throughput loss. In (b) the baseline is one process (plain asyncio loop) while
promptq spreads the client work over two worker processes (uvloop), so on 2 cores a
ratio above 1 is parallelism, not lower cost: compare the CPU microseconds in (d)
instead. (c) minus the 0.2 s upstream latency is promptq's fixed per-batch overhead.
After each scenario the benchmark prints how each worker exited on SIGTERM (expect
``exit 0`` within a fraction of a second); ``unclean_worker_exits`` counts the others.

``max in flight`` is the mock's peak of concurrent requests: it should reach the
configured concurrency; less means the client side could not keep the upstream busy.
(At 0 ms latency the mock answers without yielding, so the column shows ``-``.)
``accept overflows`` is the kernel's ListenOverflows counter summed over the side's runs:
connections dropped because the mock's listen queue was full (each delays its request by
about a second, a straggler tail). It is machine-wide, so other load can add to it.

The last line printed is one JSON object with every median (for a README to quote).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import IO, Any

import aiohttp
import redis.asyncio as aioredis
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from promptq import Producer, Settings
from promptq.shared import keys

MODEL = "mock-gpt"
WORKERS = 2
CLK_TCK = os.sysconf("SC_CLK_TCK")
READY_TIMEOUT_S = 30.0
BATCH_TIMEOUT_S = 300.0

console = Console()
console.width = max(console.width, 140)  # rich assumes 80 columns when piped


# -- processes ----------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def terminate(proc: subprocess.Popen[bytes]) -> None:
    """One SIGTERM to our own child (by pid), if it is still running."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)


def stop_process(
    proc: subprocess.Popen[bytes], *, grace_s: float = 15.0, sigterm_at: float | None = None
) -> str:
    """SIGTERM (unless sent at ``sigterm_at``), wait until ``grace_s`` after it, then SIGKILL.

    Returns how the process ended, e.g. ``exit 0 0.12s after SIGTERM``.
    """
    if sigterm_at is None:
        sigterm_at = time.monotonic()
        terminate(proc)
    try:
        code = proc.wait(timeout=max(0.1, sigterm_at + grace_s - time.monotonic()))
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=5)
        return f"still running {grace_s:.0f}s after SIGTERM: killed"
    return f"exit {code} {time.monotonic() - sigterm_at:.2f}s after SIGTERM"


def listen_overflows() -> int:
    """``TcpExt: ListenOverflows`` from ``/proc/net/netstat`` (whole network namespace).

    Counts connections dropped because a listening socket's accept queue was full; the
    client then retries after about a second, which shows up as a straggler tail.
    """
    try:
        lines = Path("/proc/net/netstat").read_text().splitlines()
    except OSError:
        return 0
    for names, values in zip(lines[::2], lines[1::2], strict=False):
        if names.startswith("TcpExt:"):
            table = dict(zip(names.split()[1:], values.split()[1:], strict=True))
            return int(table.get("ListenOverflows", 0))
    return 0


def cpu_ticks(pid: int) -> int:
    """utime + stime of a process, in clock ticks (``/proc/<pid>/stat`` fields 14, 15)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()  # the command name may contain spaces
    return int(fields[11]) + int(fields[12])


class LogFile:
    """A temporary file for a child's stderr that we can read back afterwards."""

    def __init__(self, label: str) -> None:
        self.label = label
        # Lives as long as the child process it logs; closed by close().
        self.handle: IO[bytes] = tempfile.TemporaryFile()  # noqa: SIM115

    def text(self) -> str:
        self.handle.flush()
        self.handle.seek(0)
        return self.handle.read().decode(errors="replace")

    def close(self) -> None:
        self.handle.close()


class MockProcess:
    """``python -m promptq mock-llm`` on a free port."""

    def __init__(self, latency_ms: float) -> None:
        self.latency_ms = latency_ms
        self.port = free_port()
        self.log = LogFile(f"mock {latency_ms:g} ms")
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def v1_url(self) -> str:
        return f"{self.base_url}/v1"

    def spawn(self) -> None:
        cmd = [sys.executable, "-m", "promptq", "--log-level", "WARNING", "mock-llm"]
        cmd += ["--port", str(self.port), "--latency-ms", str(self.latency_ms)]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=self.log.handle)

    async def wait_ready(self) -> None:
        assert self.proc is not None, "spawn() first"
        deadline = time.monotonic() + READY_TIMEOUT_S
        async with aiohttp.ClientSession() as session:
            while True:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"mock exited early:\n{self.log.text()}")
                with contextlib.suppress(aiohttp.ClientError, OSError):
                    async with session.get(f"{self.v1_url}/models") as resp:
                        if resp.status == 200:
                            return
                if time.monotonic() > deadline:
                    raise RuntimeError(f"mock not answering on port {self.port}")
                await asyncio.sleep(0.1)

    async def reset_stats(self, session: aiohttp.ClientSession) -> None:
        async with session.post(f"{self.base_url}/stats/reset") as resp:
            resp.raise_for_status()

    async def stats(self, session: aiohttp.ClientSession) -> dict[str, Any]:
        async with session.get(f"{self.base_url}/stats") as resp:
            data: dict[str, Any] = await resp.json()
            return data

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc, grace_s=5)


class WorkerGroup:
    """``WORKERS`` real ``python -m promptq worker`` processes against one upstream."""

    def __init__(self, *, redis_url: str, upstream_v1: str, concurrency: int) -> None:
        self.env = {
            **os.environ,
            "PROMPTQ_REDIS_URL": redis_url,
            "PROMPTQ_UPSTREAM_URL": upstream_v1,
            "PROMPTQ_CONCURRENCY": str(concurrency),
            "PROMPTQ_MODEL": MODEL,
            "PYTHONUNBUFFERED": "1",
        }
        self.procs: list[subprocess.Popen[bytes]] = []
        self.logs: list[LogFile] = []

    def start(self) -> None:
        cmd = [sys.executable, "-m", "promptq", "--log-level", "WARNING", "worker"]
        for i in range(WORKERS):
            log = LogFile(f"worker {i}")
            self.logs.append(log)
            self.procs.append(
                subprocess.Popen(cmd, env=self.env, stdout=subprocess.DEVNULL, stderr=log.handle)
            )

    async def wait_ready(self, redis: aioredis.Redis) -> None:
        """Until both heartbeats exist and both workers listen for wake-ups."""
        deadline = time.monotonic() + READY_TIMEOUT_S
        while True:
            for proc, log in zip(self.procs, self.logs, strict=True):
                if proc.poll() is not None:
                    raise RuntimeError(f"{log.label} exited early:\n{log.text()}")
            beats = int(await redis.zcard(keys.WORKERS))
            hashes = len([k async for k in redis.scan_iter(match=f"{keys.PREFIX}:worker:*")])
            numsub = await redis.pubsub_numsub(keys.WAKEUP_CHANNEL)
            listeners = int(numsub[0][1]) if numsub else 0
            if beats >= WORKERS and hashes >= WORKERS and listeners >= WORKERS:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"workers not ready after {READY_TIMEOUT_S:.0f}s: {beats} heartbeat(s), "
                    f"{hashes} worker key(s), {listeners} wake-up listener(s)"
                )
            await asyncio.sleep(0.1)

    def ticks(self) -> list[int]:
        return [cpu_ticks(p.pid) for p in self.procs]

    def alive(self) -> bool:
        return all(p.poll() is None for p in self.procs)

    def stop(self) -> list[str]:
        """SIGTERM every worker at once, then wait for each; one line per worker."""
        sigterm_at = time.monotonic()
        for proc in self.procs:
            terminate(proc)
        return [
            f"{log.label} (pid {proc.pid}): {stop_process(proc, sigterm_at=sigterm_at)}"
            for proc, log in zip(self.procs, self.logs, strict=True)
        ]


# -- one run of each side -----------------------------------------------------------------


@dataclass
class Run:
    rps: float
    wall_s: float
    max_in_flight: int = 0
    listen_overflows: int = 0
    failed: int = 0
    client_rps: float = 0.0
    submit_s: float = 0.0
    p50_ms: float = 0.0
    worker_ticks: list[int] = field(default_factory=list)
    redis_cpu_s: float = 0.0
    #: CPU time of this (the benchmark) process: the whole baseline, or the producer side
    local_cpu_s: float = 0.0


async def run_baseline(upstream_v1: str, prompts: Sequence[str], concurrency: int) -> Run:
    """The textbook pipeline: one session, a semaphore, ``gather`` over every prompt."""
    url = f"{upstream_v1}/chat/completions"
    semaphore = asyncio.Semaphore(concurrency)
    cpu_before = time.process_time()
    start = time.perf_counter()
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def one(prompt: str) -> dict[str, Any]:
            body = {"model": MODEL, "messages": [{"role": "user", "content": prompt}]}
            async with semaphore, session.post(url, json=body) as resp:
                resp.raise_for_status()
                answer: dict[str, Any] = await resp.json()
                return answer

        results = await asyncio.gather(*(one(p) for p in prompts), return_exceptions=True)
    wall = time.perf_counter() - start
    failed = sum(isinstance(r, BaseException) for r in results)
    rps = len(prompts) / wall
    cpu = time.process_time() - cpu_before
    return Run(rps=rps, wall_s=wall, failed=failed, client_rps=rps, local_cpu_s=cpu)


async def redis_cpu_s(redis: aioredis.Redis) -> float:
    info = await redis.info("cpu")
    return float(info["used_cpu_sys"]) + float(info["used_cpu_user"])


async def drop_batch(redis: aioredis.Redis, batch_id: str) -> None:
    """Delete a finished batch's keys so repetitions do not accumulate data."""
    await redis.delete(*keys.batch_keys(batch_id))
    await redis.zrem(keys.BATCHES, batch_id)


async def run_promptq(
    producer: Producer,
    redis: aioredis.Redis,
    workers: WorkerGroup,
    prompts: Sequence[str],
) -> Run:
    ticks_before = workers.ticks()
    redis_before = await redis_cpu_s(redis)
    cpu_before = time.process_time()
    start = time.perf_counter()
    batch = await producer.submit(list(prompts))
    submitted = time.perf_counter()
    stats = await batch.wait(timeout_s=BATCH_TIMEOUT_S)
    client_wall = time.perf_counter() - start
    producer_cpu = time.process_time() - cpu_before
    redis_after = await redis_cpu_s(redis)
    ticks = [after - before for before, after in zip(ticks_before, workers.ticks(), strict=True)]
    await drop_batch(redis, batch.id)
    return Run(
        rps=stats.throughput_rps,
        wall_s=stats.wall_s,
        failed=stats.failed + (len(prompts) - stats.succeeded - stats.failed),
        client_rps=len(prompts) / client_wall,
        submit_s=submitted - start,
        p50_ms=stats.p50_ms,
        worker_ticks=ticks,
        redis_cpu_s=redis_after - redis_before,
        local_cpu_s=producer_cpu,
    )


async def with_mock_stats(
    mock: MockProcess, session: aiohttp.ClientSession, go: Callable[[], Awaitable[Run]]
) -> Run:
    """Run ``go`` with the mock's counters reset first; fill in its peak concurrency and
    the kernel's accept-queue overflow count during the run."""
    await mock.reset_stats(session)
    overflows = listen_overflows()
    run = await go()
    run.listen_overflows = listen_overflows() - overflows
    stats = await mock.stats(session)
    run.max_in_flight = int(stats.get("max_in_flight", 0))
    return run


# -- scenarios ----------------------------------------------------------------------------


@dataclass
class Scenario:
    key: str
    title: str
    latency_ms: float
    n: int
    concurrency: int
    reps: int
    baseline: list[Run] = field(default_factory=list)
    promptq: list[Run] = field(default_factory=list)
    worker_log: str = ""
    #: how each worker exited on SIGTERM, and heartbeats left registered afterwards
    shutdown: list[str] = field(default_factory=list)
    stale_heartbeats: int = 0
    warm_up_overflows: int = 0
    seconds: float = 0.0


def prompts_for(n: int, tag: str) -> list[str]:
    # ~60 characters each, all distinct
    return [
        f"[{tag}] Summarise item {i:06d} of the benchmark in one short sentence." for i in range(n)
    ]


async def flush(redis: aioredis.Redis) -> None:
    await redis.flushdb()


async def run_scenario(
    scenario: Scenario,
    *,
    mock: MockProcess,
    redis: aioredis.Redis,
    redis_url: str,
    session: aiohttp.ClientSession,
) -> None:
    started = time.monotonic()
    await flush(redis)
    per_worker = scenario.concurrency // WORKERS
    workers = WorkerGroup(redis_url=redis_url, upstream_v1=mock.v1_url, concurrency=per_worker)
    try:
        workers.start()
        await workers.wait_ready(redis)
        settings = Settings(model=MODEL, redis_url=redis_url)
        async with Producer.from_url(redis_url, settings=settings) as producer:
            # Long-running workers keep their upstream connections: open them all first.
            warm_up = prompts_for(2 * scenario.concurrency, "warm-up")
            overflows = listen_overflows()
            await run_promptq(producer, redis, workers, warm_up)
            scenario.warm_up_overflows = listen_overflows() - overflows
            for rep in range(scenario.reps):
                prompts = prompts_for(scenario.n, f"{scenario.key}{rep}")
                baseline = partial(run_baseline, mock.v1_url, prompts, scenario.concurrency)
                scenario.baseline.append(await with_mock_stats(mock, session, baseline))
                promptq = partial(run_promptq, producer, redis, workers, prompts)
                scenario.promptq.append(await with_mock_stats(mock, session, promptq))
                if not workers.alive():
                    raise RuntimeError("a worker process died during the scenario")
    finally:
        scenario.shutdown = workers.stop()
        scenario.stale_heartbeats = int(await redis.zcard(keys.WORKERS))
        scenario.worker_log = "\n".join(
            f"--- {log.label} (pid {proc.pid}, exit {proc.returncode}) ---\n{text}"
            for proc, log in zip(workers.procs, workers.logs, strict=True)
            if (text := log.text().strip())
        )
        for log in workers.logs:
            log.close()
        await flush(redis)
        scenario.seconds = time.monotonic() - started


async def measure_queue_memory(redis: aioredis.Redis, redis_url: str, n: int) -> float:
    """Bytes of Redis memory per queued request, with no worker running."""
    await flush(redis)
    try:
        live = int(await redis.zcard(keys.WORKERS))
        if live:
            raise RuntimeError(f"{live} worker(s) still registered; cannot measure queue memory")
        prompts = prompts_for(n, "mem")
        settings = Settings(model=MODEL, redis_url=redis_url)
        async with Producer.from_url(redis_url, settings=settings) as producer:
            before = int((await redis.info("memory"))["used_memory"])
            await producer.submit(prompts)
            after = int((await redis.info("memory"))["used_memory"])
        return (after - before) / n
    finally:
        await flush(redis)


# -- reporting ----------------------------------------------------------------------------


def med(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def spread(values: Sequence[float], fmt: str = ",.0f", sep: str = " ") -> str:
    """``median [min-max]`` (just the value for a single run)."""
    if not values:
        return "-"
    if len(values) == 1:
        return format(values[0], fmt)
    low, high = format(min(values), fmt), format(max(values), fmt)
    return f"{format(med(values), fmt)}{sep}[{low}-{high}]"


def throughput_table(scenarios: Sequence[Scenario]) -> Table:
    table = Table(title="Throughput: median \\[min-max] over repetitions")
    columns = ("scenario", "side", "rps", "client rps", "wall s", "submit s", "max in flight")
    for col in (*columns, "accept overflows", "failed"):
        table.add_column(col, justify="left" if col in ("scenario", "side") else "right")
    table.add_column("ratio", justify="right")
    for s in scenarios:
        ratio = med([r.rps for r in s.promptq]) / med([r.rps for r in s.baseline])
        label = f"{s.key}. {s.title}"
        for side, runs in (("baseline", s.baseline), ("promptq", s.promptq)):
            table.add_row(
                label if side == "baseline" else "",
                side,
                spread([r.rps for r in runs], sep="\n"),
                spread([r.client_rps for r in runs], sep="\n"),
                spread([r.wall_s for r in runs], ".3f", sep="\n"),
                spread([r.submit_s for r in runs], ".3f", sep="\n") if side == "promptq" else "",
                spread([float(r.max_in_flight) for r in runs], sep="\n")
                if s.latency_ms > 0
                else "-",
                str(sum(r.listen_overflows for r in runs)),
                str(sum(r.failed for r in runs)),
                "" if side == "baseline" else f"{ratio:.2f}x",
            )
        table.add_section()
    return table


def latency_table(s: Scenario) -> Table:
    table = Table(title=f"c. {s.title}: {s.n} prompts, {len(s.promptq)} runs")
    table.add_column("metric")
    table.add_column("median \\[min-max]", justify="right")
    table.add_column("target", justify="right")
    table.add_row(
        "promptq stats.wall_s (s)", spread([r.wall_s for r in s.promptq], ".3f"), "<= 0.35"
    )
    table.add_row(
        "promptq client wall (s)",
        spread([s.n / r.client_rps for r in s.promptq], ".3f"),
        "",
    )
    table.add_row("promptq submit() (s)", spread([r.submit_s for r in s.promptq], ".3f"), "")
    table.add_row("promptq p50 latency (ms)", spread([r.p50_ms for r in s.promptq], ".1f"), "")
    table.add_row("baseline wall (s)", spread([r.wall_s for r in s.baseline], ".3f"), "")
    return table


@dataclass
class Costs:
    worker_us: float
    worker_split: list[float]
    redis_us: float
    producer_us: float
    baseline_us: float
    memory_bytes: float
    memory_n: int


def costs_from(s: Scenario, memory_bytes: float, memory_n: int) -> Costs:
    n = s.n * len(s.promptq)
    per_worker = [sum(r.worker_ticks[i] for r in s.promptq) for i in range(WORKERS)]
    total = sum(per_worker) or 1
    return Costs(
        worker_us=sum(per_worker) / CLK_TCK / n * 1e6,
        worker_split=[t / total for t in per_worker],
        redis_us=sum(r.redis_cpu_s for r in s.promptq) / n * 1e6,
        producer_us=sum(r.local_cpu_s for r in s.promptq) / n * 1e6,
        baseline_us=sum(r.local_cpu_s for r in s.baseline) / (s.n * len(s.baseline)) * 1e6,
        memory_bytes=memory_bytes,
        memory_n=memory_n,
    )


def cost_table(c: Costs, s: Scenario) -> Table:
    table = Table(title=f"d. Cost per request (promptq runs of scenario {s.key})")
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_row("worker CPU, both processes (µs/req)", f"{c.worker_us:,.0f}")
    table.add_row(
        "  share of worker CPU per process", " / ".join(f"{x:.0%}" for x in c.worker_split)
    )
    table.add_row("Redis CPU (µs/req)", f"{c.redis_us:,.0f}")
    table.add_row("producer CPU, submit + wait (µs/req)", f"{c.producer_us:,.0f}")
    table.add_row("for scale: baseline process CPU (µs/req)", f"{c.baseline_us:,.0f}")
    table.add_row(
        f"Redis memory per queued request ({c.memory_n:,} prompts, bytes)",
        f"{c.memory_bytes:,.0f}",
    )
    return table


def summary(scenarios: dict[str, Scenario], costs: Costs, total_s: float) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key in ("a", "b"):
        s = scenarios[key]
        base, pq = med([r.rps for r in s.baseline]), med([r.rps for r in s.promptq])
        out[f"{key}_latency_ms"] = s.latency_ms
        out[f"{key}_n"] = s.n
        out[f"{key}_baseline_rps"] = round(base, 1)
        out[f"{key}_promptq_rps"] = round(pq, 1)
        out[f"{key}_promptq_client_rps"] = round(med([r.client_rps for r in s.promptq]), 1)
        out[f"{key}_ratio"] = round(pq / base, 3)
    c = scenarios["c"]
    out["c_promptq_wall_s"] = round(med([r.wall_s for r in c.promptq]), 3)
    out["c_promptq_client_wall_s"] = round(med([c.n / r.client_rps for r in c.promptq]), 3)
    out["c_baseline_wall_s"] = round(med([r.wall_s for r in c.baseline]), 3)
    out["d_worker_cpu_us_per_req"] = round(costs.worker_us, 1)
    out["d_redis_cpu_us_per_req"] = round(costs.redis_us, 1)
    out["d_producer_cpu_us_per_req"] = round(costs.producer_us, 1)
    out["d_baseline_cpu_us_per_req"] = round(costs.baseline_us, 1)
    out["d_redis_bytes_per_queued_req"] = round(costs.memory_bytes, 1)
    out["reps"] = scenarios["a"].reps
    out["concurrency"] = scenarios["a"].concurrency
    out["workers"] = WORKERS
    out["cpus"] = os.cpu_count()
    out["unclean_worker_exits"] = sum(
        " exit 0 " not in f"{line} " for s in scenarios.values() for line in s.shutdown
    )
    out["total_s"] = round(total_s, 1)
    return out


# -- main ---------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/9")
    parser.add_argument("--quick", action="store_true", help="smoke run: R=1, small batches")
    parser.add_argument("--reps", type=int, help="repetitions per scenario (default 3)")
    parser.add_argument("--n-cpu", type=int, help="prompts in scenario b (default 20,000)")
    return parser.parse_args(argv)


async def main(args: argparse.Namespace) -> dict[str, Any]:
    started = time.monotonic()
    quick: bool = args.quick
    reps: int = args.reps or (1 if quick else 3)
    concurrency = 500
    n_cpu: int = args.n_cpu or (2_000 if quick else 20_000)
    scenarios = {
        "a": Scenario("a", "200 ms latency", 200, 1_000 if quick else 5_000, concurrency, reps),
        "b": Scenario("b", "0 ms latency", 0, n_cpu, concurrency, reps),
        "c": Scenario("c", "200 ms latency, small batch", 200, 100, concurrency, 1 if quick else 5),
    }
    memory_n = 2_000 if quick else 10_000
    mocks: dict[float, MockProcess] = {}
    redis = aioredis.Redis.from_url(args.redis_url)
    logs: list[str] = []
    try:
        await redis.ping()
        for latency in sorted({s.latency_ms for s in scenarios.values()}):
            mocks[latency] = MockProcess(latency)
            mocks[latency].spawn()
            await mocks[latency].wait_ready()
        async with aiohttp.ClientSession() as session:
            for s in scenarios.values():
                console.print(
                    f"[bold]scenario {s.key}[/bold]: {s.title}, {s.n:,} prompts, "
                    f"concurrency {s.concurrency} ({WORKERS} x {s.concurrency // WORKERS}), "
                    f"{s.reps} rep(s)"
                )
                await run_scenario(
                    s, mock=mocks[s.latency_ms], redis=redis, redis_url=args.redis_url,
                    session=session,
                )  # fmt: skip
                if s.worker_log:
                    logs.append(f"scenario {s.key}:\n{s.worker_log}")
                console.print(
                    f"  done in {s.seconds:.1f}s (accept overflows during the promptq warm-up: "
                    f"{s.warm_up_overflows}); workers on SIGTERM:"
                )
                for line in s.shutdown:
                    style = "" if " exit 0 " in f"{line} " else "[red]"
                    console.print(f"    {style}{escape(line)}", highlight=False)
                if s.stale_heartbeats:
                    console.print(
                        f"    [red]{s.stale_heartbeats} worker(s) still registered in "
                        f"{keys.WORKERS} after shutdown[/red]"
                    )
        console.print("[bold]scenario d[/bold]: Redis memory per queued request")
        memory = await measure_queue_memory(redis, args.redis_url, memory_n)
    finally:
        for mock in mocks.values():
            mock.stop()
            if text := mock.log.text().strip():
                logs.append(f"{mock.log.label}:\n{text}")
            mock.log.close()
        with contextlib.suppress(Exception):
            await flush(redis)
        await redis.aclose()

    costs = costs_from(scenarios["b"], memory, memory_n)
    console.print()
    console.print(throughput_table([scenarios["a"], scenarios["b"]]))
    console.print(latency_table(scenarios["c"]))
    console.print(cost_table(costs, scenarios["b"]))
    if logs:
        console.print("[yellow]stderr of child processes:[/yellow]")
        for text in logs:
            console.print(text[:4000], markup=False, highlight=False)
    result = summary(scenarios, costs, time.monotonic() - started)
    print(json.dumps(result, sort_keys=False))
    return result


if __name__ == "__main__":
    asyncio.run(main(parse_args()))
