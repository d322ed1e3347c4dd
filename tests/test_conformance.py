"""Every object ``promptq serve`` answers, checked against OpenAI's published OpenAPI
specification (``openai/openai-openapi``'s ``openapi.json``): files, batches, lists,
errors, chat completions and their stream chunks, responses and their stream events,
embeddings, completions, moderations, models.

The specification is not shipped with promptq and this machine may have no internet:
point ``PROMPTQ_OPENAPI_SPEC`` at a copy (``git clone
https://github.com/openai/openai-openapi``); without it the test is skipped and says so.
The specification lists only the types of optional fields where OpenAI's API answers
``null`` for them (``"cancelled_at": null``), and keeps OpenAPI 3.0's ``nullable``:
both are read as "may be null".
"""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestClient, TestServer
from arq.connections import ArqRedis
from pydantic import SecretStr

from promptq.api import create_app
from promptq.shared.settings import Settings

from .conftest import in_process_worker, wait_until

H = {"Authorization": "Bearer t"}


def _relax(node: Any) -> None:
    if isinstance(node, dict):
        if node.get("nullable") is True:
            inner = {k: v for k, v in node.items() if k != "nullable"}
            node.clear()
            node["anyOf"] = [inner, {"type": "null"}]
            _relax(inner)
            return
        props = node.get("properties")
        if isinstance(props, dict):
            required = set(node.get("required", []))
            for name, sub in list(props.items()):
                _relax(sub)
                if name not in required:
                    props[name] = {"anyOf": [sub, {"type": "null"}]}
        for key, value in node.items():
            if key != "properties":
                _relax(value)
    elif isinstance(node, list):
        for item in node:
            _relax(item)


@pytest.fixture(scope="module")
def components() -> dict[str, Any]:
    path = os.environ.get("PROMPTQ_OPENAPI_SPEC")
    if not path:
        pytest.skip(
            "set PROMPTQ_OPENAPI_SPEC to openai/openai-openapi's openapi.json (git clone "
            "https://github.com/openai/openai-openapi) to check every object against it"
        )
    spec = json.loads(Path(path).read_text())
    found: dict[str, Any] = spec["components"]
    _relax(found)
    return found


class Checker:
    def __init__(self, components: dict[str, Any]) -> None:
        from jsonschema import Draft202012Validator

        self.components = components
        self.validator = Draft202012Validator
        self.problems: list[str] = []
        self.checked: list[str] = []

    def __call__(self, name: str, obj: Any) -> None:
        schema = {"$ref": f"#/components/schemas/{name}", "components": self.components}
        self.checked.append(name)
        for error in self.validator(schema).iter_errors(obj):
            self.problems.append(f"{name} {list(error.absolute_path)}: {error.message[:200]}")


@pytest.fixture
async def api(redis: ArqRedis, settings: Settings) -> AsyncIterator[TestClient]:
    local = settings.model_copy(update={"api_token": SecretStr("t")})
    async with in_process_worker(local), TestClient(TestServer(create_app(local))) as client:
        yield client


async def _json(resp: aiohttp.ClientResponse) -> Any:
    return await resp.json()


def _events(text: str) -> list[Any]:
    out = []
    for event in (e for e in text.split("\n\n") if e):
        data = [line for line in event.split("\n") if line.startswith("data: ")]
        if data and data[0] != "data: [DONE]":
            out.append(json.loads(data[0].removeprefix("data: ")))
    return out


async def test_every_object_validates_against_the_openapi_spec(
    components: dict[str, Any], api: TestClient
) -> None:
    check = Checker(components)
    chat = {"model": "mock-gpt", "messages": [{"role": "user", "content": "hi"}]}
    line = {"custom_id": "a", "method": "POST", "url": "/v1/chat/completions", "body": chat}
    form = aiohttp.FormData()
    form.add_field("purpose", "batch")
    form.add_field("file", (json.dumps(line) + "\n").encode(), filename="in.jsonl")
    file = await _json(await api.post("/v1/files", data=form, headers=H))
    check("OpenAIFile", file)
    check("OpenAIFile", await _json(await api.get(f"/v1/files/{file['id']}", headers=H)))
    check("ListFilesResponse", await _json(await api.get("/v1/files", headers=H)))
    create = {"input_file_id": file["id"], "endpoint": "/v1/chat/completions",
              "completion_window": "24h"}  # fmt: skip
    batch = await _json(await api.post("/v1/batches", json=create, headers=H))
    check("Batch", batch)

    async def completed() -> Any:
        found = await _json(await api.get(f"/v1/batches/{batch['id']}", headers=H))
        return found if found["status"] == "completed" else None

    check("Batch", await wait_until(completed, what="the batch"))
    check("ListBatchesResponse", await _json(await api.get("/v1/batches", headers=H)))
    check("CreateChatCompletionResponse",
          await _json(await api.post("/v1/chat/completions", json=chat, headers=H)))  # fmt: skip
    streamed = {**chat, "stream": True, "stream_options": {"include_usage": True}}
    text = await (await api.post("/v1/chat/completions", json=streamed, headers=H)).text()
    for chunk in _events(text):
        check("CreateChatCompletionStreamResponse", chunk)
    asked = {"model": "mock-gpt", "input": "hi"}
    check("Response", await _json(await api.post("/v1/responses", json=asked, headers=H)))
    text = await (await api.post("/v1/responses", json={**asked, "stream": True}, headers=H)).text()
    for event in _events(text):
        check("ResponseStreamEvent", event)
    for name, path, body in [
        ("CreateEmbeddingResponse", "/v1/embeddings", {"model": "m", "input": ["a"]}),
        ("CreateCompletionResponse", "/v1/completions", {"model": "m", "prompt": "a"}),
        ("CreateModerationResponse", "/v1/moderations", {"input": "a"}),
        ("ErrorResponse", "/v1/chat/completions", {"model": "m"}),
    ]:
        check(name, await _json(await api.post(path, json=body, headers=H)))
    check("ListModelsResponse", await _json(await api.get("/v1/models", headers=H)))
    check("ErrorResponse", await _json(await api.get("/v1/files/nope", headers=H)))
    wrong = {"Authorization": "Bearer x"}
    check("ErrorResponse", await _json(await api.get("/v1/batches", headers=wrong)))
    check("DeleteFileResponse",
          await _json(await api.delete(f"/v1/files/{file['id']}", headers=H)))  # fmt: skip
    assert len(check.checked) >= 25
    assert check.problems == []
