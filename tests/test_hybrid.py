"""The hybrid pipeline: the batch-api route through a provider's Batch API (the mock, or
``promptq serve`` itself), deadlines that fall back to real time, cancel, cost in dollars,
the budget stop and the response cache. Real worker processes where a crash matters."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from arq.connections import ArqRedis
from pydantic import SecretStr

from promptq import Producer, Status
from promptq.api import create_app
from promptq.mock import MockConfig, MockServer, expected_content
from promptq.shared import keys
from promptq.shared.batches import BatchStore
from promptq.shared.connection import connect
from promptq.shared.models import Result
from promptq.shared.prices import BUILT_IN, PriceTable
from promptq.shared.results import FIELDS
from promptq.shared.routes import ShardCutter, parse_duration, provider_line
from promptq.shared.settings import Settings

from .conftest import WorkerProcs, in_process_worker, wait_until

MODEL = "gpt-4o-mini"  # a model with a built-in price
POLL = {"PROMPTQ_BATCH_API_POLL_S": "0.2"}
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def prompts(n: int, *, fate: dict[int, str] | None = None) -> list[dict[str, str]]:
    """``n`` prompts; ``fate`` maps an index to a ``[[mock batch=...]]`` directive."""
    out = []
    for i in range(n):
        text = f"question {i}"
        if fate and i in fate:
            text += f" [[mock batch={fate[i]}]]"
        out.append({"custom_id": f"q{i}", "prompt": text})
    return out


def hybrid(settings: Settings, mock: MockServer, **update: Any) -> Settings:
    return settings.model_copy(
        update={"upstream_url": mock.url, "model": MODEL, "batch_api_poll_s": 0.2, **update}
    )


async def lines_of(redis: ArqRedis, batch_id: str) -> dict[str, dict[str, Any]]:
    raw = await redis.hgetall(keys.results(batch_id))
    return {k.decode(): orjson.loads(v) for k, v in raw.items()}


def batch_cost(lines: dict[str, dict[str, Any]], *, batch: bool) -> float:
    """What the lines' usage costs at the built-in price of MODEL."""
    price = BUILT_IN[MODEL]
    total = 0.0
    for line in lines.values():
        usage = line["response"]["body"]["usage"]
        total += price.cost(usage["prompt_tokens"], usage["completion_tokens"], batch=batch)[0]
    return total


async def events_count(redis: ArqRedis, batch_id: str) -> int:
    """Result events of the batch (one per newly recorded line: a duplicate adds none)."""
    entries = await redis.xrange(keys.events(batch_id))
    return sum(1 for _, fields in entries if b"c" in fields)


def pid_of_lease(lease: bytes) -> int:
    """The worker process holding a shard (its id is host-pid-hex, then :token)."""
    worker_id = lease.decode().rsplit(":", 1)[0]
    return int(worker_id.rsplit("-", 2)[1])


# -- cutting and parsing ---------------------------------------------------------------


def test_shards_are_cut_by_lines_and_by_bytes() -> None:
    from promptq.shared.models import QueuedRequest

    requests = [QueuedRequest(f"r{i}", {"messages": [{"role": "user", "content": "x" * 50}]},
                              i + 1) for i in range(10)]  # fmt: skip
    size = len(provider_line(requests[0], "/v1/chat/completions")) + 1
    by_lines = ShardCutter("/v1/chat/completions", max_lines=4, max_bytes=10**9)
    by_bytes = ShardCutter("/v1/chat/completions", max_lines=100, max_bytes=3 * size)
    for cutter in (by_lines, by_bytes):
        for r in requests:
            cutter.add(r)
        cutter.close()
    assert [(s, e) for s, e, _ in by_lines.closed] == [(0, 4), (4, 8), (8, 10)]
    assert [(s, e) for s, e, _ in by_bytes.closed] == [(0, 3), (3, 6), (6, 9), (9, 10)]
    assert all(b <= 3 * size for _, _, b in by_bytes.closed)


@pytest.mark.parametrize(
    ("text", "seconds"), [("45s", 45), ("30m", 1800), ("2h", 7200), ("1d", 86400), ("90", 90)]
)
def test_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "soon", "-1h", "0", "2w", "1h30"])
def test_bad_durations_say_what_is_accepted(text: str) -> None:
    with pytest.raises(ValueError, match="45s, 30m, 2h or 1d"):
        parse_duration(text)


def test_prices_snapshots_overrides_and_unknown_models(tmp_path: Path) -> None:
    table = PriceTable.load()
    paid, saved = table.cost("gpt-4o-mini-2024-07-18", 1_000_000, 1_000_000, batch=True)
    assert (paid, saved) == pytest.approx((0.375, 0.375))  # (0.15 + 0.60) / 2 each
    assert table.cost("my-local-llama", 10, 10, batch=False) is None  # never a guess
    path = tmp_path / "prices.json"
    path.write_text(json.dumps({"my-local-llama": {"input_per_1m": 1, "output_per_1m": 2}}))
    mine = PriceTable.load(path)
    assert mine.cost("my-local-llama", 1_000_000, 1_000_000, batch=False) == (3.0, 0.0)
    path.write_text(json.dumps({"m": {"input_per_1m": "cheap", "output_per_1m": 1}}))
    with pytest.raises(Exception, match="model 'm': input_per_1m must be a number"):
        PriceTable.load(path)


# -- the batch-api route, worker processes ----------------------------------------------


async def test_three_shards_recorded_exactly_once_with_cost_and_savings(
    redis: ArqRedis, settings: Settings, worker_procs: WorkerProcs
) -> None:
    async with MockServer(MockConfig(model=MODEL, batch_turnaround_s=0.3)) as mock:
        settings = hybrid(settings, mock, batch_api_max_lines=4)
        worker_procs.use(mock, model=MODEL)
        await worker_procs.launch(redis, 2, **POLL)
        async with Producer.from_url(settings.redis_url_or_default, settings=settings) as p:
            batch = await p.submit(prompts(11), route="batch-api")
            streamed = [r async for r in batch.as_completed()]
            stats = await batch.wait(timeout_s=30)
            info = await batch.info()
        lines = await lines_of(redis, batch.id)
        calls = dict(mock.stats.batch_calls)
        assert mock.stats.requests == 0  # nothing went through the realtime endpoint
    assert info.status is Status.COMPLETED
    assert info.shards == 3
    assert calls["create"] == 3
    assert calls["upload"] == 3
    assert sorted(r.custom_id for r in streamed) == sorted(f"q{i}" for i in range(11))
    assert await events_count(redis, batch.id) == 11
    for i in range(11):
        line = lines[f"q{i}"]
        assert line["route"] == "batch-api"
        assert line["error"] is None
        assert line["response"]["body"]["choices"][0]["message"]["content"] == expected_content(
            {"messages": [{"role": "user", "content": f"question {i}"}]}
        )
    assert stats.succeeded == 11
    assert stats.failed == 0
    assert stats.cost_usd == pytest.approx(batch_cost(lines, batch=True), abs=1e-6)
    assert stats.saved_usd == pytest.approx(stats.cost_usd, abs=1e-6)  # half price
    assert stats.cost_usd > 0


class Pause:
    """A middleware for the mock: the first request it matches is handled, then held
    (the worker that sent it is killed meanwhile)."""

    def __init__(self, method: str, *, path: str = "", suffix: str = "", keep_lines: int = 0):
        self.method, self.path, self.suffix, self.keep_lines = method, path, suffix, keep_lines
        self.reached = asyncio.Event()
        self.release = asyncio.Event()
        self.used = False

    def matches(self, request: web.Request) -> bool:
        if self.used or request.method != self.method:
            return False
        if self.path and request.path != self.path:
            return False
        return not self.suffix or request.path.endswith(self.suffix)

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if not self.matches(request):
            return await handler(request)
        self.used = True
        response = await handler(request)
        if not self.keep_lines:
            self.reached.set()
            await self.release.wait()  # never answered: its worker dies first
            return response
        assert isinstance(response, web.Response)
        assert isinstance(response.body, bytes)
        if response.body.count(b"\n") < self.keep_lines * 2:  # an error file, say
            self.used = False
            return response
        head = b"".join(response.body.splitlines(keepends=True)[: self.keep_lines])
        stream = web.StreamResponse()
        stream.content_type = "application/octet-stream"
        await stream.prepare(request)
        await stream.write(head)  # the first lines, then nothing: the download hangs
        self.reached.set()
        await self.release.wait()
        return stream


@pytest.fixture
async def paused_mock(request: pytest.FixtureRequest) -> AsyncIterator[tuple[MockServer, Pause]]:
    pause: Pause = request.param
    server = MockServer(MockConfig(model=MODEL))
    server.app.middlewares.append(pause.middleware)
    async with server:
        yield server, pause


async def _kill_holder(redis: ArqRedis, worker_procs: WorkerProcs, batch_id: str) -> None:
    lease = await redis.hget(keys.shards(batch_id), "0:lease")
    assert lease is not None
    pid = pid_of_lease(lease)
    index = next(i for i, proc in enumerate(worker_procs.procs) if proc.pid == pid)
    worker_procs.kill(index)


@pytest.mark.parametrize(
    ("paused_mock", "lines", "recorded_first"),
    [
        # the provider batch is created, the worker dies before it records its id
        (Pause("POST", path="/v1/batches"), 20, 0),
        # the worker dies after recording part of the output file
        (Pause("GET", suffix="/content", keep_lines=400), 900, 256),
    ],
    indirect=["paused_mock"],
    ids=["after-create", "mid-download"],
)
async def test_a_worker_killed_mid_step_loses_doubles_and_recreates_nothing(
    redis: ArqRedis,
    settings: Settings,
    worker_procs: WorkerProcs,
    paused_mock: tuple[MockServer, Pause],
    lines: int,
    recorded_first: int,
) -> None:
    mock, pause = paused_mock
    settings = hybrid(settings, mock)
    worker_procs.use(mock, model=MODEL)
    await worker_procs.launch(redis, 2, **POLL)
    async with Producer.from_url(settings.redis_url_or_default, settings=settings) as p:
        batch = await p.submit(prompts(lines), route="batch-api")
        await asyncio.wait_for(pause.reached.wait(), 30)

        async def recorded() -> bool:
            return int(await redis.hlen(keys.results(batch.id))) >= recorded_first

        await wait_until(recorded, timeout_s=20, what="the first results of the download")
        await _kill_holder(redis, worker_procs, batch.id)
        stats = await batch.wait(timeout_s=60)
    # the other worker took the shard over: it found the provider batch by its marker
    assert mock.stats.batch_calls["create"] == 1
    if not recorded_first:
        assert mock.stats.batch_calls["list"] >= 1
    assert stats.succeeded == lines
    assert stats.failed == 0
    assert await events_count(redis, batch.id) == lines  # each line recorded once
    assert int(await redis.hlen(keys.results(batch.id))) == lines
    assert {line["route"] for line in (await lines_of(redis, batch.id)).values()} == {"batch-api"}


# -- deadlines, provider failures, cancel ------------------------------------------------


async def test_an_expired_shard_with_a_deadline_falls_back_to_real_time(
    redis: ArqRedis, settings: Settings
) -> None:
    async with MockServer(MockConfig(model=MODEL)) as mock:
        settings = hybrid(settings, mock)
        async with in_process_worker(settings), Producer(redis, settings=settings) as p:
            with_deadline = await p.submit(
                prompts(10, fate={2: "expire", 7: "expire"}), route="batch-api", deadline_s=3600
            )
            await with_deadline.wait(timeout_s=20)
            without = await p.submit(prompts(4, fate={1: "expire"}), route="batch-api")
            stats = await without.wait(timeout_s=20)
        realtime_calls = mock.stats.requests
    lines = await lines_of(redis, with_deadline.id)
    assert {c for c, line in lines.items() if line["route"] == "realtime"} == {"q2", "q7"}
    assert all(line["error"] is None for line in lines.values())
    assert realtime_calls == 2
    expired = (await lines_of(redis, without.id))["q1"]
    assert expired["error"]["code"] == "batch_expired"
    assert expired["route"] == "batch-api"
    assert stats.errors_by_code == {"batch_expired": 1}
    assert stats.succeeded == 3


async def test_a_passed_deadline_cancels_the_provider_batch_and_sends_the_rest_now(
    redis: ArqRedis, settings: Settings
) -> None:
    async with MockServer(MockConfig(model=MODEL)) as mock:
        settings = hybrid(settings, mock)
        async with in_process_worker(settings), Producer(redis, settings=settings) as p:
            batch = await p.submit(
                prompts(6, fate={0: "hold", 3: "hold"}), route="batch-api", deadline_s=1.5
            )
            stats = await batch.wait(timeout_s=20)
        assert mock.stats.batch_calls["cancel"] == 1
    lines = await lines_of(redis, batch.id)
    routes = {c: line["route"] for c, line in lines.items()}
    assert routes == {"q0": "realtime", "q3": "realtime", "q1": "batch-api", "q2": "batch-api",
                      "q4": "batch-api", "q5": "batch-api"}  # fmt: skip
    assert stats.succeeded == 6


async def test_a_failed_provider_batch_reports_its_errors_or_falls_back(
    redis: ArqRedis, settings: Settings
) -> None:
    async with MockServer(MockConfig(model=MODEL)) as mock:
        settings = hybrid(settings, mock)
        async with in_process_worker(settings), Producer(redis, settings=settings) as p:
            failed = await p.submit(prompts(3, fate={1: "fail"}), route="batch-api")
            stats = await failed.wait(timeout_s=20)
            rescued = await p.submit(
                prompts(3, fate={1: "fail"}), route="batch-api", deadline_s=600
            )
            rescued_stats = await rescued.wait(timeout_s=20)
    lines = await lines_of(redis, failed.id)
    assert stats.errors_by_code == {"batch_failed": 3}
    assert "line 2" in lines["q0"]["error"]["message"]  # the provider's errors, reported
    assert rescued_stats.succeeded == 3
    assert {line["route"] for line in (await lines_of(redis, rescued.id)).values()} == {"realtime"}


async def test_cancel_cancels_the_provider_batch_and_keeps_what_it_finished(
    redis: ArqRedis, settings: Settings
) -> None:
    async with MockServer(MockConfig(model=MODEL)) as mock:
        settings = hybrid(settings, mock)
        async with in_process_worker(settings), Producer(redis, settings=settings) as p:
            batch = await p.submit(prompts(5, fate={4: "hold"}), route="batch-api")

            async def running() -> bool:
                info = await batch.info(with_stats=False)
                return info.status is Status.IN_PROGRESS

            await wait_until(running, what="the provider batch to run")
            await batch.cancel()
            stats = await batch.wait(timeout_s=20)
            info = await batch.info()
        assert mock.stats.batch_calls["cancel"] == 1
        assert mock.stats.requests == 0
    lines = await lines_of(redis, batch.id)
    assert info.status is Status.CANCELLED
    assert lines["q4"]["error"]["code"] == "batch_cancelled"
    assert all(lines[f"q{i}"]["error"] is None for i in range(4))  # finished ones kept
    assert stats.succeeded == 4
    assert stats.errors_by_code == {"batch_cancelled": 1}


async def test_a_producer_dying_while_loading_a_batch_api_batch_is_cut_once(
    redis: ArqRedis, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_append = BatchStore.append
    calls = 0

    async def dies_at_the_third_chunk(self: BatchStore, batch_id: str, requests: Any,
                                      **kw: Any) -> Any:  # fmt: skip
        nonlocal calls
        calls += 1
        if calls == 3:
            raise ConnectionError("the producer's machine went away")
        return await real_append(self, batch_id, requests, **kw)

    async with MockServer(MockConfig(model=MODEL)) as mock:
        settings = hybrid(settings, mock, batch_api_max_lines=300)
        items = prompts(2000)
        async with Producer(redis, settings=settings) as p:
            monkeypatch.setattr(BatchStore, "append", dies_at_the_third_chunk)
            with pytest.raises(ConnectionError):
                await p.submit(items, batch_id="cut-once", route="batch-api")
            monkeypatch.undo()
            assert await redis.hget(keys.batch("cut-once"), "sharded") == b"900"
            async with in_process_worker(settings):
                batch = await p.submit(items, batch_id="cut-once", route="batch-api", resume=True)
                stats = await batch.wait(timeout_s=60)
        assert mock.stats.batch_calls["create"] == 7
    shards = await redis.hgetall(keys.shards("cut-once"))
    bounds = sorted((int(shards[f"{k}:start".encode()]), int(shards[f"{k}:end".encode()]))
                    for k in range(7))  # fmt: skip
    assert bounds == [(s, min(s + 300, 2000)) for s in range(0, 2000, 300)]
    assert stats.succeeded == 2000
    assert await events_count(redis, "cut-once") == 2000


async def test_promptq_serve_is_a_provider_for_another_promptq(
    redis: ArqRedis, redis_url: str, settings: Settings
) -> None:
    parts = urlsplit(redis_url)
    db = int(parts.path.strip("/") or 0)
    # the inner promptq's own database, next to the tests' (Redis has 16: 0-15)
    inner_url = urlunsplit(parts._replace(path=f"/{db - 1 if db > 0 else 1}"))
    inner_redis = await connect(inner_url)
    await inner_redis.flushdb()
    try:
        async with MockServer(MockConfig(model=MODEL)) as mock:
            inner = settings.model_copy(update={
                "redis_url": inner_url, "upstream_url": mock.url, "model": MODEL,
                "api_token": SecretStr("inner-token"),
            })  # fmt: skip
            async with TestServer(create_app(inner)) as api, in_process_worker(inner):
                outer = settings.model_copy(update={
                    "upstream_url": str(api.make_url("/v1")), "model": MODEL,
                    "api_key": SecretStr("inner-token"), "batch_api_poll_s": 0.2,
                })  # fmt: skip
                async with in_process_worker(outer), Producer(redis, settings=outer) as p:
                    batch = await p.submit(prompts(8), route="batch-api")
                    stats = await batch.wait(timeout_s=30)
            assert mock.stats.requests == 8  # the inner promptq sent them in real time
        assert stats.succeeded == 8
        lines = await lines_of(redis, batch.id)
        assert {line["route"] for line in lines.values()} == {"batch-api"}
        assert lines["q3"]["response"]["body"]["choices"][0]["message"]["content"] == (
            "echo: question 3"
        )
        for key in (keys.batch(batch.id), keys.shards(batch.id)):  # the key stays out
            assert b"inner-token" not in b"".join((await redis.hgetall(key)).values())
    finally:
        await inner_redis.flushdb()
        await inner_redis.aclose()


# -- cost, budget, cache ------------------------------------------------------------------


async def test_the_budget_stops_a_batch_across_workers_within_the_requests_in_flight(
    redis: ArqRedis, settings: Settings, worker_procs: WorkerProcs, tmp_path: Path
) -> None:
    prices = tmp_path / "prices.json"  # a dollar a token: every request costs a few dollars
    prices.write_text(json.dumps({MODEL: {"input_per_1m": 1e6, "output_per_1m": 1e6}}))
    async with MockServer(MockConfig(model=MODEL, latency_ms=20)) as mock:
        settings = hybrid(settings, mock, concurrency=2)
        worker_procs.use(mock, model=MODEL, concurrency=2)
        await worker_procs.launch(redis, 2, PROMPTQ_PRICES=str(prices))
        async with Producer.from_url(settings.redis_url_or_default, settings=settings) as p:
            batch = await p.submit(prompts(200), max_cost_usd=40)
            stats = await batch.wait(timeout_s=60)
            info = await batch.info()
    lines = await lines_of(redis, batch.id)
    paid = [line for line in lines.values() if line["error"] is None]
    per_request = max(line["response"]["body"]["usage"]["total_tokens"] for line in paid)
    assert info.status is Status.FAILED
    assert "budget" in (info.reason or "")
    assert stats.errors_by_code.get("budget_exceeded", 0) > 100
    assert stats.cost_usd is not None
    assert stats.cost_usd >= 40
    # at most what the 2 x 2 slots (and the results they had not written yet) had in flight
    assert stats.cost_usd < 40 + 8 * per_request
    assert stats.cost_usd == pytest.approx(sum(
        float(line["response"]["body"]["usage"]["total_tokens"]) for line in paid))  # fmt: skip


async def test_the_cache_answers_identical_requests_once_across_workers(
    redis: ArqRedis, settings: Settings, worker_procs: WorkerProcs
) -> None:
    async with MockServer(MockConfig(model=MODEL, latency_ms=300)) as mock:
        settings = hybrid(settings, mock)
        worker_procs.use(mock, model=MODEL)
        await worker_procs.launch(redis, 2)
        items = [{"custom_id": f"q{i}", "prompt": f"same question {i % 4}"} for i in range(24)]
        async with Producer.from_url(settings.redis_url_or_default, settings=settings) as p:
            first = await p.submit(items, cache_ttl_s=60)
            first_stats = await first.wait(timeout_s=30)
            calls_first = mock.stats.requests
            again = await p.submit(items[:4], cache_ttl_s=60)
            again_stats = await again.wait(timeout_s=30)
            uncached = await p.submit(items[:4])  # off unless asked for
            await uncached.wait(timeout_s=30)
        calls_total = mock.stats.requests
    lines = await lines_of(redis, first.id)
    assert calls_first == 4  # 24 requests, 4 distinct: the other 20 waited for those
    assert first_stats.cached == 20
    assert first_stats.succeeded == 24
    assert sum(1 for line in lines.values() if line.get("cached")) == 20
    assert again_stats.cached == 4
    assert calls_total == 8  # the uncached batch went upstream
    for line in lines.values():
        n = int(line["custom_id"][1:]) % 4
        assert line["response"]["body"]["choices"][0]["message"]["content"] == (
            f"echo: same question {n}"
        )
    # paid once per distinct request: cached answers cost nothing
    assert first_stats.cost_usd == pytest.approx(
        batch_cost({c: line for c, line in lines.items() if not line.get("cached")}, batch=False),
        abs=1e-8,
    )


async def test_a_result_line_of_every_route_has_the_same_shape(
    redis: ArqRedis, settings: Settings
) -> None:
    async with MockServer(MockConfig(model=MODEL)) as mock:
        settings = hybrid(settings, mock)
        async with in_process_worker(settings), Producer(redis, settings=settings) as p:
            realtime = await p.submit(prompts(2), cache_ttl_s=60)
            await realtime.wait(timeout_s=20)
            cached = await p.submit(prompts(1), cache_ttl_s=60)
            await cached.wait(timeout_s=20)
            api = await p.submit(prompts(3, fate={2: "expire"}), route="batch-api",
                                 deadline_s=600)  # fmt: skip
            await api.wait(timeout_s=20)
            held = await p.submit(prompts(2, fate={1: "hold"}), route="batch-api")

            async def running() -> bool:
                return (await held.info(with_stats=False)).status is Status.IN_PROGRESS

            await wait_until(running, what="the provider batch to run")
            await held.cancel()
            await held.wait(timeout_s=20)
    samples = {
        "realtime": (await lines_of(redis, realtime.id))["q0"],
        "cached": (await lines_of(redis, cached.id))["q0"],
        "batch-api": (await lines_of(redis, api.id))["q0"],
        "fallback": (await lines_of(redis, api.id))["q2"],
        "cancelled": (await lines_of(redis, held.id))["q1"],
    }
    for name, line in samples.items():
        assert tuple(k for k in line if k != "cached") == FIELDS, name
        Result.model_validate(line)
    assert samples["cached"]["cached"] is True
    assert samples["cached"]["attempts"] == 0
    assert samples["batch-api"]["route"] == "batch-api"
    assert samples["fallback"]["route"] == "realtime"
    assert samples["cancelled"]["error"]["code"] == "batch_cancelled"


# -- the CLI and the HTTP API ------------------------------------------------------------


async def _promptq(*args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    import os
    import sys

    full = {k: v for k, v in os.environ.items() if not k.startswith("PROMPTQ_")}
    full.update(env or {})
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "promptq", *args, env=full,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_run_with_route_batch_api_and_a_deadline_from_the_cli(tmp_path: Path) -> None:
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps(p) + "\n" for p in prompts(5, fate={4: "hold"})))
    out = tmp_path / "out.jsonl"
    async with MockServer(MockConfig(model=MODEL)) as mock:
        code, stdout, stderr = await _promptq(
            "run", str(src), "-o", str(out), "--route", "batch-api", "--deadline", "2s",
            "--upstream-url", mock.url, "--model", MODEL, env=POLL,
        )  # fmt: skip
        assert code == 0, stderr
    lines = {line["custom_id"]: line for line in map(json.loads, out.read_text().splitlines())}
    assert [lines[f"q{i}"]["route"] for i in range(5)] == ["batch-api"] * 4 + ["realtime"]
    assert "saved (batch API)" in stdout
    assert "cost" in stdout
    assert "$" in stdout


async def test_policy_flags_are_checked_before_anything_starts(tmp_path: Path) -> None:
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps({"prompt": "hi"}) + "\n")
    code, _, stderr = await _promptq("run", str(src), "-o", str(tmp_path / "o"), "--deadline", "1h")
    assert code == 2
    assert "a deadline goes with --route batch-api" in stderr
    assert "Traceback" not in stderr
    assert "worker" not in stderr
    code, _, stderr = await _promptq("submit", str(src), "--cache", "soon")
    assert code == 2
    assert "'soon' is not a duration" in stderr
    code, _, stderr = await _promptq("submit", str(src), "--max-cost-usd", "0")
    assert code == 2
    assert "--max-cost-usd" in stderr


async def test_the_http_api_takes_the_route_in_the_batch_metadata(
    redis: ArqRedis, settings: Settings
) -> None:
    import aiohttp
    from aiohttp.test_utils import TestClient

    async with MockServer(MockConfig(model=MODEL)) as mock:
        settings = hybrid(settings, mock, api_token=SecretStr("t"))
        data = "".join(
            json.dumps({"custom_id": f"q{i}", "method": "POST", "url": "/v1/chat/completions",
                        "body": {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}})
            + "\n" for i in range(3)
        ).encode()  # fmt: skip
        client = TestClient(TestServer(create_app(settings)), headers={"Authorization": "Bearer t"})
        async with client, in_process_worker(settings):
            form = aiohttp.FormData()
            form.add_field("purpose", "batch")
            form.add_field("file", data, filename="in.jsonl")
            file_id = (await (await client.post("/v1/files", data=form)).json())["id"]
            create = {"input_file_id": file_id, "endpoint": "/v1/chat/completions",
                      "completion_window": "24h"}  # fmt: skip
            for bad, param in (
                ({"promptq_route": "cheap"}, "metadata.promptq_route"),
                ({"promptq_deadline": "1h"}, "metadata.promptq_deadline"),
                ({"promptq_route": "batch-api", "promptq_deadline": "soon"},
                 "metadata.promptq_deadline"),
                ({"promptq_max_cost": "1"}, "metadata.promptq_max_cost"),
            ):  # fmt: skip
                resp = await client.post("/v1/batches", json={**create, "metadata": bad})
                assert resp.status == 400, bad
                assert (await resp.json())["error"]["param"] == param
            resp = await client.post("/v1/batches", json={
                **create, "metadata": {"promptq_route": "batch-api", "promptq_deadline": "1h",
                                       "promptq_max_cost_usd": "5", "note": "mine"},
            })  # fmt: skip
            assert resp.status == 200, await resp.text()
            batch_id = (await resp.json())["id"]
            async with Producer(redis, settings=settings) as p:
                stats = await p.batch(batch_id).wait(timeout_s=20)
                info = await p.batch(batch_id).info()
    assert stats.succeeded == 3
    assert info.route == "batch-api"
    assert info.max_cost_usd == 5
    assert {line["route"] for line in (await lines_of(redis, batch_id)).values()} == {"batch-api"}


async def test_promptq_run_takes_the_route_and_a_budget_in_the_embedded_mode() -> None:
    import promptq

    async with MockServer(MockConfig(model=MODEL)) as mock:
        run = await promptq.arun(
            [f"question {i}" for i in range(6)],
            route="batch-api",
            max_cost_usd=10,
            upstream_url=mock.url,
            model=MODEL,
            batch_api_poll_s=0.2,
            batch_api_max_lines=4,
        )
        assert mock.stats.batch_calls["create"] == 2
    assert [r.route for r in run.results] == ["batch-api"] * 6
    assert run.results[5].content == "echo: question 5"
    assert run.stats.saved_usd is not None
    assert run.stats.saved_usd > 0
