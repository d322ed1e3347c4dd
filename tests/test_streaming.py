"""A drop-in OpenAI endpoint: the official SDK against a real ``promptq serve`` process,
real worker processes and the mock — streaming through the queue (chat and responses),
a client that leaves, a worker killed mid-stream, every lane endpoint, ``models.list()``;
each object checked against the SDK's typed models (pydantic validation)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from pathlib import Path
from typing import Any

import openai
import pytest
from aiohttp.test_utils import TestClient, TestServer
from arq.connections import ArqRedis
from openai import AsyncOpenAI
from openai.types import Completion, CreateEmbeddingResponse, ModerationCreateResponse
from openai.types.chat import ChatCompletion, ChatCompletionChunk
from openai.types.responses import Response
from pydantic import SecretStr

from promptq.api import create_app
from promptq.mock import MockConfig, MockServer, expected_content
from promptq.producer import Producer
from promptq.shared import keys
from promptq.shared.settings import Settings

from .conftest import TOKEN, WorkerProcs, chat_keys, in_process_worker, wait_until

CHUNKS, INTERVAL_MS = 20, 10


@pytest.fixture
async def slow() -> Any:
    """A mock that streams 20 pieces 10 ms apart (the bench's shape)."""
    async with MockServer(MockConfig(stream_chunks=CHUNKS, stream_interval_ms=INTERVAL_MS)) as m:
        yield m


def messages(text: str) -> Any:
    return [{"role": "user", "content": text}]


async def no_keys_but_the_counter(redis: ArqRedis) -> bool:
    left = await chat_keys(redis)
    return all(k.startswith(b"promptq:{chat}:pushed:") for k in left)


async def test_sdk_streams_chat_as_the_upstream_produces_it(
    redis: ArqRedis, client: AsyncOpenAI, worker_procs: WorkerProcs, slow: MockServer
) -> None:
    worker_procs.use(slow)
    await worker_procs.launch(redis, 1)
    asked = messages("tell me a story about queues")
    raw = await client.chat.completions.with_raw_response.create(model="mock-gpt", messages=asked)
    whole = ChatCompletion.model_validate(raw.http_response.json())  # what promptq sent
    arrivals: list[float] = []
    chunks: list[ChatCompletionChunk] = []
    stream = await client.chat.completions.create(
        model="mock-gpt", messages=asked, stream=True, stream_options={"include_usage": True}
    )
    async for chunk in stream:
        arrivals.append(time.monotonic())
        chunks.append(ChatCompletionChunk.model_validate(chunk.model_dump(exclude_unset=True)))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content == expected_content({"messages": asked})
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.total_tokens == whole.usage.total_tokens if whole.usage else False
    # relayed as produced: the first piece came long before the last (20 x 10 ms apart)
    assert arrivals[-1] - arrivals[0] > 0.5 * CHUNKS * INTERVAL_MS / 1000
    assert slow.stats.streams == 1
    await wait_until(lambda: no_keys_but_the_counter(redis), what="the stream's keys to go")


async def test_sdk_streams_responses_with_typed_events(
    redis: ArqRedis, client: AsyncOpenAI, worker_procs: WorkerProcs, slow: MockServer
) -> None:
    worker_procs.use(slow)
    await worker_procs.launch(redis, 1)
    raw = await client.responses.with_raw_response.create(
        model="mock-gpt", input="describe promptq"
    )
    whole = Response.model_validate(raw.http_response.json())
    kinds: list[str] = []
    deltas: list[str] = []
    final: Response | None = None
    stream = await client.responses.create(model="mock-gpt", input="describe promptq", stream=True)
    async for event in stream:
        kinds.append(event.type)
        if event.type == "response.output_text.delta":
            deltas.append(event.delta)
        if event.type == "response.completed":
            final = Response.model_validate(event.response.model_dump(exclude_unset=True))
    assert kinds[0] == "response.created"
    assert kinds[-1] == "response.completed"
    assert "".join(deltas) == whole.output_text == "echo: describe promptq"
    assert final is not None
    assert final.usage is not None
    assert whole.usage is not None
    assert final.usage.total_tokens == whole.usage.total_tokens


async def test_errors_before_the_first_event_are_retried_then_answered_as_json(
    redis: ArqRedis, client: AsyncOpenAI, worker_procs: WorkerProcs, slow: MockServer
) -> None:
    worker_procs.use(slow, max_attempts=4)
    await worker_procs.launch(redis, 1)
    flaky = messages("retry me [[mock status=503 fail=2]]")
    stream = await client.chat.completions.create(model="mock-gpt", messages=flaky, stream=True)
    text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
    assert text == expected_content({"messages": flaky})
    assert slow.stats.requests == 3  # two 503s, retried before any byte reached us
    with pytest.raises(openai.BadRequestError) as refused:
        await client.chat.completions.create(
            model="mock-gpt", messages=messages("no [[mock status=400]]"), stream=True
        )
    assert refused.value.status_code == 400
    # a failure midway cannot be retried (half the answer is out): an error event
    cut = messages("cut short [[mock cut=5]]")
    got: list[Any] = []
    stream = await client.chat.completions.create(model="mock-gpt", messages=cut, stream=True)
    with pytest.raises(openai.APIError, match="stream broke"):
        await _read_into(stream, got)
    assert len(got) == 5


@pytest.mark.parametrize("flavour", ["tgi", "vllm"])
async def test_a_servers_own_failure_midway_is_raised_by_the_sdk(
    redis: ArqRedis, client: AsyncOpenAI, worker_procs: WorkerProcs, flavour: str
) -> None:
    """TGI reports a failure midway as ``{"error": "message"}`` and vLLM follows its
    error with ``[DONE]``: through promptq the SDK raises the server's message either
    way, and the result says the request failed."""
    async with MockServer(MockConfig(flavour=flavour, stream_chunks=6)) as mock:
        worker_procs.use(mock)
        await worker_procs.launch(redis, 1)
        got: list[Any] = []
        stream = await client.chat.completions.create(
            model="mock-gpt", messages=messages("[[mock error_at=3]] go"), stream=True
        )
        with pytest.raises(openai.APIError, match="generation failed midway"):
            await _read_into(stream, got)
        assert len(got) == 3
        await wait_until(lambda: no_keys_but_the_counter(redis), what="the stream's keys to go")


async def test_a_client_that_disconnects_stops_the_upstream_request(
    redis: ArqRedis, client: AsyncOpenAI, worker_procs: WorkerProcs
) -> None:
    async with MockServer(MockConfig(stream_chunks=200, stream_interval_ms=20)) as mock:
        worker_procs.use(mock)
        await worker_procs.launch(redis, 1)
        stream = await client.chat.completions.create(
            model="mock-gpt", messages=messages("a very long answer"), stream=True
        )
        seen = 0
        async for _chunk in stream:
            seen += 1
            if seen == 3:
                break
        await stream.close()
        left = time.monotonic()

        async def upstream_cancelled() -> bool:
            return mock.stats.streams_cancelled == 1

        await wait_until(upstream_cancelled, timeout_s=5, what="the upstream to see the cancel")
        assert time.monotonic() - left < 1.5  # "within a second" plus polling slack
        await wait_until(lambda: no_keys_but_the_counter(redis), what="the stream's keys to go")


async def test_a_client_that_leaves_before_the_first_event_stops_the_upstream_request(
    redis: ArqRedis, base_url: str, worker_procs: WorkerProcs
) -> None:
    """A slow model's long wait for its first token: the client gives up (nothing has
    been written to it yet), and the worker stops the upstream request within about a
    second instead of waiting out the 5 s the mock takes."""
    import aiohttp

    async with MockServer(MockConfig(stream_chunks=5)) as mock:
        worker_procs.use(mock)
        await worker_procs.launch(redis, 1)
        body = {"model": "mock-gpt", "stream": True,
                "messages": messages("[[mock latency_ms=5000]] a slow first token")}  # fmt: skip
        headers = {"Authorization": f"Bearer {TOKEN}"}
        async with aiohttp.ClientSession() as session:
            request = asyncio.create_task(
                session.post(f"{base_url}/chat/completions", json=body, headers=headers)
            )

            async def taken() -> bool:  # a worker runs it: the upstream call is under way
                return bool(await redis.keys(keys.worker_chat("*")))

            await wait_until(taken, what="a worker to take the request")
            request.cancel()  # the client leaves: its connection closes
            with contextlib.suppress(asyncio.CancelledError):
                await request
        left = time.monotonic()
        await wait_until(lambda: no_keys_but_the_counter(redis), what="the request to end")
        # the serve polls its client every 0.5 s, the worker its silent streams every 0.5 s
        assert time.monotonic() - left < 2.5
        assert mock.stats.streams == 0  # the upstream never got to stream


async def test_a_worker_killed_mid_stream_ends_it_with_an_error_event(
    redis: ArqRedis, client: AsyncOpenAI, worker_procs: WorkerProcs, settings: Settings
) -> None:
    async with MockServer(MockConfig(stream_chunks=400, stream_interval_ms=25)) as mock:
        worker_procs.use(mock)
        await worker_procs.launch(redis, 2)
        stream = await client.chat.completions.create(
            model="mock-gpt", messages=messages("a long answer"), stream=True
        )
        got: list[Any] = []

        async def kill_after_three() -> None:
            await wait_until(lambda: _at_least(got, 3), what="3 chunks")
            await _kill_the_streaming_worker(redis, worker_procs)

        killer = asyncio.create_task(kill_after_three())
        async with asyncio.timeout(30):  # never a hang
            with pytest.raises(openai.APIError, match="worker"):
                await _read_into(stream, got)
        await killer
    assert 3 <= len(got) < 400


async def _read_into(stream: Any, got: list[Any]) -> None:
    async for chunk in stream:
        got.append(chunk)


async def _at_least(items: list[Any], n: int) -> bool:
    return len(items) >= n


async def _kill_the_streaming_worker(redis: ArqRedis, procs: WorkerProcs) -> None:
    """SIGKILL the worker whose chat list holds the stream (ids are host-pid-random)."""
    async for key in redis.scan_iter(match=keys.worker_chat("*")):
        if await redis.llen(key):
            pid = int(key.decode().rsplit(":", 1)[1].rsplit("-", 2)[1])
            index = next(i for i, proc in enumerate(procs.procs) if proc.pid == pid)
            procs.kill(index)
            return
    raise AssertionError("no worker holds the stream")


async def test_every_lane_endpoint_and_models_list(
    redis: ArqRedis, client: AsyncOpenAI, worker_procs: WorkerProcs, mock: MockServer
) -> None:
    await worker_procs.launch(redis, 1)
    raw: Any = await client.embeddings.with_raw_response.create(model="mock-gpt", input=["a", "b"])
    embedding = CreateEmbeddingResponse.model_validate(raw.http_response.json())
    assert [d.index for d in embedding.data] == [0, 1]
    raw = await client.completions.with_raw_response.create(model="mock-gpt", prompt="finish this")
    completion = Completion.model_validate(raw.http_response.json())
    assert completion.choices[0].text == "echo: finish this"
    raw = await client.moderations.with_raw_response.create(input="is this fine?")
    moderation = ModerationCreateResponse.model_validate(raw.http_response.json())
    assert moderation.results[0].flagged is False
    response = await client.responses.create(model="mock-gpt", input="hello")
    assert response.output_text == "echo: hello"
    models = [(m.id, m.owned_by) async for m in client.models.list()]
    assert models == [("mock-gpt", "mock")]  # the mock's list via a worker, not the fallback
    with pytest.raises(openai.BadRequestError, match="does not stream"):
        await client.embeddings.create(model="m", input="x", extra_body={"stream": True})
    with pytest.raises(openai.NotFoundError):
        await client.post("/no/such/endpoint", cast_to=dict, body={})


@pytest.mark.parametrize(
    ("url", "body"),
    [
        ("/v1/responses", {"input": "hi"}),
        ("/v1/moderations", {"input": "hi"}),
        ("/v1/embeddings", {"input": "hi"}),
        ("/v1/completions", {"prompt": "hi"}),
    ],
)
async def test_every_endpoint_as_a_batch(
    redis: ArqRedis, settings: Settings, worker_procs: WorkerProcs, url: str, body: Any
) -> None:
    await worker_procs.launch(redis, 1)
    lines = [{"custom_id": f"r{i}", "method": "POST", "url": url,
              "body": {"model": "mock-gpt", **body}} for i in range(5)]  # fmt: skip
    async with Producer.from_url(settings.redis_url_or_default, settings=settings) as p:
        batch = await p.submit(lines)
        stats = await batch.wait(timeout_s=30)
        results = [r async for r in batch.results()]
    assert stats.succeeded == 5
    assert all(r.response is not None and r.response.status_code == 200 for r in results)


async def test_a_batch_line_without_input_is_named(
    settings: Settings, redis: ArqRedis, tmp_path: Path
) -> None:
    path = tmp_path / "bad.jsonl"
    line = {"custom_id": "a", "method": "POST", "url": "/v1/responses", "body": {"model": "m"}}
    path.write_text(json.dumps(line) + "\n")
    async with Producer.from_url(settings.redis_url_or_default, settings=settings) as p:
        with pytest.raises(Exception, match=r"line 1, field 'body.input'"):
            await p.submit_file(path)


async def test_a_stream_past_its_deadline_ends_with_a_timeout_and_stops_upstream(
    redis: ArqRedis, settings: Settings
) -> None:
    """PROMPTQ_API_CHAT_TIMEOUT_S bounds a whole stream: past it the client gets a
    ``timeout`` error event, and the worker stops the upstream request."""
    local = settings.model_copy(update={"api_token": SecretStr("t"), "api_chat_timeout_s": 1.0})
    body = {"model": "m", "stream": True, "messages": messages("a long one")}
    async with MockServer(MockConfig(stream_chunks=200, stream_interval_ms=20)) as mock:
        local = local.model_copy(update={"upstream_url": mock.url})
        async with (
            in_process_worker(local),
            TestClient(TestServer(create_app(local)), headers={"Authorization": "Bearer t"}) as api,
        ):
            resp = await api.post("/v1/chat/completions", json=body)
            text = await resp.text()
            ended = time.monotonic()
            assert resp.status == 200, text
            last = json.loads(text.strip().split("\n\n")[-1].removeprefix("data: "))
            assert last["error"]["code"] == "timeout"

            async def upstream_cancelled() -> bool:
                return mock.stats.streams_cancelled == 1

            await wait_until(upstream_cancelled, timeout_s=5, what="the upstream to see it")
            assert time.monotonic() - ended < 1.5
            await wait_until(lambda: no_keys_but_the_counter(redis), what="the keys to go")


async def test_a_python_backend_answer_is_streamed_as_the_events_asked_for(
    redis: ArqRedis, settings: Settings
) -> None:
    local = settings.model_copy(
        update={"backend": "python:tests.backend_fns:chat_reply", "api_token": SecretStr("t")}
    )
    body = {"model": "mine", "stream": True, "stream_options": {"include_usage": True},
            "messages": [{"role": "user", "content": "hi"}]}  # fmt: skip
    async with (
        in_process_worker(local),
        TestClient(TestServer(create_app(local)), headers={"Authorization": "Bearer t"}) as api,
    ):
        resp = await api.post("/v1/chat/completions", json=body)
        text = await resp.text()
    assert resp.status == 200, text
    assert resp.content_type == "text/event-stream"
    events = [e.removeprefix("data: ") for e in text.split("\n\n") if e]
    assert events[-1] == "[DONE]"
    chunks = [ChatCompletionChunk.model_validate(json.loads(e)) for e in events[:-1]]
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "local: hi"
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.total_tokens == 3


class _Events:
    """A stand-in hub: collects what a relay would write."""

    def __init__(self) -> None:
        self.lines: list[bytes] = []

    def push(self, relay: Any, line: bytes) -> None:
        self.lines.append(line)


async def test_events_split_anywhere_with_crlf_line_ends_are_relayed_whole() -> None:
    from aiohttp import web

    from promptq.worker.backends.http import HttpBackend
    from promptq.worker.relay import StreamRelay

    pieces = [b'data: {"a":1}\r', b'\n\r\ndata: {"b"', b":2}\r\n\r\n", b"data: [DONE]\r\n\r\n"]

    async def handler(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for piece in pieces:
            await resp.write(piece)
            await asyncio.sleep(0.01)  # each piece in its own read (not a condition)
        return resp

    app = web.Application()
    app.router.add_post("/v1/chat/completions", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    backend = HttpBackend(
        base_url=f"http://{host}:{port}/v1", api_key=None, concurrency=1, timeout_s=5,
        keepalive="on",
    )  # fmt: skip
    await backend.start()
    try:
        events = _Events()
        relay = StreamRelay(events, chat_id="x", replica="r")  # type: ignore[arg-type]
        answer = await backend.attempt("/v1/chat/completions", {"stream": True}, relay=relay)
    finally:
        await backend.close()
        await runner.cleanup()
    assert answer.error is None  # it ended in [DONE]
    assert [json.loads(line)["event"] for line in events.lines] == [
        'data: {"a":1}',
        'data: {"b":2}',
        "data: [DONE]",
    ]


def test_the_summary_parses_only_events_that_may_matter() -> None:
    """Content deltas are skipped unparsed; usage (any spacing), errors and a
    response's final state are read; ``"usage": null`` is not usage."""
    from promptq.shared.sse import StreamSummary

    summary = StreamSummary()
    summary.add('data: {"id":"c1","model":"m","choices":[],"usage":null}')  # first: parsed
    summary.add('data: {"id":"c2","choices":[{"delta":{"content":"x"}}],"usage": null}')
    assert (summary.id, summary.usage) == ("c1", None)
    summary.add('data: {"id":"c1","choices":[],"usage":\t {"total_tokens": 7}}')
    assert summary.usage == {"total_tokens": 7}
    summary.add('data: {"error": {"message": "overloaded", "code": "server_error"}}')
    assert summary.error == {"message": "overloaded", "code": "server_error"}
    responses = StreamSummary()
    responses.add('event: response.created\ndata: {"type":"response.created","response":{}}')
    responses.add(
        'event: response.completed\ndata: {"type":"response.completed",'
        '"response":{"id":"resp_1","model":"m","usage":{"total_tokens":3}}}'
    )
    assert responses.body()["object"] == "response"
    assert (responses.id, responses.usage) == ("resp_1", {"total_tokens": 3})
    assert responses.events == 2


async def test_a_lane_stream_hands_over_what_arrived_in_order_then_its_errors() -> None:
    """``take`` returns every item waiting, in order, stopping before an error item,
    which the next call raises; a failed push reaches ``next``."""
    from promptq.api.lane import LaneClosed, LaneStream
    from promptq.shared.errors import QueueFull

    forgotten: list[str] = []

    class Lane:
        def forget_stream(self, chat_id: str) -> None:
            forgotten.append(chat_id)

    stream = LaneStream(Lane(), "s1", deadline=time.monotonic() + 5)  # type: ignore[arg-type]
    async with stream:
        reader = asyncio.create_task(stream.take())
        await asyncio.sleep(0)  # the reader is waiting (not a condition: one loop turn)
        assert not reader.done()
        stream.put({"event": "a"})
        stream.put({"event": "b"})
        stream.put({"closed": True})
        assert await asyncio.wait_for(reader, 5) == [{"event": "a"}, {"event": "b"}]
        with pytest.raises(LaneClosed):
            await stream.take()
    assert forgotten == ["s1"]

    failed = LaneStream(Lane(), "s2", deadline=time.monotonic() + 5)  # type: ignore[arg-type]
    pushed: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
    pushed.add_done_callback(failed.push_done)
    pushed.set_exception(QueueFull("the queue is full", queued=10, limit=10))
    with pytest.raises(QueueFull):
        await failed.next()
    late = LaneStream(Lane(), "s3", deadline=time.monotonic() - 1)  # type: ignore[arg-type]
    with pytest.raises(TimeoutError):
        await late.next()
