"""Tests of the mock OpenAI-compatible upstream, over real HTTP on 127.0.0.1."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import orjson
import pytest
from multidict import CIMultiDictProxy

from promptq.mock import (
    DirectiveError,
    MockConfig,
    MockServer,
    MockStats,
    expected_content,
    serve_forever,
)
from promptq.mock._directives import Directives, parse_directives

from .conftest import wait_until


def chat(text: Any, **extra: Any) -> dict[str, Any]:
    return {"model": "gpt-test", "messages": [{"role": "user", "content": text}], **extra}


async def post(
    session: aiohttp.ClientSession, server: MockServer, body: Any
) -> tuple[int, dict[str, Any], CIMultiDictProxy[str]]:
    data = body if isinstance(body, bytes) else orjson.dumps(body)
    async with session.post(f"{server.url}/chat/completions", data=data) as resp:
        return resp.status, orjson.loads(await resp.read()), resp.headers


async def post_raw(
    session: aiohttp.ClientSession, server: MockServer, body: dict[str, Any]
) -> tuple[int, bytes]:
    async with session.post(f"{server.url}/chat/completions", json=body) as resp:
        return resp.status, await resp.read()


async def post_with_timeout(
    session: aiohttp.ClientSession, server: MockServer, body: dict[str, Any], seconds: float
) -> None:
    short = aiohttp.ClientTimeout(total=seconds)
    async with session.post(f"{server.url}/chat/completions", json=body, timeout=short) as resp:
        await resp.read()


async def until(predicate: Callable[[], bool], limit_s: float = 2.0) -> None:
    """Yield to the loop until ``predicate()`` holds (bounded; no fixed sleeps)."""
    deadline = time.monotonic() + limit_s
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.005)


def assert_error(payload: dict[str, Any], *, type_: str, code: str | None) -> None:
    error = payload["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str)
    assert error["message"]
    assert error["type"] == type_
    assert error["code"] == code


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as client:
        yield client


@pytest.fixture
async def server() -> AsyncIterator[MockServer]:
    async with MockServer(MockConfig(seed=1)) as mock:
        yield mock


# -- success ------------------------------------------------------------------------


async def test_success_shape(server: MockServer, session: aiohttp.ClientSession) -> None:
    body = chat("hello there")
    status, payload, headers = await post(session, server, body)
    assert status == 200
    assert headers["x-request-id"].startswith("req_")
    assert set(payload) == {"id", "object", "created", "model", "choices", "usage"}
    assert payload["id"].startswith("chatcmpl-")
    assert payload["object"] == "chat.completion"
    assert isinstance(payload["created"], int)
    assert payload["model"] == "gpt-test"
    assert payload["choices"] == [
        {
            "index": 0,
            "message": {"role": "assistant", "content": "echo: hello there", "refusal": None},
            "logprobs": None,
            "finish_reason": "stop",
        }
    ]
    assert payload["choices"][0]["message"]["content"] == expected_content(body)
    usage = payload["usage"]
    assert usage["prompt_tokens"] >= 1
    assert usage["completion_tokens"] >= 1
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


async def test_content_parts_and_default_model(
    server: MockServer, session: aiohttp.ClientSession
) -> None:
    body = {
        "messages": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": [{"type": "text", "text": "part one"}]},
            {"role": "assistant", "content": None},
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "a"},
                    {"type": "image_url", "image_url": {"url": "x"}},
                    {"type": "text", "text": "b"},
                ],
            },
        ]
    }
    status, payload, _ = await post(session, server, body)
    assert status == 200
    assert payload["model"] == "mock-gpt"
    assert payload["choices"][0]["message"]["content"] == expected_content(body) == "echo: a\nb"


def test_expected_content_rules() -> None:
    assert expected_content(chat("x" * 500)) == "echo: " + "x" * 200
    no_user = {"messages": [{"role": "system", "content": "sys"}]}
    assert expected_content(no_user) == "echo: sys"
    assert expected_content({"messages": "junk"}) == "echo: "
    assert expected_content(chat(42)) == "echo: "


async def test_models_and_unknown_route(server: MockServer, session: aiohttp.ClientSession) -> None:
    async with session.get(f"{server.url}/models") as resp:
        assert resp.status == 200
        payload = await resp.json()
    assert payload["object"] == "list"
    assert payload["data"][0]["id"] == "mock-gpt"
    async with session.get(f"{server.url}/nope") as resp:
        assert resp.status == 404
        assert_error(await resp.json(), type_="invalid_request_error", code=None)


# -- validation ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "param"),
    [
        # as OpenAI answers a body that is not JSON: no param
        (b"not json", None),
        (b"", None),
        (b"\xff\xfe", None),
        (b"[1, 2]", "messages"),
        ({"model": "m"}, "messages"),
        ({"messages": []}, "messages"),
        ({"messages": "hi"}, "messages"),
        ({"messages": ["hi"]}, "messages"),
        ({"messages": [{"role": "user", "content": "hi"}], "model": 3}, "model"),
    ],
)
async def test_bad_bodies_get_400(
    server: MockServer,
    session: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
    body: Any,
    param: str | None,
) -> None:
    status, payload, _ = await post(session, server, body)
    assert status == 400
    assert_error(payload, type_="invalid_request_error", code=None)
    assert payload["error"]["param"] == param
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


async def test_stream_is_refused_where_not_served(
    server: MockServer, session: aiohttp.ClientSession
) -> None:
    url = server.url + "/completions"
    async with session.post(url, json={"prompt": "hi", "stream": True}) as resp:
        payload = await resp.json()
    assert resp.status == 400
    assert "stream" in payload["error"]["message"].lower()


def sse_data(text: str) -> list[str]:
    return [line.removeprefix("data: ") for line in text.split("\n") if line.startswith("data: ")]


async def test_chat_streams_the_same_content_with_usage_and_done(
    session: aiohttp.ClientSession,
) -> None:
    async with MockServer(MockConfig(stream_chunks=5)) as mock:
        body = {**chat("stream me please"), "stream": True,
                "stream_options": {"include_usage": True}}  # fmt: skip
        async with session.post(mock.url + "/chat/completions", json=body) as resp:
            assert resp.headers["Content-Type"] == "text/event-stream"
            data = sse_data(await resp.text())
    assert data[-1] == "[DONE]"
    chunks = [json.loads(d) for d in data[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == expected_content(chat("stream me please"))
    assert sum(1 for c in chunks if c["choices"] and c["choices"][0]["delta"].get("content")) == 5
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"]["total_tokens"] > 0
    assert mock.stats.streams == 1


async def test_responses_stream_typed_events_and_match_the_plain_answer(
    session: aiohttp.ClientSession,
) -> None:
    async with MockServer() as mock:
        url = mock.url + "/responses"
        async with session.post(url, json={"model": "m", "input": "say hi"}) as resp:
            plain = await resp.json()
        async with session.post(url, json={"model": "m", "input": "say hi", "stream": True}) as r:
            text = await r.text()
    events = [
        line.removeprefix("event: ") for line in text.split("\n") if line.startswith("event: ")
    ]
    payloads = [json.loads(d) for d in sse_data(text)]
    assert events[0] == "response.created"
    assert events[-1] == "response.completed"
    assert [p["type"] for p in payloads] == events
    assert [p["sequence_number"] for p in payloads] == list(range(len(payloads)))
    deltas = "".join(p["delta"] for p in payloads if p["type"] == "response.output_text.delta")
    assert deltas == plain["output"][0]["content"][0]["text"] == "echo: say hi"
    assert payloads[-1]["response"]["usage"] == plain["usage"]


async def test_a_stream_cut_midway_and_a_client_that_leaves(
    session: aiohttp.ClientSession,
) -> None:
    async with MockServer(MockConfig(stream_chunks=20, stream_interval_ms=20)) as mock:
        body = {**chat("long story [[mock cut=3]]"), "stream": True}
        async with session.post(mock.url + "/chat/completions", json=body) as resp:
            with pytest.raises(aiohttp.ClientPayloadError):
                await resp.read()
        assert mock.stats.drops == 1
        body = {**chat("long story"), "stream": True}
        async with session.post(mock.url + "/chat/completions", json=body) as resp:
            await resp.content.readline()  # the first event, then leave

        async def cancelled() -> bool:
            return mock.stats.streams_cancelled == 1

        await wait_until(cancelled, what="the mock to see the client leave")


async def test_bad_directive_gets_400(server: MockServer, session: aiohttp.ClientSession) -> None:
    for text in ("[[mock status=abc]]", "[[mock bogus=1]]", "[[mock fail=2]]", "[[mock x]]"):
        status, payload, _ = await post(session, server, chat(text))
        assert status == 400, text
        assert "mock directive" in payload["error"]["message"]


# -- directives ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "type_", "code"),
    [
        (400, "invalid_request_error", "invalid_request_error"),
        (401, "invalid_request_error", "invalid_api_key"),
        (403, "permission_error", None),
        (404, "invalid_request_error", "model_not_found"),
        (429, "requests", "rate_limit_exceeded"),
        (500, "server_error", "server_error"),
        (502, "server_error", "server_error"),
        (503, "server_error", "server_error"),
    ],
)
async def test_status_directive(
    server: MockServer, session: aiohttp.ClientSession, status: int, type_: str, code: str | None
) -> None:
    body = chat(f"hi [[mock status={status}]]")
    for _ in range(2):  # without fail=K every attempt gets it
        got, payload, headers = await post(session, server, body)
        assert got == status
        assert_error(payload, type_=type_, code=code)
        assert payload["error"]["param"] is None
        assert "retry-after" not in headers


async def test_quota_directive(server: MockServer, session: aiohttp.ClientSession) -> None:
    status, payload, _ = await post(session, server, chat("[[mock quota=1]]"))
    assert status == 429
    assert_error(payload, type_="insufficient_quota", code="insufficient_quota")


async def test_fail_k_then_success(server: MockServer, session: aiohttp.ClientSession) -> None:
    body = chat("hello [[mock status=500 fail=2]]")
    statuses = [(await post(session, server, body))[0] for _ in range(4)]
    assert statuses == [500, 500, 200, 200]
    other = chat("other [[mock status=503 fail=1]]")  # counted separately
    assert [(await post(session, server, other))[0] for _ in range(2)] == [503, 200]
    assert server.stats.responses_by_status == {500: 2, 200: 3, 503: 1}
    server.reset()  # forgets attempt counts too
    assert (await post(session, server, body))[0] == 500


async def test_retry_after_headers(server: MockServer, session: aiohttp.ClientSession) -> None:
    text = "[[mock status=429 retry_after=1.5 retry_after_ms=1500]]"
    status, payload, headers = await post(session, server, chat(text))
    assert status == 429
    assert headers["retry-after"] == "1.5"
    assert headers["retry-after-ms"] == "1500"
    assert payload["error"]["message"].endswith("Please try again in 1.5s.")
    status, _, headers = await post(session, server, chat("[[mock status=503 retry_after=2]]"))
    assert status == 503
    assert headers["retry-after"] == "2"
    assert "retry-after-ms" not in headers


async def test_malformed_directive(server: MockServer, session: aiohttp.ClientSession) -> None:
    body = orjson.dumps(chat("[[mock malformed=1 fail=1]]"))
    async with session.post(f"{server.url}/chat/completions", data=body) as resp:
        assert resp.status == 200
        raw = await resp.read()
    with pytest.raises(orjson.JSONDecodeError):
        orjson.loads(raw)
    async with session.post(f"{server.url}/chat/completions", data=body) as resp:
        assert resp.status == 200
        assert (await resp.json())["object"] == "chat.completion"
    assert server.stats.malformed == 1


async def test_drop_directive(
    server: MockServer, session: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    with pytest.raises(aiohttp.ClientConnectionError):
        await post(session, server, chat("[[mock drop=1]]"))
    assert server.stats.drops == 1
    assert (await post(session, server, chat("after drop")))[0] == 200
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


async def test_hang_times_out_client_and_shutdown_is_fast(caplog: pytest.LogCaptureFixture) -> None:
    mock = MockServer()
    async with mock, aiohttp.ClientSession() as client:
        with pytest.raises(asyncio.TimeoutError):
            await post_with_timeout(client, mock, chat("[[mock hang=1]]"), 0.3)
        # A second hang whose client is still waiting when the server stops.
        pending = asyncio.create_task(post(client, mock, chat("again [[mock hang=1]]")))
        await until(lambda: mock.stats.hangs == 2)
        started = time.monotonic()
        await mock.stop()
        assert time.monotonic() - started < 1.0
        with pytest.raises(aiohttp.ClientConnectionError):
            await pending
    assert mock.stats.in_flight == 0
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


async def test_latency_directive_and_option(session: aiohttp.ClientSession) -> None:
    async with MockServer(MockConfig(latency_ms=100)) as mock:
        started = time.monotonic()
        assert (await post(session, mock, chat("slow")))[0] == 200
        assert time.monotonic() - started >= 0.1
        started = time.monotonic()
        assert (await post(session, mock, chat("[[mock latency_ms=0]]")))[0] == 200
        assert time.monotonic() - started < 0.1
    async with MockServer() as mock:
        started = time.monotonic()
        assert (await post(session, mock, chat("[[mock latency_ms=150]]")))[0] == 200
        assert time.monotonic() - started >= 0.15


def test_parse_directives() -> None:
    messages = [
        {"role": "system", "content": "[[mock status=500 latency_ms=5]]"},
        {"role": "user", "content": [{"type": "text", "text": "x [[mock status=502 fail=3]]"}]},
    ]
    assert parse_directives(messages) == Directives(status=502, fail=3, latency_ms=5.0)
    assert parse_directives([{"role": "user", "content": "no marker"}]) is None
    assert parse_directives([{"role": "user", "content": "[[mock]]"}]) == Directives()
    with pytest.raises(DirectiveError):
        parse_directives([{"content": "[[mock status=200]]"}])


# -- random faults ------------------------------------------------------------------


async def test_error_rate_one_gives_all_500(session: aiohttp.ClientSession) -> None:
    async with MockServer(MockConfig(error_rate=1.0)) as mock:
        for i in range(5):
            status, payload, _ = await post(session, mock, chat(f"r{i}"))
            assert status == 500
            assert_error(payload, type_="server_error", code="server_error")
        # Requests with directives are exempt from the random rates.
        assert (await post(session, mock, chat("[[mock]]")))[0] == 200


async def test_seeded_429_mix_is_reproducible(session: aiohttp.ClientSession) -> None:
    config = MockConfig(rate_429=0.5, retry_after_s=1.5, seed=7)
    runs = []
    for _ in range(2):
        async with MockServer(config) as mock:
            runs.append([(await post(session, mock, chat(f"r{i}")))[0] for i in range(30)])
    assert runs[0] == runs[1]
    assert set(runs[0]) == {200, 429}
    async with MockServer(MockConfig(rate_429=1.0, retry_after_s=1.5)) as mock:
        _, payload, headers = await post(session, mock, chat("x"))
    assert headers["retry-after"] == "1.5"
    assert headers["retry-after-ms"] == "1500"
    assert_error(payload, type_="requests", code="rate_limit_exceeded")
    assert payload["error"]["message"].endswith("Please try again in 1.5s.")


async def test_random_drop_malformed_hang(session: aiohttp.ClientSession) -> None:
    async with MockServer(MockConfig(drop_rate=1.0)) as mock:
        with pytest.raises(aiohttp.ClientConnectionError):
            await post(session, mock, chat("x"))
    async with MockServer(MockConfig(malformed_rate=1.0)) as mock:
        status, raw = await post_raw(session, mock, chat("x"))
        assert status == 200
        with pytest.raises(orjson.JSONDecodeError):
            orjson.loads(raw)
    async with MockServer(MockConfig(hang_rate=1.0)) as mock:
        with pytest.raises(asyncio.TimeoutError):
            await post_with_timeout(session, mock, chat("x"), 0.2)
        assert mock.stats.hangs == 1


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="error_rate"):
        MockConfig(error_rate=1.5)
    with pytest.raises(ValueError, match="sum"):
        MockConfig(error_rate=0.6, rate_429=0.6)
    with pytest.raises(ValueError, match="latency_ms"):
        MockConfig(latency_ms=-1)


# -- stats and concurrency ----------------------------------------------------------


async def test_stats_and_max_in_flight(session: aiohttp.ClientSession) -> None:
    async with MockServer(MockConfig(latency_ms=100)) as mock:
        started = time.monotonic()
        results = await asyncio.gather(*(post(session, mock, chat(f"n{i}")) for i in range(20)))
        elapsed = time.monotonic() - started
        for i, (status, payload, _) in enumerate(results):
            assert status == 200
            assert payload["choices"][0]["message"]["content"] == f"echo: n{i}"
        assert elapsed < 1.0  # served concurrently, not 20 x 100 ms
        assert mock.stats.max_in_flight == 20
        async with session.get(mock.url.removesuffix("/v1") + "/stats") as resp:
            reported = await resp.json()
        assert reported == mock.stats.as_dict()
        assert reported["requests"] == 20
        assert reported["responses_by_status"] == {"200": 20}
        assert reported["in_flight"] == 0
        async with session.post(mock.url.removesuffix("/v1") + "/stats/reset") as resp:
            assert resp.status == 200
        # the gauge of open connections is kept (this session still holds its own)
        held = mock.stats.connections
        assert 1 <= held <= 20
        assert mock.stats == MockStats(connections=held, max_connections=held)


async def test_serve_forever_logs_url(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="promptq.mock")
    task = asyncio.create_task(serve_forever(MockConfig(), host="127.0.0.1", port=0))
    await until(lambda: any("http://127.0.0.1:" in r.getMessage() for r in caplog.records))
    url = next(r.args for r in caplog.records if r.args)
    assert isinstance(url, tuple)
    async with aiohttp.ClientSession() as client, client.get(f"{url[0]}/models") as resp:
        assert resp.status == 200
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_rpm_limit_enforces_an_even_rate_with_ratelimit_headers() -> None:
    async with (
        MockServer(MockConfig(rpm_limit=600)) as server,
        aiohttp.ClientSession() as session,
    ):
        statuses = []
        for i in range(15):  # a burst: the bucket holds one second's worth (10)
            async with session.post(f"{server.url}/chat/completions", json=chat(f"b{i}")) as r:
                statuses.append(r.status)
                if r.status == 429:
                    assert float(r.headers["retry-after"]) > 0
                    limited_headers = dict(r.headers)
                else:
                    assert r.headers["x-ratelimit-limit-requests"] == "600"
        assert statuses.count(200) == 10
        assert statuses.count(429) == 5
        assert limited_headers["x-ratelimit-remaining-requests"] == "0"
        assert server.stats.rate_limited == 5


async def test_max_concurrency_rejects_requests_beyond_capacity() -> None:
    async with (
        MockServer(MockConfig(max_concurrency=3, latency_ms=100)) as server,
        aiohttp.ClientSession() as session,
    ):

        async def one(i: int) -> int:
            async with session.post(f"{server.url}/chat/completions", json=chat(f"c{i}")) as r:
                return r.status

        statuses = await asyncio.gather(*(one(i) for i in range(8)))
        assert statuses.count(200) == 3
        assert statuses.count(429) == 5
