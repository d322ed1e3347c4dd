"""``promptq top``: the cluster in the terminal, refreshed live (rich Live).

One screen: the queue (requests waiting in batches and in the chat lane), the limiter
(cooldowns and open circuit breakers of each upstream), the newest batches (status, a
progress bar, route, age, cost) and the live workers (host, in flight, done, failed,
slots, last beat, throughput since the last frame). Everything comes from Redis, as
``promptq status`` and ``promptq workers`` read it; ``--once`` prints one frame.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping, Sequence
from typing import Any

from rich.console import Group
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from promptq import _display as display
from promptq.producer import Producer
from promptq.shared.models import BatchInfo
from promptq.shared.overview import read_overview
from promptq.shared.settings import Settings

_STATUS_STYLE = {
    "completed": "green",
    "failed": "bold red",
    "cancelled": "yellow",
    "cancelling": "yellow",
    "in_progress": "cyan",
    "finalizing": "cyan",
}


async def snapshot(producer: Producer, settings: Settings, *, batches: int) -> dict[str, Any]:
    """What one frame shows, read from Redis (``shared.overview``)."""
    found = await read_overview(producer, heartbeat_s=settings.heartbeat_s, limit=batches)
    limits = [
        (state["scope"], f"cooling down, {state['seconds_left']:.1f} s left")
        if state["state"] == "cooldown"
        else (state["scope"], f"circuit open: {state['reason']}")
        for state in found.limits
    ]
    return {
        "now": found.now,
        "queued": found.queued,
        "chat_queued": found.chat_queued,
        "batches": found.batches,
        "workers": found.workers,
        "limits": limits,
    }


def _age(now: float, since: float | None) -> str:
    if not since:
        return "-"
    seconds = max(now - since, 0.0)
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def batches_table(infos: Sequence[BatchInfo], now: float) -> Table:
    table = Table(title=f"{len(infos)} newest batch(es)", title_justify="left", expand=True)
    table.add_column("batch", no_wrap=True)
    table.add_column("status")
    table.add_column("progress", ratio=1)
    table.add_column("done", justify="right")
    table.add_column("failed", justify="right")
    table.add_column("route")
    table.add_column("age", justify="right")
    table.add_column("cost", justify="right")
    for info in infos:
        total = max(info.total, 1)
        status = info.status.value
        table.add_row(
            info.id,
            Text(status, style=_STATUS_STYLE.get(status, "")),
            ProgressBar(total=total, completed=info.done, width=None),
            f"{info.done:,}/{info.total:,}",
            f"{info.failed:,}",
            info.route,
            _age(now, info.created_at),
            display.usd(info.cost_usd) if info.cost_usd is not None else "-",
        )
    return table


def workers_table(
    workers: Sequence[Mapping[str, Any]], now: float, rates: Mapping[str, float]
) -> Table:
    table = Table(title=f"{len(workers)} live worker(s)", title_justify="left", expand=True)
    for column in ("worker", "host", "slots", "in flight", "done", "failed", "req/s", "beat"):
        table.add_column(column, justify="left" if column in ("worker", "host") else "right")
    for w in workers:
        worker_id = str(w.get("id"))
        table.add_row(
            worker_id,
            str(w.get("host")),
            f"{w.get('limit') or w.get('concurrency')}",
            str(w.get("in_flight")),
            f"{int(w.get('done') or 0):,}",
            f"{int(w.get('failed') or 0):,}",
            f"{rates.get(worker_id, 0.0):.1f}",
            f"{max(now - float(w.get('last_beat') or now), 0):.1f} s ago",
        )
    return table


def frame(snap: Mapping[str, Any], rates: Mapping[str, float]) -> Group:
    now = snap["now"]
    workers = snap["workers"]
    in_flight = sum(int(w.get("in_flight") or 0) for w in workers)
    total_rate = sum(rates.values())
    head = Text.assemble(
        ("promptq top  ", "bold"),
        f"queued {snap['queued']:,} (chat {snap['chat_queued']:,})  ",
        f"in flight {in_flight:,}  workers {len(workers)}  {total_rate:.1f} req/s",
    )
    parts: list[Any] = [head]
    limits = snap["limits"]
    if limits:
        limiter = Table(title="limits", title_justify="left", expand=True)
        limiter.add_column("upstream / model")
        limiter.add_column("state")
        for scope, state in limits:
            limiter.add_row(scope, state)
        parts.append(limiter)
    parts.append(batches_table(snap["batches"], now))
    parts.append(workers_table(workers, now, rates))
    return Group(*parts)


def _rates(
    before: Mapping[str, float], workers: Sequence[Mapping[str, Any]], dt: float
) -> tuple[dict[str, float], dict[str, float]]:
    done = {str(w.get("id")): float(w.get("done") or 0) + float(w.get("failed") or 0)
            for w in workers}  # fmt: skip
    rates = {wid: max(n - before.get(wid, n), 0.0) / dt for wid, n in done.items()} if dt else {}
    return done, rates


async def run_top(settings: Settings, *, interval_s: float, once: bool, batches: int) -> None:
    async with Producer.from_url(settings.redis_url_or_default, settings=settings) as producer:
        snap = await snapshot(producer, settings, batches=batches)
        if once:
            display.out_console.print(frame(snap, {}))
            return
        done, _ = _rates({}, snap["workers"], 0)
        last = time.monotonic()
        with Live(frame(snap, {}), console=display.out_console, auto_refresh=False) as live:
            while True:
                await asyncio.sleep(interval_s)
                snap = await snapshot(producer, settings, batches=batches)
                now = time.monotonic()
                done, rates = _rates(done, snap["workers"], now - last)
                last = now
                live.update(frame(snap, rates), refresh=True)
