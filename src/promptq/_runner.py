"""What ``promptq demo``, ``run``, ``results``, ``watch`` and ``workers`` do, behind the CLI."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator, Mapping
from pathlib import Path
from typing import Any

import orjson

from promptq import _checkpoint
from promptq import _display as display
from promptq._outputs import STDIO, InOrder, ResultFiles, check_writable
from promptq.embedded import local_cluster
from promptq.producer import Batch, Producer, parse_file
from promptq.producer.parsing import Requests, SpooledBatch, spool_jsonl
from promptq.shared.connection import connect
from promptq.shared.errors import BatchNotFound
from promptq.shared.models import BatchInfo
from promptq.shared.prices import BUILT_IN
from promptq.shared.registry import WorkerRegistry
from promptq.shared.settings import Settings, redact_url
from promptq.shared.status import Status

logger = logging.getLogger(__name__)

#: how long `run` lets its worker processes drain before killing them
WORKER_STOP_S = 15.0

ORDERS = ("completion", "input")


def read_input(path: Path, *, settings: Settings) -> SpooledBatch:
    """Validate a JSONL file line by line into a spool (``-``: standard input)."""
    if str(path) != STDIO:
        return parse_file(path, settings=settings)
    return spool_jsonl(
        sys.stdin.buffer,
        source="<stdin>",
        default_model=settings.model,
        max_lines=settings.max_lines,
        max_bytes=settings.max_file_bytes,
    )


#: how often a progress bar reads the batch's spend so far
COST_REFRESH_S = 1.0


async def follow(
    batch: Batch,
    files: ResultFiles | None,
    *,
    total: int,
    label: str,
    order: InOrder | None = None,
) -> tuple[int, int, float]:
    """Stream a batch's results with a progress bar; returns (ok, failed, sum latency s).
    With ``order``, lines are written in input order (each waits for those before it)."""
    ok = failed = retries = 0
    latency_s = 0.0
    cost: float | None = None
    cost_read = 0.0
    with display.batch_progress(label, total=total) as bar:
        async for raw in batch.as_completed_raw():
            if time.monotonic() - cost_read >= COST_REFRESH_S:  # the spend so far
                cost_read = time.monotonic()
                cost = await batch.spent_usd()
            result = orjson.loads(raw)
            if result.get("error") is None:
                ok += 1
            else:
                failed += 1
            retries += max(int(result.get("attempts") or 0) - 1, 0)
            latency_s += float(result.get("latency_ms") or 0) / 1000
            if files is not None:
                for line in [raw] if order is None else order.add(result["custom_id"], raw):
                    files.write(line)
                files.flush()  # the file is the checkpoint: whole lines, as they come
            bar.update(done=ok + failed, total=total, failed=failed, retries=retries, cost_usd=cost)
        if ok + failed:  # the final spend, as the stats table will say it
            cost = await batch.spent_usd()
            bar.update(done=ok + failed, total=total, failed=failed, retries=retries, cost_usd=cost)
    if files is not None and order is not None:
        for line in order.rest():
            files.write(line)
    return ok, failed, latency_s


class _InjectedFaults(logging.Filter):
    """The demo's mock injects 429s and 500s on purpose: say so where promptq logs them."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.WARNING:
            record.msg = f"{record.msg} (a fault the demo's mock injects on purpose)"
        return True


async def run_demo(
    settings: Settings,
    *,
    n: int,
    latency_ms: float,
    jitter_ms: float,
    error_rate: float,
    rate_429: float,
    workers: int,
) -> None:
    from promptq.mock import MockConfig, MockServer

    config = MockConfig(
        latency_ms=latency_ms, jitter_ms=jitter_ms, error_rate=error_rate, rate_429=rate_429
    )
    injected = _InjectedFaults()
    limiter_log = logging.getLogger("promptq.shared.ratelimit")
    limiter_log.addFilter(injected)
    try:
        with _demo_prices(settings) as priced:
            async with MockServer(config) as mock:
                await _demo(priced, mock, n=n, workers=workers, config=config)
    finally:
        limiter_log.removeFilter(injected)


#: the demo prices its mock model as this one, to show cost in dollars
DEMO_PRICED_AS = "gpt-4o-mini"


@contextlib.contextmanager
def _demo_prices(settings: Settings) -> Iterator[Settings]:
    """The demo's settings with a price for the mock's model (a file the workers read,
    gone afterwards); a PROMPTQ_PRICES of the user's own is left as it is."""
    if settings.prices:
        yield settings
        return
    price = BUILT_IN[DEMO_PRICED_AS]
    entry = {"input_per_1m": price.input_per_1m, "output_per_1m": price.output_per_1m}
    with tempfile.TemporaryDirectory(prefix="promptq-demo-") as tmp:
        path = Path(tmp) / "prices.json"
        path.write_bytes(orjson.dumps({"mock-gpt": entry}))
        yield settings.model_copy(update={"prices": str(path)})


async def _demo(settings: Settings, mock: Any, *, n: int, workers: int, config: Any) -> None:
    settings = settings.model_copy(update={"upstream_url": mock.url, "model": "mock-gpt"})
    where = redact_url(settings.redis_url) if settings.redis_url else "embedded in-process Redis"
    display.err_console.print(
        f"[bold]promptq demo[/bold]: {n:,} prompts -> mock upstream at {mock.url} "
        f"({config.latency_ms:g} ms + up to {config.jitter_ms:g} ms jitter; it injects "
        f"{config.error_rate:.0%} 500s and {config.rate_429:.0%} 429s on purpose, to show "
        f"retries)\n{workers} worker(s) x {settings.concurrency} slots, queue: {where}",
        highlight=False,
    )
    prompts = [
        {"custom_id": f"demo-{i}", "prompt": f"Write a haiku about the number {i}."}
        for i in range(n)
    ]
    async with local_cluster(settings, workers=workers) as producer:
        batch = await producer.submit(prompts)
        _, _, latency_s = await follow(batch, None, total=n, label="demo")
        stats = await batch.wait()
        sample = sorted(
            [r async for r in batch.results() if r.ok],
            key=lambda r: int(r.custom_id.rpartition("-")[2]),
        )[:3]
    display.out_console.print(display.stats_table(stats, title=f"Statistics of {batch.id}"))
    for result in sample:
        display.out_console.print(f"  {result.custom_id}: {result.content!r}", highlight=False)
    speedup = latency_s / stats.wall_s if stats.wall_s else 0.0
    display.out_console.print(
        f"\nOne request at a time this would take about [bold]{latency_s:,.1f} s[/bold] "
        f"(the sum of the latencies); promptq took [bold]{stats.wall_s:,.2f} s[/bold]: "
        f"[bold green]{speedup:,.0f}x faster[/bold green]. "
        f"The upstream saw {mock.stats.requests:,} calls for {n:,} prompts "
        "(the rest were retries).",
        highlight=False,
    )
    if stats.cost_usd is not None:
        display.out_console.print(
            f"Cost: [bold]{display.usd(stats.cost_usd)}[/bold] (the mock's model priced as "
            f"{DEMO_PRICED_AS}); through the provider's Batch API (--route batch-api, results "
            f"within 24 h) the same tokens would cost about {display.usd(stats.cost_usd / 2)}.",
            highlight=False,
        )


def _worker_env(settings: Settings) -> dict[str, str]:
    env = dict(os.environ)
    for name, value in settings.model_dump(exclude={"api_key", "api_token"}).items():
        if value is not None:
            env[f"PROMPTQ_{name.upper()}"] = str(value)
    if settings.api_key is not None:
        env["PROMPTQ_API_KEY"] = settings.api_key.get_secret_value()
    return env


@contextlib.asynccontextmanager
async def worker_processes(settings: Settings, count: int) -> AsyncIterator[None]:
    """Start ``count`` ``promptq worker`` processes; SIGTERM them (graceful) on exit."""
    procs = [
        await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "promptq",
            "--log-level",
            "WARNING",
            "worker",
            env=_worker_env(settings),
            stdin=asyncio.subprocess.DEVNULL,
        )
        for _ in range(count)
    ]
    try:
        yield
    finally:
        for proc in procs:
            if proc.returncode is None:
                proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                await asyncio.wait_for(proc.wait(), WORKER_STOP_S)
            except TimeoutError:
                proc.kill()
                await proc.wait()


async def _wait_for_workers(producer: Producer, settings: Settings, count: int) -> None:
    """Wait until ``count`` workers beat (so the batch is shared by all of them at once)."""
    registry = WorkerRegistry(producer.redis, heartbeat_s=settings.heartbeat_s)
    deadline = time.monotonic() + 30
    with display.err_console.status(f"starting {count} worker process(es)..."):
        while time.monotonic() < deadline:
            if await registry.count_live() >= count:
                return
            await asyncio.sleep(0.05)
    logger.warning("workers did not report within 30 s; enqueueing anyway")


async def run_batch(
    settings: Settings,
    *,
    input_path: Path,
    output: Path,
    errors_out: Path,
    workers: int,
    batch_id: str | None,
    policy: Mapping[str, Any] | None = None,
    order: str = "completion",
    restart: bool = False,
) -> int:
    """Validate, enqueue, process and write one batch; return the number of failures.
    ``policy``: the batch's options of ``Producer.submit`` (priority, max_failure_rate,
    route, deadline_s, max_cost_usd, cache_ttl_s).

    With Redis and a ``batch_id`` that exists (a run that crashed, same input), the
    batch is resumed: nothing is enqueued twice, and every result, those finished
    before included, is written. Other requests under that id: ``BatchError``.
    In the embedded mode the output files are the checkpoint (``_checkpoint``).
    """
    check_writable(output, option="-o")
    check_writable(errors_out, option="--errors-out")
    with read_input(input_path, settings=settings) as spooled:  # bad input: exit, no setup
        return await _run_checkpointed(
            settings,
            spooled,
            input_path=input_path,
            output=output,
            errors_out=errors_out,
            workers=workers,
            batch_id=batch_id,
            policy=dict(policy or {}),
            order=order,
            restart=restart,
        )


async def _run_checkpointed(
    settings: Settings,
    parsed: SpooledBatch,
    *,
    input_path: Path,
    output: Path,
    errors_out: Path,
    workers: int,
    batch_id: str | None,
    policy: Mapping[str, Any],
    order: str,
    restart: bool,
) -> int:
    total = parsed.total
    embedded = settings.redis_url is None
    if embedded and str(output) != STDIO:
        taken = _checkpoint.take_up(parsed, output=output, source=str(input_path), restart=restart)
        if taken.resumed:
            if not taken.todo.total:
                with ResultFiles(output, errors_out, append=True):
                    pass
                display.err_console.print(
                    f"nothing to send: all {total:,} requests already have a result in "
                    f"{output} (--restart runs them again)"
                )
                return 0
            display.err_console.print(
                f"resuming: {taken.done:,} of {total:,} requests already have a result in "
                f"{output}; sending the other {taken.todo.total:,}"
            )
            with taken.todo as todo:
                return await _interruptible(
                    settings, todo, output=output, errors_out=errors_out, workers=workers,
                    batch_id=batch_id, policy=policy,
                    order=order, append=True,
                )  # fmt: skip
    return await _interruptible(
        settings, parsed, output=output, errors_out=errors_out, workers=workers,
        batch_id=batch_id, policy=policy,
        order=order, append=False,
    )  # fmt: skip


async def _interruptible(
    settings: Settings,
    parsed: Requests,
    *,
    output: Path,
    errors_out: Path,
    workers: int,
    batch_id: str | None,
    policy: Mapping[str, Any],
    order: str,
    append: bool,
) -> int:
    """``_run``, saying at Ctrl-C how to resume."""
    embedded = settings.redis_url is None
    try:
        return await _run(
            settings,
            parsed,
            output=output,
            errors_out=errors_out,
            workers=workers,
            batch_id=batch_id,
            policy=policy,
            order=order,
            append=append,
        )
    except asyncio.CancelledError:
        if embedded and str(output) != STDIO:
            hint = (
                f"run the same command again to send only the requests without a result in {output}"
            )
        elif batch_id is not None:
            hint = "run the same command again to pick the batch up where it is"
        else:
            hint = (
                "the batch goes on in Redis: follow it with `promptq watch ID`, or add "
                "--batch-id to make a run resumable"
            )
        display.err_console.print(f"[yellow]interrupted:[/yellow] {hint}", highlight=False)
        raise


async def _run(
    settings: Settings,
    parsed: Requests,
    *,
    output: Path,
    errors_out: Path,
    workers: int,
    batch_id: str | None,
    policy: Mapping[str, Any],
    order: str,
    append: bool,
) -> int:
    total = parsed.total
    async with contextlib.AsyncExitStack() as stack:
        if settings.redis_url is None:
            producer = await stack.enter_async_context(
                local_cluster(settings, workers=max(workers, 1))
            )
            mode = f"embedded, {max(workers, 1)} in-process worker(s)"
        else:
            producer = await stack.enter_async_context(
                Producer.from_url(settings.redis_url, settings=settings)
            )
            if workers > 0:
                await stack.enter_async_context(worker_processes(settings, workers))
                await _wait_for_workers(producer, settings, workers)
            mode = f"Redis {redact_url(settings.redis_url)}, {workers} local worker process(es)"
        # Resuming needs a Redis that outlived the crash; in embedded mode the id just
        # names a new batch.
        resume = batch_id is not None and settings.redis_url is not None
        before = None
        if resume:
            with contextlib.suppress(BatchNotFound):
                before = await producer.batch(str(batch_id)).info(with_stats=False)
        batch = await producer.submit(
            parsed,
            batch_id=batch_id,
            resume=resume,
            **policy,
        )
        if before is not None and before.status is not Status.VALIDATING:
            display.err_console.print(
                f"batch {batch.id}: resuming it ({before.status.value}), {before.done:,} of "
                f"{total:,} requests already done; nothing is sent twice ({mode})"
            )
        else:
            display.err_console.print(f"batch {batch.id}: {total:,} requests ({mode})")
        in_order = InOrder(parsed.ids()) if order == "input" else None
        with ResultFiles(output, errors_out, append=append) as files:
            await follow(batch, files, total=total, label=batch.id[:20], order=in_order)
        stats = await batch.wait()
        final = await batch.info(with_stats=False)
    # results on standard output: keep it for them
    tables = display.err_console if str(output) == STDIO else display.out_console
    tables.print(display.stats_table(stats, title=f"Statistics of {batch.id}"))
    if final.reason:
        display.err_console.print(f"[red]batch {final.status.value}:[/red] {final.reason}")
    display.err_console.print(
        f"{files.ok:,} succeeded -> {output}; {files.failed:,} failed -> {errors_out}"
    )
    return files.failed


def batch_exit_code(info: BatchInfo) -> int:
    """``status`` / ``watch``: 1 for a batch that failed or has failed requests, else 0."""
    return 1 if info.status is Status.FAILED or info.failed else 0


async def watch_batch(settings: Settings, batch_id: str) -> int:
    """A live bar until the batch ends; returns the exit code (``batch_exit_code``)."""
    async with Producer.from_url(settings.redis_url_or_default, settings=settings) as producer:
        batch = producer.batch(batch_id)
        info = await batch.info()
        seconds, micros = await producer.redis.time()
        offset_s = seconds + micros / 1e6 - time.time()  # Redis' clock, which stamps batches
        with display.batch_progress(batch_id[:20], total=info.total) as bar:
            while True:
                started = info.in_progress_at or info.created_at
                elapsed = time.time() + offset_s - started if started else None
                if info.status.terminal and info.completed_at and started:
                    elapsed = info.completed_at - started
                bar.update(
                    done=info.done,
                    total=info.total,
                    failed=info.failed,
                    retries=info.retries,
                    elapsed_s=elapsed,
                    cost_usd=info.cost_usd,
                )
                if info.status.terminal:
                    break
                await asyncio.sleep(0.25)  # screen refresh rate
                info = await batch.info()
    display.out_console.print(display.batch_table(info))
    if info.stats:
        display.out_console.print(display.stats_table(info.stats))
    return batch_exit_code(info)


async def export_results(
    settings: Settings,
    batch_id: str,
    *,
    output: Path,
    errors_out: Path,
    follow_batch: bool,
    order: str,
) -> None:
    """``promptq results``: write a batch's lines (now, or as they finish)."""
    check_writable(output, option="-o")
    check_writable(errors_out, option="--errors-out")
    async with Producer.from_url(settings.redis_url_or_default, settings=settings) as p:
        batch = p.batch(batch_id)
        info = await batch.info(with_stats=False)
        with ResultFiles(output, errors_out) as files:
            if order == "input" and not follow_batch:
                async for raw in batch.results_in_input_order():
                    files.write(raw)
            elif order == "input":
                ids = [cid async for cid in batch.input_order()]
                await follow(batch, files, total=info.total, label=batch_id[:20],
                             order=InOrder(ids))  # fmt: skip
            elif follow_batch:
                await follow(batch, files, total=info.total, label=batch_id[:20])
            else:
                async for raw in batch.raw_results():
                    files.write(raw)
        if not follow_batch and not info.status.terminal:
            display.err_console.print(
                f"[yellow]batch is {info.status.value}:[/yellow] wrote the "
                f"{files.written:,} result(s) so far of {info.total:,}; "
                "use --follow to wait for the rest"
            )
    display.err_console.print(
        f"{files.ok:,} succeeded -> {output}, {files.failed:,} failed -> {errors_out}"
    )


async def list_workers(settings: Settings) -> tuple[list[dict[str, Any]], float]:
    """Live workers (typed heartbeats) and Redis' clock now."""
    redis = await connect(settings.redis_url_or_default, wait_s=settings.redis_connect_wait_s)
    try:
        workers = await WorkerRegistry(redis, heartbeat_s=settings.heartbeat_s).live()
        seconds, micros = await redis.time()
        return workers, seconds + micros / 1e6
    finally:
        await redis.aclose()
