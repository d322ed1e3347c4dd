"""The ``promptq`` command.

Configuration comes from ``PROMPTQ_*`` environment variables (see ``promptq --help``);
flags override them. Exit codes: 0 success; 1 the batch finished with failed requests
(``run``, ``watch``, ``status``) or an operational error (Redis unreachable); 2 bad
input or usage, with a message that names the file, line and field (or the flag).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import sys
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

import click
import orjson
from pydantic import ValidationError

from promptq import _display as display
from promptq._outputs import default_errors_path
from promptq.mock._flavours import FLAVOURS
from promptq.shared.errors import (
    BatchError,
    BatchNotFound,
    ConfigError,
    InputError,
    PromptqError,
    QueueFull,
    RedisUnavailable,
)
from promptq.shared.results import REALTIME
from promptq.shared.routes import ROUTES, parse_duration
from promptq.shared.settings import Settings

T = TypeVar("T")

EXIT_FAILED_REQUESTS = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

CONFIG_HELP = """
\b
Configuration (environment; flags override):
  PROMPTQ_REDIS_URL      redis:// or rediss:// URL; unset = embedded mode for run/demo,
                         redis://localhost:6379 for worker/submit/status/...
  PROMPTQ_UPSTREAM_URL   OpenAI-compatible base URL ending in /v1 (default OpenAI)
  PROMPTQ_API_KEY        upstream key (falls back to OPENAI_API_KEY); workers only
  PROMPTQ_MODEL          model when a request names none (default gpt-4o-mini)
  PROMPTQ_CONCURRENCY    in-flight upstream requests per worker process (default 64)
  PROMPTQ_MAX_ATTEMPTS   attempts per request, first included (default 5)
  PROMPTQ_TIMEOUT_S      per-attempt upstream timeout in seconds (default 60)
  PROMPTQ_BACKEND        openai (default) or python:MODULE:FUNCTION (workers)
\b
Exit codes: 0 success; 1 failed requests (run, watch, status) or Redis unreachable;
2 bad input or usage; 130 interrupted.
"""

#: commands whose log lines go above a live progress bar (the others log plain lines)
_INTERACTIVE = frozenset({"demo", "run", "watch", "results"})


def _fail(message: str, code: int) -> None:
    display.err_console.print(f"[red]error:[/red] {message}", highlight=False, soft_wrap=True)
    sys.exit(code)


def _run_async(fn: Callable[..., Coroutine[Any, Any, T]]) -> Callable[..., T | None]:
    """Run an async command; turn promptq errors into messages and exit codes."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> T | None:
        try:
            return asyncio.run(fn(*args, **kwargs))
        except InputError as exc:
            display.err_console.print(exc.render(limit=50), highlight=False, markup=False)
            sys.exit(EXIT_USAGE)
        except (BatchNotFound, BatchError, QueueFull, ConfigError) as exc:
            _fail(str(exc), EXIT_USAGE)
        except RedisUnavailable as exc:
            _fail(str(exc), 1)
        except PromptqError as exc:
            _fail(str(exc), 1)
        except KeyboardInterrupt:
            _fail("interrupted", EXIT_INTERRUPTED)
        return None

    return wrapper


def _flag(field: str) -> str:
    return "--" + field.replace("_", "-")


def _settings(ctx: click.Context, **overrides: Any) -> Settings:
    """Settings from the environment, with the flags given (``None``: not given) on top.
    A bad value is a usage error that names the flag, or the variable it came from."""
    given = {k: v for k, v in overrides.items() if v is not None}
    merged = {**ctx.obj, **given}
    try:
        return Settings(**merged)
    except ValidationError as exc:
        problems = []
        for e in exc.errors():
            field = str(e["loc"][0]) if e["loc"] else ""
            where = _flag(field) if field in merged else f"PROMPTQ_{field.upper()}"
            problems.append(f"{where}: {e['msg']}")
        _fail(f"invalid configuration: {'; '.join(problems)}", EXIT_USAGE)
        raise AssertionError("unreachable") from exc


def _redis_option(command: Callable[..., Any]) -> Callable[..., Any]:
    """--redis-url on a command (also accepted before the command name)."""
    return click.option(
        "--redis-url", metavar="URL", help="Redis URL (overrides PROMPTQ_REDIS_URL)."
    )(command)


def _result_files_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """-o/--output, --errors-out and --order, shared by the commands that write results."""
    command = click.option(
        "--order",
        type=click.Choice(["completion", "input"]),
        default="completion",
        show_default=True,
        help="Line order: as requests finished, or as they were in the input.",
    )(command)
    command = click.option(
        "--errors-out",
        type=click.Path(dir_okay=False, allow_dash=True, path_type=Path),
        help="Where failed result lines go [default: OUTPUT with .errors.jsonl; with -o -, "
        "standard output too].",
    )(command)
    return click.option(
        "-o",
        "--output",
        required=True,
        type=click.Path(dir_okay=False, allow_dash=True, path_type=Path),
        help="Where successful result lines go (JSONL; - for standard output).",
    )(command)


def _duration(ctx: click.Context, param: click.Parameter, value: str | None) -> float | None:
    """45s, 30m, 2h, 1d (a bare number: seconds) -> seconds."""
    if value is None:
        return None
    try:
        return parse_duration(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc), ctx=ctx, param=param) from exc


#: --cache without a value keeps answers this long
DEFAULT_CACHE_TTL = "1d"


def _policy(options: dict[str, Any]) -> dict[str, Any]:
    """The batch options of ``Producer.submit`` from the policy flags (popped)."""
    from promptq.producer.producer import route_options

    cache = options.pop("cache", None)
    policy = {
        "priority": options.pop("priority"),
        "max_failure_rate": options.pop("max_failure_rate"),
        "route": options.pop("route"),
        "deadline_s": options.pop("deadline"),
        "max_cost_usd": options.pop("max_cost_usd"),
        "cache_ttl_s": None if cache is None else max(int(cache), 1),
        "webhook_url": options.pop("webhook_url"),
    }
    try:  # before anything starts
        route_options(
            **{k: v for k, v in policy.items() if k not in ("priority", "max_failure_rate")}
        )
    except InputError as exc:
        raise click.UsageError("; ".join(f"{exc.source}: {e.message}" for e in exc.errors)) from exc
    return policy


def _batch_policy_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """--priority, --max-failure-rate, --route, --deadline, --max-cost-usd and --cache,
    shared by the commands that submit batches."""
    command = click.option(
        "--webhook-url",
        metavar="URL",
        help="POST a signed batch.completed|failed|cancelled event here when the batch "
        "ends (Standard Webhooks; retried for about two hours; instead of the workers' "
        "PROMPTQ_WEBHOOK_URL; its host must be one PROMPTQ_WEBHOOK_HOSTS allows, if set).",
    )(command)
    command = click.option(
        "--cache",
        callback=_duration,
        is_flag=False,
        flag_value=DEFAULT_CACHE_TTL,
        default=None,
        metavar="[TTL]",
        help="Answer a request identical (endpoint + body) to one answered within TTL "
        f"(45s, 30m, 2h, 1d; alone: {DEFAULT_CACHE_TTL}) from Redis, without an upstream "
        "call. Off by default: with temperature > 0, identical requests are meant to differ.",
    )(command)
    command = click.option(
        "--max-cost-usd",
        type=click.FloatRange(min=0, min_open=True),
        help="Stop the batch (code budget_exceeded) once its spend reaches this many "
        "dollars (from usage and the price table; PROMPTQ_PRICES).",
    )(command)
    command = click.option(
        "--deadline",
        callback=_duration,
        metavar="DURATION",
        help="With --route batch-api: requests without a result after this long (45s, 30m, "
        "2h, 1d), or whose provider batch failed or expired, go through the realtime lane.",
    )(command)
    command = click.option(
        "--route",
        type=click.Choice(list(ROUTES)),
        default=REALTIME,
        show_default=True,
        help="realtime: one upstream request per line. batch-api: through the upstream's "
        "own Batch API (about half price, results within 24 h).",
    )(command)
    command = click.option(
        "--max-failure-rate",
        type=click.FloatRange(0, 1, max_open=True),
        help="Stop the batch (status failed) once more than this fraction of its finished "
        "requests failed, after 20 of them.",
    )(command)
    return click.option(
        "--priority",
        type=click.Choice(["urgent", "bulk"]),
        default="bulk",
        show_default=True,
        help="Lane of the batch: urgent overtakes queued bulk work.",
    )(command)


def _input_argument(command: Callable[..., Any]) -> Callable[..., Any]:
    return click.argument(
        "input_path",
        metavar="INPUT",
        type=click.Path(dir_okay=False, allow_dash=True, path_type=Path),
    )(command)


def _setup_logging(level: str, *, interactive: bool) -> None:
    if interactive:
        from rich.logging import RichHandler

        # above the live progress bar, not through it
        handler: logging.Handler = RichHandler(
            console=display.err_console, show_time=False, show_path=False, markup=False
        )
        logging.basicConfig(level=level, format="%(message)s", handlers=[handler])
    else:
        logging.basicConfig(
            level=level,
            format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
            stream=sys.stderr,
        )
    if level != "DEBUG":
        # arq logs every job start and end at INFO
        logging.getLogger("arq").setLevel(logging.WARNING)


@click.group(epilog=CONFIG_HELP, context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--redis-url", metavar="URL", help="Redis URL (overrides PROMPTQ_REDIS_URL).", default=None
)
@click.option(
    "--log-level",
    type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False),
    default=None,
    help="Log verbosity, to stderr [default: INFO for worker, serve and mock-llm, WARNING "
    "otherwise].",
)
@click.version_option(package_name="promptq")
@click.pass_context
def main(ctx: click.Context, redis_url: str | None, log_level: str | None) -> None:
    """promptq: run many LLM requests at once through Redis and arq workers.

    Start with `promptq demo`. Typical use: `promptq worker` on each machine,
    `promptq submit prompts.jsonl`, then `promptq watch ID` and `promptq results ID -o out.jsonl`;
    or everything in one step with `promptq run prompts.jsonl -o out.jsonl`.
    """
    command = ctx.invoked_subcommand
    if log_level is None:
        log_level = "INFO" if command in ("worker", "serve", "mock-llm") else "WARNING"
    live = command in _INTERACTIVE and sys.stderr.isatty()
    _setup_logging(log_level.upper(), interactive=live)
    ctx.obj = {"redis_url": redis_url} if redis_url else {}


# -- demo and run ----------------------------------------------------------------------


@main.command()
@click.option(
    "-n", "--requests", "n", type=click.IntRange(min=1), default=300, show_default=True,
    help="Prompts to run.",
)  # fmt: skip
@click.option(
    "--latency-ms", type=click.FloatRange(min=0), default=300.0, show_default=True,
    help="Mock upstream latency per request.",
)  # fmt: skip
@click.option(
    "--jitter-ms", type=click.FloatRange(min=0), default=200.0, show_default=True,
    help="Plus uniform(0, jitter).",
)  # fmt: skip
@click.option(
    "--error-rate", type=click.FloatRange(0, 1), default=0.03, show_default=True,
    help="Fraction of 500s the mock injects.",
)  # fmt: skip
@click.option(
    "--rate-429", type=click.FloatRange(0, 1), default=0.03, show_default=True,
    help="Fraction of 429s the mock injects.",
)  # fmt: skip
@click.option(
    "--workers", type=click.IntRange(min=1), default=2, show_default=True,
    help="In-process workers.",
)  # fmt: skip
@click.option("--concurrency", type=int, help="Slots per worker (PROMPTQ_CONCURRENCY).")
@_redis_option
@click.pass_context
def demo(ctx: click.Context, /, n: int, latency_ms: float, jitter_ms: float, **opts: Any) -> None:
    """Zero-setup showcase: mock upstream + queue + workers in one process.

    Runs N prompts through the whole pipeline (with some injected 429s and 500s to show
    retries), prints live progress, the stats table, and what concurrency bought
    compared with sending the same requests one at a time. Uses PROMPTQ_REDIS_URL if set
    (watch it with redis-cli), else an embedded in-process Redis.
    """
    from promptq._runner import run_demo

    settings = _settings(ctx, concurrency=opts.pop("concurrency"), redis_url=opts.pop("redis_url"))
    _run_async(run_demo)(settings, n=n, latency_ms=latency_ms, jitter_ms=jitter_ms, **opts)


@main.command()
@_input_argument
@_result_files_options
@click.option(
    "--workers", type=click.IntRange(min=0), default=2, show_default=True,
    help="Local worker processes to start (with PROMPTQ_REDIS_URL; 0 = use running workers). "
    "In embedded mode: in-process workers.",
)  # fmt: skip
@click.option(
    "--batch-id",
    help="Batch id (default: generated). With PROMPTQ_REDIS_URL, an existing batch with "
    "this id and the same input is resumed (after a crash): nothing is sent twice.",
)
@click.option(
    "--restart",
    is_flag=True,
    help="Embedded mode: ignore the results already in OUTPUT and run every request again "
    "(by default a run of the same input to the same OUTPUT sends only what has no result).",
)
@_batch_policy_options
@click.option("--concurrency", type=int, help="Slots per worker (PROMPTQ_CONCURRENCY).")
@click.option("--upstream-url", help="Upstream base URL (PROMPTQ_UPSTREAM_URL).")
@click.option("--model", help="Default model (PROMPTQ_MODEL).")
@click.option("--backend", metavar="SPEC", help="Workers' backend (PROMPTQ_BACKEND).")
@_redis_option
@click.pass_context
def run(
    ctx: click.Context,
    /,
    input_path: Path,
    output: Path,
    errors_out: Path | None,
    order: str,
    workers: int,
    batch_id: str | None,
    restart: bool,
    **overrides: Any,
) -> None:
    """Run one batch end to end: validate, enqueue, process, write results.

    INPUT is a JSONL file (- for standard input). Exits 0 when every request succeeded,
    1 when some failed (they are in the errors file), 2 on bad input (nothing is
    enqueued), 130 when interrupted (then it says how to resume).
    """
    from promptq._runner import run_batch

    policy = _policy(overrides)
    settings = _settings(ctx, **overrides)
    failed = _run_async(run_batch)(
        settings,
        input_path=input_path,
        output=output,
        errors_out=errors_out or default_errors_path(output),
        workers=workers,
        batch_id=batch_id,
        policy=policy,
        order=order,
        restart=restart,
    )
    sys.exit(EXIT_FAILED_REQUESTS if failed else 0)


# -- distributed commands --------------------------------------------------------------


@main.command()
@_input_argument
@click.option("--batch-id", help="Batch id (default: generated). Letters, digits, _ and -.")
@_batch_policy_options
@_redis_option
@click.pass_context
def submit(
    ctx: click.Context,
    /,
    input_path: Path,
    batch_id: str | None,
    redis_url: str | None,
    **options: Any,
) -> None:
    """Validate INPUT (- for standard input) and enqueue it; print the batch id (only the
    id) on stdout."""
    from promptq._runner import read_input
    from promptq.producer import Producer

    settings = _settings(ctx, redis_url=redis_url)
    policy = _policy(options)

    async def go() -> None:
        with read_input(input_path, settings=settings) as parsed:  # before touching Redis
            async with Producer.from_url(settings.redis_url_or_default, settings=settings) as p:
                batch = await p.submit(parsed, batch_id=batch_id, **policy)
        print(batch.id)

    _run_async(go)()


@main.command()
@click.option("--concurrency", type=int, help="Max in-flight requests (PROMPTQ_CONCURRENCY, 64).")
@click.option("--burst", is_flag=True, help="Exit once the queues are empty and work is done.")
@click.option("--upstream-url", help="Upstream base URL (PROMPTQ_UPSTREAM_URL).")
@click.option(
    "--backend",
    metavar="SPEC",
    help="What to do with a request (PROMPTQ_BACKEND): 'openai' (default: HTTP to the "
    "upstream) or 'python:MODULE:FUNCTION' (call FUNCTION(endpoint, body) -> dict).",
)
@click.option(
    "--backend-threads",
    type=int,
    help="python: backend, plain def: run it in a pool of N threads (default 1).",
)
@click.option(
    "--backend-processes",
    type=int,
    help="python: backend, plain def: run it in a pool of N processes instead "
    "(CPU-bound code that holds the GIL).",
)
@_redis_option
@click.pass_context
def worker(ctx: click.Context, /, burst: bool, **overrides: Any) -> None:
    """Run one worker process until SIGINT/SIGTERM.

    On shutdown it stops taking work, lets in-flight requests finish for up to
    PROMPTQ_SHUTDOWN_GRACE_S (10 s; a second signal cuts it short), and hands the rest
    back to the queue. Start as many as you like, on any machine.
    """
    from promptq.shared.runtime import settle_heap
    from promptq.worker import backends, run_worker

    settings = _settings(ctx, **overrides)
    try:
        backends.load(settings)  # a backend that cannot load is a usage error, now
    except ConfigError as exc:
        _fail(str(exc), EXIT_USAGE)
    try:
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    except ImportError:  # pragma: no cover - optional speed-up
        pass
    settle_heap()  # everything is imported: keep it out of the collector's way
    try:
        asyncio.run(run_worker(settings, burst=burst))
    except RedisUnavailable as exc:
        _fail(str(exc), 1)
    except ConfigError as exc:
        _fail(str(exc), EXIT_USAGE)


@main.command()
@click.argument("batch_id")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object (for scripts).")
@_redis_option
@click.pass_context
def status(ctx: click.Context, batch_id: str, as_json: bool, redis_url: str | None) -> None:
    """Counts and statistics of a batch.

    Exits 0, or 1 when the batch failed or has failed requests (2: no such batch).
    """
    from promptq._runner import batch_exit_code
    from promptq.producer import Producer

    settings = _settings(ctx, redis_url=redis_url)

    async def go() -> int:
        async with Producer.from_url(settings.redis_url_or_default, settings=settings) as p:
            info = await p.batch(batch_id).info()
        if as_json:
            sys.stdout.write(orjson.dumps(info.to_json_dict()).decode() + "\n")
        else:
            display.out_console.print(display.batch_table(info))
            if info.stats:
                display.out_console.print(display.stats_table(info.stats))
        return batch_exit_code(info)

    sys.exit(_run_async(go)() or 0)


@main.command()
@click.argument("batch_id")
@_redis_option
@click.pass_context
def watch(ctx: click.Context, batch_id: str, redis_url: str | None) -> None:
    """Live progress bar until the batch finishes, then its statistics.

    Exits 0, or 1 when the batch failed or has failed requests (2: no such batch).
    """
    from promptq._runner import watch_batch

    sys.exit(_run_async(watch_batch)(_settings(ctx, redis_url=redis_url), batch_id) or 0)


@main.command()
@click.argument("batch_id")
@_result_files_options
@click.option("--follow", is_flag=True, help="Stream results as they finish until the end.")
@_redis_option
@click.pass_context
def results(
    ctx: click.Context,
    batch_id: str,
    output: Path,
    errors_out: Path | None,
    order: str,
    follow: bool,
    redis_url: str | None,
) -> None:
    """Write a batch's results as JSONL (successes to OUTPUT, failures to the errors file)."""
    from promptq._runner import export_results

    _run_async(export_results)(
        _settings(ctx, redis_url=redis_url),
        batch_id,
        output=output,
        errors_out=errors_out or default_errors_path(output),
        follow_batch=follow,
        order=order,
    )


@main.command()
@click.argument("batch_id")
@_redis_option
@click.pass_context
def cancel(ctx: click.Context, batch_id: str, redis_url: str | None) -> None:
    """Stop a batch: queued requests are not sent, finished results are kept.

    Requests already in flight finish; the ones never sent get a result with error
    code batch_cancelled. The status goes cancelling, then cancelled.
    """
    from promptq.producer import Producer

    settings = _settings(ctx, redis_url=redis_url)

    async def go() -> None:
        async with Producer.from_url(settings.redis_url_or_default, settings=settings) as p:
            info = await p.batch(batch_id).cancel()
        display.err_console.print(
            f"batch {batch_id}: {info.status.value}; {info.succeeded:,} succeeded, "
            f"{info.failed:,} failed or cancelled of {info.total:,}"
        )

    _run_async(go)()


@main.command("retry-failed")
@click.argument("batch_id")
@click.option("--batch-id", "new_batch_id", help="Id of the new batch (default: generated).")
@_redis_option
@click.pass_context
def retry_failed(
    ctx: click.Context, batch_id: str, new_batch_id: str | None, redis_url: str | None
) -> None:
    """Re-run only the failed requests of a finished batch, as a new batch linked to it.

    Prints the new batch id (only the id). The new batch has retry_of = BATCH_ID; the
    old one gets retried_by = the new id. A batch is retried once (its retry's failures
    are retried from the retry).
    """
    from promptq.producer import Producer

    settings = _settings(ctx, redis_url=redis_url)

    async def go() -> None:
        async with Producer.from_url(settings.redis_url_or_default, settings=settings) as p:
            batch = await p.retry_failed(batch_id, new_batch_id=new_batch_id)
        print(batch.id)

    _run_async(go)()


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list (numbers as numbers).")
@_redis_option
@click.pass_context
def workers(ctx: click.Context, as_json: bool, redis_url: str | None) -> None:
    """Live workers (from their heartbeats in Redis)."""
    from promptq._runner import list_workers

    settings = _settings(ctx, redis_url=redis_url)
    found, now = _run_async(list_workers)(settings) or ([], 0.0)
    if as_json:
        sys.stdout.write(orjson.dumps(found).decode() + "\n")
    elif not found:
        window = 3 * settings.heartbeat_s
        display.out_console.print(
            f"no live workers (none beat in the last {window:g} s): start one with "
            "`promptq worker`, with the same PROMPTQ_REDIS_URL"
        )
    else:
        display.out_console.print(display.workers_table(found, now=now))


@main.command()
@click.option("--host", help="Interface to bind (PROMPTQ_API_HOST) [default: 127.0.0.1].")
@click.option("--port", type=int, help="Port (PROMPTQ_API_PORT) [default: 8000].")
@click.option(
    "--insecure-no-auth", is_flag=True,
    help="Serve a non-loopback address without PROMPTQ_API_TOKEN: anyone who reaches the "
    "port can submit work and read results.",
)  # fmt: skip
@_redis_option
@click.pass_context
def serve(
    ctx: click.Context,
    host: str | None,
    port: int | None,
    insecure_no_auth: bool,
    redis_url: str | None,
) -> None:
    """HTTP API for web apps: the OpenAI Files + Batches API, chat completions through
    the queue (ahead of batch work), /healthz and /metrics.

    Point the official openai SDK at http://HOST:PORT/v1 with api_key=$PROMPTQ_API_TOKEN.
    Without PROMPTQ_API_TOKEN it serves loopback addresses only, unless
    --insecure-no-auth. Stateless (files live in Redis): run as many as you like behind
    a load balancer.
    """
    from promptq.api import serve as serve_http
    from promptq.api.auth import is_loopback

    settings = _settings(ctx, api_host=host, api_port=port, redis_url=redis_url)
    token = settings.api_token
    if token is not None and not token.get_secret_value().strip():
        _fail("PROMPTQ_API_TOKEN is set but empty; set a token or unset it", EXIT_USAGE)
    if token is None and not is_loopback(settings.api_host) and not insecure_no_auth:
        _fail(
            f"refusing to serve {settings.api_host} without a token: set PROMPTQ_API_TOKEN "
            "(clients send it as a bearer token), bind 127.0.0.1, or pass --insecure-no-auth",
            EXIT_USAGE,
        )

    def ready(url: str) -> None:
        auth = "bearer token required" if token else "no auth"
        display.err_console.print(f"promptq serve: {url} ({auth})", highlight=False)

    try:
        serve_http(settings, host=settings.api_host, port=settings.api_port, on_ready=ready)
    except RedisUnavailable as exc:
        _fail(str(exc), 1)
    except ConfigError as exc:
        _fail(str(exc), EXIT_USAGE)
    except OSError as exc:
        _fail(f"cannot listen on {settings.api_host}:{settings.api_port}: {exc.strerror}", 1)


@main.command()
@click.option(
    "--interval",
    "interval_s",
    type=click.FloatRange(min=0.1),
    default=1.0,
    show_default=True,
    help="Seconds between refreshes.",
)
@click.option("--once", is_flag=True, help="Print one frame and exit (for scripts and logs).")
@click.option(
    "--batches",
    type=click.IntRange(min=1, max=1000),
    default=15,
    show_default=True,
    help="How many of the newest batches to show.",
)
@_redis_option
@click.pass_context
def top(
    ctx: click.Context, interval_s: float, once: bool, batches: int, redis_url: str | None
) -> None:
    """The cluster live in the terminal: queue depth, limiter cooldowns and open circuit
    breakers, the newest batches (progress, route, age, cost) and the live workers
    (in flight, done, failed, req/s). Ctrl-C quits."""
    from promptq._top import run_top

    settings = _settings(ctx, redis_url=redis_url)
    try:
        asyncio.run(run_top(settings, interval_s=interval_s, once=once, batches=batches))
    except KeyboardInterrupt:
        return
    except PromptqError as exc:
        _fail(str(exc), 1)


@main.command()
@click.option("--json", "as_json", is_flag=True, help="One JSON object per check.")
@_redis_option
@click.pass_context
def doctor(ctx: click.Context, as_json: bool, redis_url: str | None) -> None:
    """Check what a production deployment needs, and say how to fix each problem.

    Redis reachable and new enough, maxmemory-policy noeviction (anything else can drop
    queued requests silently), persistence (AOF), live workers, the upstream answering
    GET /models with the configured key (PROMPTQ_UPSTREAM_URL, PROMPTQ_API_KEY), and
    this machine's clock against Redis'. Exit code 0 when all is well, 1 otherwise.
    """
    from promptq.doctor import run_checks

    settings = _settings(ctx, redis_url=redis_url)
    checks = _run_async(run_checks)(settings) or []
    if as_json:
        for check in checks:
            sys.stdout.write(orjson.dumps(check.as_dict()).decode() + "\n")
    else:
        display.out_console.print(display.doctor_table(checks))
    bad = [c for c in checks if c.verdict != "ok"]
    if bad and not as_json:
        display.out_console.print(
            f"{len(bad)} problem(s): fix them (see 'fix') and run `promptq doctor` again"
        )
    sys.exit(1 if bad else 0)


@main.command("mock-llm")
@click.option("--host", default="127.0.0.1", show_default=True, help="Interface to bind.")
@click.option("--port", default=8001, show_default=True, help="Port (0 = any free port).")
@click.option("--latency-ms", default=0.0, show_default=True, help="Fixed latency per answer.")
@click.option("--jitter-ms", default=0.0, show_default=True, help="Plus uniform(0, jitter).")
@click.option("--error-rate", default=0.0, show_default=True, help="Fraction answered 500.")
@click.option("--rate-429", default=0.0, show_default=True, help="Fraction answered 429.")
@click.option("--retry-after-s", type=float, help="Retry-After seconds on those 429s.")
@click.option("--hang-rate", default=0.0, show_default=True, help="Fraction never answered.")
@click.option(
    "--malformed-rate", default=0.0, show_default=True, help="Fraction with invalid JSON."
)
@click.option("--drop-rate", default=0.0, show_default=True, help="Fraction whose socket drops.")
@click.option("--seed", type=int, help="RNG seed for reproducible faults.")
@click.option(
    "--rpm-limit", type=int, help="Enforce requests per minute: 429 + x-ratelimit-* headers."
)
@click.option("--max-concurrency", type=int, help="429 for requests beyond this many in flight.")
@click.option(
    "--batch-turnaround-s",
    default=0.0,
    show_default=True,
    help="Batch API: a provider batch completes this many seconds after it is created.",
)
@click.option(
    "--flavour",
    type=click.Choice(FLAVOURS),
    default="openai",
    show_default=True,
    help="Answer errors and stream chat chunks as this server does (bodies, status codes, "
    "chunk fields, failures midway); llamacpp also imitates llama-server's HTTP thread "
    "pool, keep-alive and slots.",
)
@click.option("--api-key", help="Refuse requests without 'Authorization: Bearer KEY'.")
@click.option(
    "--context-tokens",
    type=int,
    help="Prompts longer than this get a context error [llamacpp: 512].",
)
@click.option("--slots", type=int, help="Requests processed at once; the rest queue [llamacpp: 4].")
@click.option(
    "--http-threads",
    type=int,
    help="Connections served at once, idle keep-alive ones included [llamacpp: slots + 4].",
)
@click.option(
    "--keepalive-s", type=float, help="Idle keep-alive connections closed after this [llamacpp: 5]."
)
@click.option(
    "--stream-chunks",
    default=8,
    show_default=True,
    help="A streamed answer's content comes in this many pieces.",
)
@click.option(
    "--stream-interval-ms",
    default=0.0,
    show_default=True,
    help="Milliseconds between streamed events (the latency comes before the first).",
)
@click.option(
    "--embeddings/--no-embeddings",
    default=None,
    help="Serve POST /v1/embeddings [default: yes; llamacpp: no, as without --embeddings].",
)
def mock_llm(host: str, port: int, **options: Any) -> None:
    """Mock OpenAI-compatible upstream (chat completions, completions, embeddings, the
    Files and Batches API, GET /stats).

    Answers deterministically ("echo: <prompt>"), with optional latency and injected
    faults. A prompt may script its own fate: "hi [[mock status=500 fail=2]]" fails
    twice then succeeds; also status=429 retry_after=1.5, quota=1, hang=1,
    malformed=1, drop=1, latency_ms=L, and error=KIND (context, parse, invalid, auth,
    model, path, busy, loading, unsupported, too_large, server) in the body the
    --flavour's server gives it. "stream": true streams chat completions and responses
    (chunks=N interval_ms=M per request; cut=K drops the connection after K events;
    error_at=K ends the stream after K events with the --flavour's failure events).

    It is also a provider with a Batch API (POST /v1/files, /v1/batches, ...) for
    --route batch-api: batch=fail|expire|hold in a line fails its provider batch,
    expires the line, or holds it until the batch is cancelled.
    """
    from promptq.mock import MockConfig, serve_forever

    try:
        config = MockConfig(**options)
    except (TypeError, ValueError) as exc:
        _fail(f"invalid mock option: {exc}", EXIT_USAGE)
        return
    try:
        asyncio.run(serve_forever(config, host=host, port=port))
    except KeyboardInterrupt:
        pass
    except OSError as exc:
        _fail(f"cannot listen on {host}:{port}: {exc.strerror}", 1)
