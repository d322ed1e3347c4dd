"""Property-based fuzzing of the HTTP endpoints: whatever a client sends, the answer is a
clear OpenAI-shaped error or a correct result, never a 500 or a traceback."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestClient, TestServer
from arq.connections import ArqRedis
from hypothesis import HealthCheck, example, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st
from pydantic import SecretStr

from promptq.api import create_app
from promptq.shared.settings import Settings

from .conftest import in_process_worker

TOKEN = "fuzz-token"

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4)
    ),
    max_leaves=12,
)
batch_bodies = st.dictionaries(
    st.sampled_from(["input_file_id", "endpoint", "completion_window", "metadata", "x"]),
    json_values | st.sampled_from(["/v1/chat/completions", "24h", "file-" + "0" * 32]),
    max_size=5,
)
chat_bodies = st.dictionaries(
    st.sampled_from(["model", "messages", "stream", "max_tokens", "temperature", "n"]),
    json_values
    | st.just([{"role": "user", "content": "hi"}])
    | st.lists(st.dictionaries(st.sampled_from(["role", "content"]), json_values), max_size=3),
    max_size=5,
)
fuzz = hsettings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)


@pytest.fixture
async def api(redis: ArqRedis, settings: Settings) -> AsyncIterator[TestClient]:
    # a worker runs: a valid chat request is answered by the mock upstream
    app = create_app(
        settings.model_copy(
            update={"api_token": SecretStr(TOKEN), "api_chat_timeout_s": 30, "api_max_lines": 20}
        )
    )
    headers = {"Authorization": f"Bearer {TOKEN}"}
    async with (
        in_process_worker(settings),
        TestClient(TestServer(app), headers=headers) as client,
    ):
        yield client


async def check(resp: aiohttp.ClientResponse, *, allowed: set[int]) -> dict[str, Any]:
    text = await resp.text()
    assert resp.status in allowed, (resp.status, text)
    assert "Traceback" not in text
    if resp.content_type == "text/event-stream":  # "stream": true, answered as events
        events = [e for e in text.split("\n\n") if e]
        assert events[-1] == "data: [DONE]", events[-1]
        chunks = [json.loads(e.removeprefix("data: ")) for e in events[:-1]]
        assert all(c["object"] == "chat.completion.chunk" for c in chunks)
        content = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
        return {"object": "chat.completion", "choices": [{"message": {"content": content}}]}
    body = json.loads(text)
    if resp.status >= 400:
        assert set(body["error"]) == {"message", "type", "param", "code"}
        assert body["error"]["message"]
    return dict(body)


@fuzz
@given(body=batch_bodies)
async def test_any_batch_create_body(api: TestClient, body: dict[str, Any]) -> None:
    resp = await api.post("/v1/batches", json=body)
    await check(resp, allowed={200, 400, 404, 429})


@fuzz
@given(raw=st.binary(max_size=200))
async def test_any_bytes_as_a_json_body(api: TestClient, raw: bytes) -> None:
    for path in ("/v1/batches", "/v1/chat/completions"):
        resp = await api.post(path, data=raw, headers={"Content-Type": "application/json"})
        await check(resp, allowed={200, 400, 404, 429})


@fuzz
@given(body=chat_bodies)
@example(body={"model": "mock-gpt", "messages": [{"role": "user", "content": "hi"}]})
async def test_any_chat_body(api: TestClient, body: dict[str, Any]) -> None:
    resp = await api.post("/v1/chat/completions", json=body)
    answer = await check(resp, allowed={200, 400})  # valid bodies are answered, not 504
    if resp.status == 200:
        assert answer["object"] == "chat.completion"
        assert answer["choices"][0]["message"]["content"].startswith("echo: ")


@fuzz
@given(content=st.binary(max_size=300), purpose=st.sampled_from(["batch", "fine-tune", ""]))
async def test_any_upload(api: TestClient, content: bytes, purpose: str) -> None:
    form = aiohttp.FormData()
    form.add_field("purpose", purpose)
    form.add_field("file", content, filename="in.jsonl", content_type="application/jsonl")
    resp = await api.post("/v1/files", data=form)
    body = await check(resp, allowed={200, 400, 413})
    if resp.status == 200:  # accepted as a file, as OpenAI does; validated at batch create
        assert body["bytes"] == len(content)


@fuzz
@given(file_id=st.text(max_size=40), batch_id=st.text(max_size=40))
async def test_any_ids_in_paths(api: TestClient, file_id: str, batch_id: str) -> None:
    from urllib.parse import quote

    for path in (
        f"/v1/files/{quote(file_id, safe='')}",
        f"/v1/files/{quote(file_id, safe='')}/content",
        f"/v1/batches/{quote(batch_id, safe='')}",
    ):
        resp = await api.get(path)
        assert resp.status in (200, 400, 404, 405), (path, resp.status)
        assert "Traceback" not in await resp.text()
