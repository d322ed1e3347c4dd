"""Functions for the ``python:`` backend tests (imported by real worker processes as
``python:tests.backend_fns:NAME``). Each call appends a line to the file named by
``PROMPTQ_TEST_CALL_LOG`` (tab-separated: kind, key, pid, start, end) so that tests
can count calls across processes."""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

from promptq import BackendError


def _log(kind: str, body: dict[str, Any], start: float) -> None:
    path = os.environ.get("PROMPTQ_TEST_CALL_LOG")
    if path:
        with open(path, "a", encoding="utf-8") as f:
            f.write(f"{kind}\t{body.get('key')}\t{os.getpid()}\t{start:.6f}\t{time.time():.6f}\n")


def _key(body: dict[str, Any]) -> str:
    return str(body["messages"][-1]["content"])


def echo(endpoint: str, body: dict[str, Any]) -> dict[str, Any]:
    start = time.time()
    key = _key(body)
    _log("echo", {"key": key}, start)
    return {"object": "chat.completion", "endpoint": endpoint, "echo": key,
            "pid": os.getpid(), "usage": {"prompt_tokens": 1, "completion_tokens": 1,
                                          "total_tokens": 2}}  # fmt: skip


def hold_gil(endpoint: str, body: dict[str, Any]) -> dict[str, Any]:
    """Pure-Python busy work for ``seconds`` (from the prompt, default 2): the GIL is held
    except at the interpreter's switch interval."""
    start = time.time()
    key = _key(body)
    seconds = float(key.split()[-1]) if key.split()[-1].replace(".", "").isdigit() else 2.0
    x = 0
    while time.time() - start < seconds:
        for i in range(10_000):
            x = (x * 31 + i) & 0xFFFFFFFF
    _log("gil", {"key": key}, start)
    return {"object": "chat.completion", "echo": key, "pid": os.getpid()}


def flaky(endpoint: str, body: dict[str, Any]) -> dict[str, Any]:
    """Fails with a retryable BackendError until the call log holds ``fail`` calls for
    this key, then answers; keys starting with ``fatal`` fail for good."""
    start = time.time()
    key = _key(body)
    _log("flaky", {"key": key}, start)
    if key.startswith("fatal"):
        raise BackendError("the model refused this input", status_code=422, code="refused")
    if key.startswith("boom"):
        raise ValueError("something inside the function broke")
    if key.startswith("list"):
        return ["not", "a", "dict"]  # type: ignore[return-value]
    path = os.environ["PROMPTQ_TEST_CALL_LOG"]
    with open(path, encoding="utf-8") as f:
        calls = sum(1 for line in f if line.split("\t")[1] == key)
    if calls <= 2:
        raise BackendError("model busy", status_code=503, code="overloaded", retryable=True)
    return {"object": "chat.completion", "echo": key}


async def async_echo(endpoint: str, body: dict[str, Any]) -> dict[str, Any]:
    await asyncio.sleep(0.01)
    return {"object": "chat.completion", "echo": _key(body), "async": True}


not_callable = 42


def chat_reply(endpoint: str, body: dict[str, Any]) -> dict[str, Any]:
    """A whole chat.completion (for streaming tests: the API makes its events)."""
    text = "local: " + _key(body)
    return {
        "id": "chatcmpl-local",
        "object": "chat.completion",
        "created": 0,
        "model": str(body.get("model", "local")),
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3},
    }
