"""Terminal output for the CLI: progress bars and tables (rich), all on stderr except
what scripts read (ids, JSON)."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from promptq.shared.models import BatchInfo, BatchStats


def _console(*, stderr: bool) -> Console:
    # Not a terminal (a pipe, a log file): rich would cut every line to 80 columns
    # ("vm-165…"); let lines be as long as they are instead.
    stream = sys.stderr if stderr else sys.stdout
    interactive = hasattr(stream, "isatty") and stream.isatty()
    return Console(stderr=stderr, width=None if interactive else NON_TTY_WIDTH)


#: the line width when output goes to a file or a pipe
NON_TTY_WIDTH = 400
err_console = _console(stderr=True)
out_console = _console(stderr=False)


class BatchProgress:
    """A live bar for one batch: done/total, failures, retries, rate, ETA."""

    def __init__(self, progress: Progress, task: TaskID) -> None:
        self._progress = progress
        self._task = task
        self._start = time.monotonic()

    def update(
        self,
        *,
        done: int,
        total: int,
        failed: int,
        retries: int = 0,
        elapsed_s: float | None = None,
        cost_usd: float | None = None,
    ) -> None:
        """``elapsed_s``: how long the batch has run (default: since this bar started);
        the rate is done / elapsed, shown once a second has passed. ``cost_usd``: the
        spend so far, when known."""
        elapsed = time.monotonic() - self._start if elapsed_s is None else elapsed_s
        rate = f"{done / elapsed:,.0f} req/s" if elapsed >= 1.0 else ""
        cost = usd(cost_usd) if cost_usd else ""
        self._progress.update(
            self._task, completed=done, total=total, failed=failed, retries=retries, rate=rate,
            cost=cost,
        )  # fmt: skip


def usd(value: float) -> str:
    """Dollars, with the digits that matter: $1,234.50, $0.0123, $0.000042."""
    if value >= 100:
        return f"${value:,.2f}"
    if value >= 0.01:
        return f"${value:,.4f}"
    return f"${value:.6f}"


NO_PRICE = "unknown: a model used has no price (PROMPTQ_PRICES)"


@contextmanager
def batch_progress(description: str, *, total: int) -> Iterator[BatchProgress]:
    progress = Progress(
        SpinnerColumn(),
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("[red]{task.fields[failed]} failed"),
        TextColumn("[yellow]{task.fields[retries]} retries"),
        TextColumn("{task.fields[rate]}"),
        TextColumn("[green]{task.fields[cost]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=err_console,
        transient=False,
    )
    with progress:
        task = progress.add_task(description, total=total, failed=0, retries=0, rate="", cost="")
        yield BatchProgress(progress, task)


def _ts(value: float | None) -> str:
    if value is None:
        return "-"
    return datetime.fromtimestamp(value, tz=UTC).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3] + "Z"


def batch_table(info: BatchInfo) -> Table:
    title = f"batch {info.id}"
    table = Table(title=title, show_header=False, title_justify="left", min_width=len(title) + 2)
    table.add_column("field", style="bold")
    table.add_column("value")
    table.add_row("status", info.status.value + (f" ({info.reason})" if info.reason else ""))
    table.add_row("progress", f"{info.done:,} / {info.total:,}")
    table.add_row("succeeded", f"{info.succeeded:,}")
    table.add_row("failed", f"{info.failed:,}")
    table.add_row("retries", f"{info.retries:,}")
    table.add_row("model / endpoint", f"{info.model} {info.endpoint}")
    table.add_row("priority", info.priority.value)
    route = info.route
    if info.route == "batch-api":
        route += f", {info.shards} shard(s)"
        if info.deadline_at:
            route += f", deadline {_ts(info.deadline_at)}"
    table.add_row("route", route)
    spent = NO_PRICE if info.cost_usd is None else usd(info.cost_usd)
    if info.max_cost_usd is not None:
        spent += f" of a {usd(info.max_cost_usd)} budget"
    table.add_row("cost so far", spent)
    if info.route == "batch-api":
        table.add_row("saved (batch API)", usd(info.saved_usd))
    if info.cached:
        table.add_row("cached", f"{info.cached:,} answered from the cache")
    if info.retry_of or info.retried_by:
        table.add_row("retry of / retried by", f"{info.retry_of or '-'} / {info.retried_by or '-'}")
    table.add_row("created", _ts(info.created_at))
    table.add_row("completed", _ts(info.completed_at))
    return table


def stats_table(stats: BatchStats, *, title: str = "Statistics") -> Table:
    table = Table(title=title, title_justify="left", min_width=len(title) + 2)
    table.add_column("metric", style="bold")
    table.add_column("value", justify="right")
    finished = stats.succeeded + stats.failed
    table.add_row("requests", f"{finished:,}")
    table.add_row("succeeded", f"{stats.succeeded:,} ({stats.success_rate:.1%})")
    table.add_row("failed", f"{stats.failed:,}")
    for name in ("p50", "p90", "p95", "p99", "mean", "max"):
        table.add_row(f"latency {name}", f"{getattr(stats, name + '_ms'):,.1f} ms")
    table.add_row("wall time", f"{stats.wall_s:,.2f} s")
    table.add_row("throughput", f"{stats.throughput_rps:,.1f} req/s")
    table.add_row("tokens in / out", f"{stats.input_tokens:,} / {stats.output_tokens:,}")
    table.add_row("cost", NO_PRICE if stats.cost_usd is None else usd(stats.cost_usd))
    if stats.saved_usd is not None:
        table.add_row("saved (batch API)", usd(stats.saved_usd))
    if stats.cached:
        table.add_row("cached", f"{stats.cached:,} (no upstream call)")
    if stats.errors_by_code:
        errors = ", ".join(f"{code}: {n:,}" for code, n in stats.errors_by_code.items())
        table.add_row("errors by code", errors)
    return table


def workers_table(workers: Sequence[Mapping[str, Any]], *, now: float) -> Table:
    """Live workers' heartbeats; ``now``: Redis' clock, which their beats are on."""
    table = Table(title=f"{len(workers)} live worker(s)", title_justify="left")
    for column in ("worker", "host", "pid", "slots", "in flight", "done", "failed", "retries"):
        table.add_column(column, justify="left" if column in ("worker", "host") else "right")
    table.add_column("last beat", justify="right")
    table.add_column("upstream / backend")
    for w in workers:
        table.add_row(
            str(w.get("id")),
            str(w.get("host")),
            str(w.get("pid")),
            str(w.get("concurrency")),
            str(w.get("in_flight")),
            str(w.get("done")),
            str(w.get("failed")),
            str(w.get("retries")),
            f"{max(now - float(w.get('last_beat') or now), 0):.1f} s ago",
            str(w.get("upstream")),
        )
    return table


_VERDICT_STYLE = {"ok": "[green]ok[/]", "warn": "[yellow]warn[/]", "fail": "[bold red]FAIL[/]"}


def doctor_table(checks: Sequence[Any]) -> Table:
    """``promptq doctor``'s checks: verdict, what was found, how to fix it."""
    table = Table(title="promptq doctor", title_justify="left")
    table.add_column("check")
    table.add_column("", justify="center")
    table.add_column("found")
    table.add_column("fix")
    for check in checks:
        table.add_row(check.name, _VERDICT_STYLE[check.verdict], check.detail, check.fix)
    return table
