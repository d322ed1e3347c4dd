"""The operator's tools at size: the dashboard and /metrics with 1,000 batches and 100
workers, and how soon a webhook arrives after its batch ends.

Run ``python benchmarks/bench_operate.py`` (about a minute; ``--quick`` for a smoke
run). It starts a throwaway ``redis-server`` and fills it with ``--batches`` (1,000)
finished batches and ``--workers`` (100) worker heartbeats, then times, medians of
``--reps`` (5):

* ``GET /dashboard/overview`` (first page) and ``GET /dashboard/batches/{id}``, and the
  Redis commands one dashboard refresh (both) costs (``INFO stats`` before and after);
* ``GET /metrics``;
* the first render of the page in Chromium (token entered to the batches table drawn),
  when a Chromium is on PATH (``apt-get install chromium``) and Playwright is installed;
* webhook latency: a worker with a local receiver, ``--hooks`` (10) one-request batches;
  from the batch's ``completed_at`` (Redis' clock) to the receiver's arrival.

The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import statistics
import time
from typing import Any

from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from pydantic import SecretStr

from _procs import start_redis
from promptq.api import create_app
from promptq.embedded import local_cluster
from promptq.mock import MockServer
from promptq.shared.connection import connect
from promptq.shared.registry import WorkerRegistry
from promptq.shared.settings import Settings

TOKEN = "bench"


async def commands(redis: Any) -> int:
    return int((await redis.info("stats"))["total_commands_processed"])


async def timed(client: TestClient, path: str) -> float:
    started = time.perf_counter()
    resp = await client.get(path, headers={"Authorization": f"Bearer {TOKEN}"})
    await resp.read()
    assert resp.status == 200, (path, resp.status)
    return (time.perf_counter() - started) * 1000


async def first_render(url: str) -> float | None:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    try:
        from playwright.async_api import async_playwright
    except ImportError:
        return None
    if chromium is None:
        return None
    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        try:
            page = await browser.new_page()
            await page.goto(url)
            await page.fill("#token-input", TOKEN)
            started = time.perf_counter()
            await page.click("#token-form button")
            await page.wait_for_selector("#batches tbody tr")
            await page.wait_for_selector("#workers tbody tr")
            return (time.perf_counter() - started) * 1000
        finally:
            await browser.close()


async def webhook_latency(settings: Settings, hooks: int) -> list[float]:
    arrivals: dict[str, float] = {}
    arrived = asyncio.Event()

    async def receive(request: web.Request) -> web.Response:
        event = await request.json()
        arrivals[event["data"]["id"]] = time.time()
        arrived.set()
        return web.Response(status=204)

    app = web.Application()
    app.router.add_post("/hook", receive)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    latencies = []
    try:
        async with MockServer() as mock:
            local = settings.model_copy(
                update={"upstream_url": mock.url, "webhook_url": f"http://{host}:{port}/hook"}
            )
            async with local_cluster(local, workers=1) as producer:
                for i in range(hooks):
                    batch = await producer.submit([f"hook {i}"])
                    await batch.wait(timeout_s=30)
                    async with asyncio.timeout(10):
                        while batch.id not in arrivals:
                            await arrived.wait()
                            arrived.clear()
                    info = await batch.info()
                    assert info.completed_at is not None
                    latencies.append((arrivals[batch.id] - info.completed_at) * 1000)
    finally:
        await runner.cleanup()
    return latencies


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--batches", type=int, default=1000)
    parser.add_argument("--workers", type=int, default=100)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--hooks", type=int, default=10)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.batches, args.workers, args.reps, args.hooks = 100, 10, 1, 2
    proc, url = start_redis("bench_operate")
    out: dict[str, Any] = {"batches": args.batches, "workers": args.workers}
    try:
        settings = Settings(redis_url=url, api_token=SecretStr(TOKEN), heartbeat_s=60)
        redis = await connect(url)
        async with MockServer() as mock:
            filled = settings.model_copy(update={"upstream_url": mock.url})
            async with local_cluster(filled, workers=1) as producer:
                started = time.monotonic()
                ids = []
                for start in range(0, args.batches, 50):
                    made = [await producer.submit([f"b{i}"]) for i in range(start,
                            min(start + 50, args.batches))]  # fmt: skip
                    await asyncio.gather(*(b.wait(timeout_s=60) for b in made))
                    ids += [b.id for b in made]
                print(f"filled {args.batches} batches in {time.monotonic() - started:.1f} s")
        registry = WorkerRegistry(redis, heartbeat_s=60)
        for n in range(args.workers):
            await registry.beat(f"bench-host-{n}-0-{n:06x}", {
                "host": f"bench-host-{n}", "pid": n, "started_at": 0, "concurrency": 64,
                "limit": 64, "in_flight": 3, "claimed": 0, "done": 1000, "failed": 2,
                "retries": 1, "upstream": "http://up/v1"})  # fmt: skip
        app = create_app(settings)
        async with TestClient(TestServer(app)) as client:
            overview, detail, metrics, per_refresh = [], [], [], []
            for _ in range(args.reps):
                before = await commands(redis)
                overview.append(await timed(client, "/dashboard/overview?limit=25"))
                detail.append(await timed(client, f"/dashboard/batches/{ids[0]}"))
                per_refresh.append(await commands(redis) - before - 1)  # minus our INFO
                metrics.append(await timed(client, "/metrics"))
            out.update(
                overview_ms=statistics.median(overview),
                batch_detail_ms=statistics.median(detail),
                redis_commands_per_refresh=statistics.median(per_refresh),
                metrics_ms=statistics.median(metrics),
            )
            host, port = client.server.host, client.server.port
            renders = [r for r in [await first_render(f"http://{host}:{port}/")
                                   for _ in range(min(args.reps, 3))] if r is not None]  # fmt: skip
            out["first_render_ms"] = statistics.median(renders) if renders else None
        await redis.aclose()
        hooks = await webhook_latency(settings.model_copy(update={"heartbeat_s": 2}), args.hooks)
        out["webhook_latency_ms_p50"] = statistics.median(hooks)
        out["webhook_latency_ms_max"] = max(hooks)
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    render = out["first_render_ms"]
    print(
        f"{args.batches} batches, {args.workers} workers (medians of {args.reps}):\n"
        f"  GET /dashboard/overview {out['overview_ms']:.1f} ms, /dashboard/batches/ID "
        f"{out['batch_detail_ms']:.1f} ms, {out['redis_commands_per_refresh']:.0f} Redis "
        f"commands per refresh\n  GET /metrics {out['metrics_ms']:.1f} ms\n"
        f"  first render in Chromium: {'n/a' if render is None else f'{render:.0f} ms'}\n"
        f"  webhook after the batch ends: p50 {out['webhook_latency_ms_p50']:.0f} ms, "
        f"max {out['webhook_latency_ms_max']:.0f} ms"
    )
    print(json.dumps(out))


if __name__ == "__main__":
    asyncio.run(main())
