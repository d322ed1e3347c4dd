"""Self-hosted servers' answers, read right: every mock flavour's failures through the
real HTTP backend and retry loop (classification and attempt counts), the llama.cpp
flavour's HTTP layer (the keep-alive stall) and promptq's defaults against it."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from arq.connections import ArqRedis
from pydantic import SecretStr

from promptq.mock import MockConfig, MockServer
from promptq.mock._flavours import FLAVOURS, KINDS
from promptq.producer import Producer
from promptq.shared.settings import Settings
from promptq.shared.status import Status
from promptq.worker.backends.http import HttpBackend
from promptq.worker.execute import Executor
from promptq.worker.retry import RetryPolicy, classify

from .conftest import WorkerProcs, in_process_worker

ATTEMPTS = 3
KEY = "sk-right"

#: what promptq makes of each kind of failure, per server: (code, retried?); None: that
#: server answers normally (Ollama truncates long prompts and loads models in-request;
#: llama.cpp and TGI serve their one model whatever the name)
OK = None
EXPECTED: dict[str, dict[str, tuple[str, bool] | None]] = {
    "openai": {
        "context": ("context_length_exceeded", False),
        "invalid": ("invalid_request_error", False),
        "auth": ("invalid_api_key", False),
        "model": ("model_not_found", False),
        "busy": ("server_unavailable", True),
        "loading": ("server_unavailable", True),
        "unsupported": ("not_found", False),
        "too_large": ("context_length_exceeded", False),
        "server": ("server_error", True),
    },
    "vllm": {
        "context": ("context_length_exceeded", False),
        "invalid": ("invalid_request_error", False),
        "auth": ("invalid_api_key", False),
        "model": ("not_found", False),
        "busy": ("server_unavailable", True),
        "loading": ("server_unavailable", True),
        "unsupported": ("not_found", False),
        "too_large": ("context_length_exceeded", False),
        "server": ("server_error", True),
    },
    "ollama": {
        "context": OK,
        "invalid": ("invalid_request_error", False),
        "auth": ("invalid_api_key", False),
        "model": ("not_found", False),
        "busy": ("server_unavailable", True),
        "loading": OK,
        "unsupported": ("not_found", False),
        "too_large": ("context_length_exceeded", False),
        "server": ("server_error", True),
    },
    "llamacpp": {
        "context": ("context_length_exceeded", False),
        "invalid": ("invalid_request_error", False),
        "auth": ("invalid_api_key", False),
        "model": ("not_found", False),
        "busy": ("server_unavailable", True),
        "loading": ("server_unavailable", True),
        "unsupported": ("not_supported", False),
        "too_large": ("invalid_request_error", False),
        "server": ("server_error", True),
    },
    "tgi": {
        "context": ("context_length_exceeded", False),
        "invalid": ("invalid_request_error", False),
        "auth": ("invalid_api_key", False),
        "model": OK,
        "busy": ("overloaded", True),
        "loading": ("server_unavailable", True),
        "unsupported": ("not_found", False),
        "too_large": ("context_length_exceeded", False),
        "server": ("generation_error", True),
    },
}
#: a body that is not JSON: every server refuses it, and a retry cannot help
PARSE_CODE = "invalid_request_error"


class NoSleep:
    async def __call__(self, delay: float) -> None:
        await asyncio.sleep(0)


def executor(url: str, **backend: Any) -> Executor:
    return Executor(
        HttpBackend(
            base_url=url,
            api_key=backend.pop("api_key", None),
            concurrency=backend.pop("concurrency", 8),
            timeout_s=5,
            **backend,
        ),
        policy=RetryPolicy(max_attempts=ATTEMPTS),
        sleep=NoSleep(),
    )


def chat(text: str) -> dict[str, Any]:
    return {"model": "mock-gpt", "messages": [{"role": "user", "content": text}]}


def test_every_flavour_and_kind_has_an_expectation() -> None:
    for flavour in FLAVOURS:
        assert set(EXPECTED[flavour]) | {"parse", "path"} == set(KINDS), flavour


@pytest.mark.parametrize("flavour", FLAVOURS)
async def test_each_failure_is_classified_and_retried_as_that_server_means_it(
    flavour: str,
) -> None:
    async with MockServer(MockConfig(flavour=flavour)) as mock, executor(mock.url) as ex:
        for kind, expected in EXPECTED[flavour].items():
            mock.reset()
            outcome = await ex.execute("/v1/chat/completions", chat(f"[[mock error={kind}]]"))
            if expected is None:
                assert outcome.ok, (flavour, kind, outcome.error)
                continue
            code, retried = expected
            assert outcome.error is not None, (flavour, kind)
            assert outcome.error.code == code, (flavour, kind, outcome.error)
            assert outcome.attempts == (ATTEMPTS if retried else 1), (flavour, kind)
            assert mock.stats.requests == outcome.attempts
        # a retried kind that clears up: the request succeeds on the third attempt
        retried_kind = next(k for k, v in EXPECTED[flavour].items() if v and v[1])
        outcome = await ex.execute(
            "/v1/chat/completions", chat(f"[[mock error={retried_kind} fail=2]]")
        )
        assert outcome.ok
        assert outcome.attempts == 3


@pytest.mark.parametrize("flavour", FLAVOURS)
async def test_natural_failures_bad_json_unknown_path_wrong_key(flavour: str) -> None:
    """The same answers, from real conditions rather than directives."""
    async with (
        MockServer(MockConfig(flavour=flavour, api_key=KEY)) as mock,
        aiohttp.ClientSession(headers={"Authorization": f"Bearer {KEY}"}) as session,
    ):
        async with session.post(f"{mock.url}/chat/completions", data=b"{not json") as resp:
            _, error = classify(resp.status, resp.headers, await resp.read())
        assert error is not None
        assert (error.code, error.retryable) == (PARSE_CODE, False), (flavour, error)
        async with session.post(f"{mock.url}/no/such/path", json=chat("hi")) as resp:
            _, error = classify(resp.status, resp.headers, await resp.read())
        assert error is not None
        assert (error.status_code, error.code, error.retryable) == (404, "not_found", False)
        async with executor(mock.url, api_key=SecretStr("sk-wrong")) as ex:
            outcome = await ex.execute("/v1/chat/completions", chat("hi"))
        assert outcome.error is not None
        assert (outcome.error.code, outcome.attempts) == ("invalid_api_key", 1)
        async with executor(mock.url, api_key=SecretStr(KEY)) as ex:
            assert (await ex.execute("/v1/chat/completions", chat("hi"))).ok


async def test_llamacpp_bodies_are_verbatim_and_context_is_per_slot() -> None:
    """The bodies a real llama-server answered, byte for byte where it matters."""
    async with (
        MockServer(MockConfig(flavour="llamacpp")) as mock,
        aiohttp.ClientSession() as session,
    ):
        async with session.post(f"{mock.url}/chat/completions", json=chat("hi")) as resp:
            assert resp.headers["Keep-Alive"] == "timeout=5, max=100"
            assert resp.headers["Server"] == "llama.cpp"
        long_prompt = "word " * 600  # ~750 tokens by the mock's estimate: over 512
        async with session.post(f"{mock.url}/chat/completions", json=chat(long_prompt)) as resp:
            body = orjson.loads(await resp.read())
            assert resp.headers["Connection"] == "close"  # as llama-server ends every error
        assert resp.status == 400
        assert body["error"]["type"] == "exceed_context_size_error"
        assert body["error"]["n_ctx"] == 512
        assert "exceeds the available context size (512 tokens)" in body["error"]["message"]
        async with session.post(f"{mock.url}/embeddings", json={"input": "hi"}) as resp:
            body = orjson.loads(await resp.read())
        assert resp.status == 501
        assert body == {
            "error": {
                "code": 501,
                "message": "This server does not support embeddings. Start it with `--embeddings`",
                "type": "not_supported_error",
            }
        }
        async with session.get(mock.url.removesuffix("/v1") + "/props") as resp:
            props = orjson.loads(await resp.read())
        assert props["total_slots"] == 4
    async with (
        MockServer(MockConfig(flavour="llamacpp", embeddings=True)) as mock,
        executor(mock.url) as ex,
    ):
        ok = await ex.execute("/v1/embeddings", {"model": "m", "input": ["a", "b"]})
        assert ok.ok
        assert [d["index"] for d in ok.body["data"]] == [0, 1]
        big = await ex.execute("/v1/embeddings", {"model": "m", "input": "word " * 600})
        assert big.error is not None
        assert (big.error.status_code, big.error.code, big.attempts) == (
            500,
            "invalid_request_error",
            1,
        )
        assert "too large to process" in big.error.message


async def _gather(url: str, n: int, concurrency: int) -> float:
    """The baseline: a plain aiohttp gather at the server's parallelism."""
    semaphore = asyncio.Semaphore(concurrency)
    async with aiohttp.ClientSession() as session:

        async def one(i: int) -> None:
            async with semaphore, session.post(f"{url}/chat/completions", json=chat(f"g{i}")) as r:
                assert r.status == 200
                await r.read()

        started = time.monotonic()
        await asyncio.gather(*(one(i) for i in range(n)))
        return time.monotonic() - started


async def _through(ex: Executor, n: int) -> float:
    started = time.monotonic()
    outcomes = await asyncio.gather(
        *(ex.execute("/v1/chat/completions", chat(f"p{i}")) for i in range(n))
    )
    assert all(o.ok for o in outcomes)
    return time.monotonic() - started


async def test_idle_keepalive_connections_stall_llamacpp_unless_closed() -> None:
    """The mock holds a thread per open connection as llama-server does: 64 kept-alive
    connections make requests wait out the keep-alive timeout; promptq's default (auto)
    notices the Keep-Alive announcement and stops keeping connections idle."""
    config = MockConfig(flavour="llamacpp", latency_ms=20, keepalive_s=1.0)
    async with MockServer(config) as mock:
        baseline = await _gather(mock.url, 40, 4)
        async with executor(mock.url, concurrency=64, keepalive="on") as ex:
            stalled = await _through(ex, 40)
        async with executor(mock.url, concurrency=64) as ex:
            assert ex.backend.close_connections is False
            fine = await _through(ex, 40)
            assert ex.backend.close_connections is True
            again = await _through(ex, 40)  # every connection now closes after its answer
    assert stalled > config.keepalive_s  # the test can fail: the stall is real
    assert fine < 3 * baseline + 0.2
    assert again < 3 * baseline + 0.2


async def test_promptq_defaults_against_llamacpp_are_within_3x_of_a_plain_gather(
    redis: ArqRedis, settings: Settings, worker_procs: WorkerProcs, tmp_path: Path
) -> None:
    """Two real workers with the default concurrency (64 each) against a llama.cpp-like
    server (4 slots, 8 HTTP threads, 5 s keep-alive): 40 prompts as fast as a gather at 4."""
    async with MockServer(MockConfig(flavour="llamacpp", latency_ms=50)) as mock:
        baseline = await _gather(mock.url, 40, 4)
        worker_procs.use(mock, concurrency=64)
        await worker_procs.launch(redis, 2)
        async with Producer.from_url(settings.redis_url_or_default, settings=settings) as p:
            times = []
            for _ in range(2):  # the second batch finds the workers' connections as left
                started = time.monotonic()
                batch = await p.submit([f"q{i}" for i in range(40)])
                stats = await batch.wait(timeout_s=60)
                times.append(time.monotonic() - started)
                assert (await batch.info()).status is Status.COMPLETED
                assert stats.succeeded == 40
    assert max(times) < 3 * baseline, (times, baseline)
    log = worker_procs.log_text()
    assert "runs 4 request(s) at once" in log
    assert "announces Keep-Alive" in log


async def test_a_501_not_supported_stops_the_batch_and_says_how_to_fix_the_server(
    redis: ArqRedis, settings: Settings, tmp_path: Path
) -> None:
    async with MockServer(MockConfig(flavour="llamacpp")) as mock:
        settings = settings.model_copy(update={"upstream_url": mock.url, "concurrency": 1})
        path = tmp_path / "embed.jsonl"
        lines = [
            {"custom_id": f"e{i}", "method": "POST", "url": "/v1/embeddings",
             "body": {"model": "mock-gpt", "input": f"text {i}"}}
            for i in range(30)
        ]  # fmt: skip
        path.write_bytes(b"\n".join(orjson.dumps(line) for line in lines) + b"\n")
        async with (
            in_process_worker(settings),
            Producer.from_url(settings.redis_url_or_default, settings=settings) as p,
        ):
            batch = await p.submit_file(path)
            await batch.wait(timeout_s=30)
            info = await batch.info()
            results = [r async for r in batch.results()]
        sent = mock.stats.requests
    assert info.status is Status.FAILED
    assert info.reason is not None
    assert "--embeddings" in info.reason
    assert len(results) == 30
    assert all(r.error is not None for r in results)
    assert {r.error.code for r in results if r.error} <= {"not_supported"}
    assert sent < 30  # the stop spared the rest
    assert sum(r.attempts for r in results) == sent


# -- streams -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("event", "type_", "code"),
    [
        ('data: {"error": {"message": "boom", "type": "server_error", "param": null, '
         '"code": "x"}}', "server_error", "x"),
        ('data: {"error": {"message": "boom", "type": "InternalServerError", "param": null, '
         '"code": 500}}', "InternalServerError", 500),  # vLLM since 0.10.1
        ('data: {"object": "error", "message": "boom", "type": "BadRequestError", '
         '"param": null, "code": 400}', "BadRequestError", 400),  # vLLM before
        ('data: {"error": {"code": 500, "message": "boom", "type": "server_error"}}',
         "server_error", 500),  # llama.cpp
        ('error: {"code": 500, "message": "boom", "type": "unavailable_error"}',
         "unavailable_error", 500),  # older llama.cpp
        ('data: {"error": "boom", "error_type": "generation"}', "server_error",
         "generation"),  # TGI
    ],
)  # fmt: skip
def test_every_servers_stream_error_shape_is_read_as_openais(
    event: str, type_: str, code: object
) -> None:
    from promptq.shared.sse import upstream_error

    assert upstream_error(event) == {"message": "boom", "type": type_, "param": None,
                                     "code": code}  # fmt: skip


def test_content_that_mentions_errors_and_comments_are_not_errors() -> None:
    from promptq.shared.sse import is_comment, upstream_error

    chunk = 'data: {"choices": [{"delta": {"content": "no \\"error\\" here"}}]}'
    assert upstream_error(chunk) is None
    assert upstream_error('event: error\ndata: {"type": "error", "message": "m"}') is None
    assert is_comment(":")
    assert is_comment(": ping\n:")
    assert not is_comment(": ping\ndata: x")


class _Relayed:
    """A stream's events as a worker hands them to its hub."""

    def __init__(self) -> None:
        self.lines: list[bytes] = []

    def push(self, relay: Any, line: bytes) -> None:
        self.lines.append(line)

    def events(self) -> list[str]:
        return [orjson.loads(line)["event"] for line in self.lines]


async def _stream_from(flavour: str, content: str) -> tuple[list[str], Any, Any]:
    """One streamed chat completion from the ``flavour`` mock, through the real backend:
    (relayed events, the attempt, the stream's summary)."""
    from promptq.worker.relay import StreamRelay

    async with MockServer(MockConfig(flavour=flavour, stream_chunks=4)) as mock:
        backend = HttpBackend(base_url=mock.url, api_key=None, concurrency=1, timeout_s=5)
        await backend.start()
        relayed = _Relayed()
        relay = StreamRelay(relayed, chat_id="c1", replica="r")  # type: ignore[arg-type]
        body = {"model": "m", "stream": True, "stream_options": {"include_usage": True},
                "messages": [{"role": "user", "content": content}]}  # fmt: skip
        try:
            attempt = await backend.attempt("/v1/chat/completions", body, relay=relay)
        finally:
            await backend.close()
    return relayed.events(), attempt, relay.summary


@pytest.mark.parametrize("flavour", FLAVOURS)
async def test_each_flavours_stream_reaches_the_client_as_openai_chunks(flavour: str) -> None:
    """Each server's chunks (its fingerprint, its nulls, llama.cpp's timings and
    keep-alive pings) are relayed as they are, read by the SDK's own models; pings are
    not relayed; the usage is summed up."""
    from openai.types.chat import ChatCompletionChunk

    from promptq.mock import expected_content

    events, attempt, summary = await _stream_from(flavour, "tell me")
    assert attempt.error is None
    assert events[-1] == "data: [DONE]"
    assert not any(e.startswith(":") for e in events)
    chunks = [ChatCompletionChunk.model_validate_json(e[6:]) for e in events[:-1]]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == expected_content({"messages": [{"role": "user", "content": "tell me"}]})
    assert chunks[-1].usage is not None
    assert summary.usage == chunks[-1].usage.model_dump(exclude_none=True)


@pytest.mark.parametrize("flavour", FLAVOURS)
async def test_each_flavours_failure_midway_reaches_the_client_in_openais_shape(
    flavour: str,
) -> None:
    """vLLM, Ollama, llama.cpp and TGI each report a failure midway in their own shape:
    the client gets OpenAI's (which the SDKs raise), nothing after it (vLLM's [DONE]),
    and the attempt fails for good with the server's message."""
    events, attempt, _summary = await _stream_from(flavour, "[[mock error_at=3]] tell me")
    *before, last = events
    assert "[DONE]" not in "".join(events)
    error = orjson.loads(last.removeprefix("data: "))["error"]
    assert error["message"] == "generation failed midway (mock error_at)"
    assert set(error) == {"message", "type", "param", "code"}
    assert all("error" not in e for e in before)
    assert attempt.error is not None
    assert not attempt.error.retryable
    assert "generation failed midway" in str(attempt.error)
