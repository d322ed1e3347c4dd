"""OpenAI-shaped response bodies of the mock upstream (success and errors)."""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Mapping
from typing import Any, Final

import orjson
from aiohttp import web

from promptq.mock._directives import (
    ECHO_PREFIX,
    MAX_ECHO_CHARS,
    estimate_tokens,
    expected_content,
    prompt_chars,
)
from promptq.mock._flavours import Failure

__all__ = [
    "completion_bytes",
    "embedding_bytes",
    "error_response",
    "failure_response",
    "fmt_seconds",
    "invalid_request",
    "status_error",
    "success",
    "success_bytes",
    "to_ms",
]

_JSON: Final = "application/json"


def _headers() -> dict[str, str]:
    return {"Content-Type": _JSON, "x-request-id": "req_" + os.urandom(12).hex()}


def fmt_seconds(value: float) -> str:
    """``1.5 -> "1.5"``, ``2.0 -> "2"``: millisecond precision, no trailing zeros."""
    return f"{value:.3f}".rstrip("0").rstrip(".") or "0"


def to_ms(seconds: float | None) -> float | None:
    """Seconds to whole milliseconds (``None`` stays ``None``)."""
    return None if seconds is None else round(seconds * 1000.0)


def success_bytes(body: Mapping[str, Any], messages: list[dict[str, Any]], model: str) -> bytes:
    """The chat.completion JSON for ``body``; content comes from :func:`expected_content`."""
    content = expected_content(body)
    prompt_tokens = estimate_tokens(prompt_chars(messages))
    completion_tokens = estimate_tokens(len(content))
    return orjson.dumps(
        {
            "id": "chatcmpl-" + os.urandom(12).hex(),
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": content, "refusal": None},
                    "logprobs": None,
                    "finish_reason": "stop",
                }
            ],
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
            },
        }
    )


def completion_bytes(prompt: str, model: str) -> bytes:
    """The text_completion JSON for ``prompt``: ``"echo: "`` + its first 200 characters."""
    text = ECHO_PREFIX + prompt[:MAX_ECHO_CHARS]
    prompt_tokens = estimate_tokens(len(prompt))
    completion_tokens = estimate_tokens(len(text))
    return orjson.dumps(
        {
            "id": "cmpl-" + os.urandom(12).hex(),
            "object": "text_completion",
            "created": int(time.time()),
            "model": model,
            "choices": [{"text": text, "index": 0, "logprobs": None, "finish_reason": "stop"}],
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
            },
        }
    )


def embedding_vector(text: str) -> list[float]:
    """A deterministic 8-dimensional unit-free vector for ``text`` (bytes of its hash)."""
    digest = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return [round(byte / 255.0, 4) for byte in digest]


def embedding_bytes(texts: list[str], model: str) -> bytes:
    """The embeddings list JSON: one :func:`embedding_vector` per input, in order."""
    tokens = sum(estimate_tokens(len(text)) for text in texts)
    return orjson.dumps(
        {
            "object": "list",
            "data": [
                {"object": "embedding", "index": index, "embedding": embedding_vector(text)}
                for index, text in enumerate(texts)
            ],
            "model": model,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }
    )


def failure_response(failure: Failure, headers: Mapping[str, str] | None = None) -> web.Response:
    """A flavour's failed answer (:mod:`promptq.mock._flavours`): JSON, text or empty."""
    all_headers = _headers()
    if isinstance(failure.body, str):
        payload = failure.body.encode()
    elif failure.body is None:
        payload = b""
        all_headers["Content-Type"] = "text/plain; charset=utf-8"
    else:
        payload = orjson.dumps(failure.body)
    all_headers.update(failure.headers)
    if headers:
        all_headers.update(headers)
    return web.Response(status=failure.status, body=payload, headers=all_headers)


def success(body: bytes) -> web.Response:
    """A 200 JSON response carrying ``body`` and an ``x-request-id`` header."""
    return web.Response(body=body, headers=_headers())


def error_response(
    status: int,
    message: str,
    *,
    type_: str,
    code: str | None,
    param: str | None = None,
    headers: Mapping[str, str] | None = None,
) -> web.Response:
    """An OpenAI error: ``{"error": {"message", "type", "param", "code"}}``."""
    payload = {"error": {"message": message, "type": type_, "param": param, "code": code}}
    all_headers = _headers()
    if headers:
        all_headers.update(headers)
    return web.Response(status=status, body=orjson.dumps(payload), headers=all_headers)


def invalid_request(message: str, param: str | None = "messages") -> web.Response:
    """400 ``invalid_request_error`` with ``code: null`` (request validation failures)."""
    return error_response(400, message, type_="invalid_request_error", code=None, param=param)


def _describe(
    status: int, model: str, *, quota: bool, wait_s: float | None
) -> tuple[str, str, str | None]:
    """(message, type, code) of the OpenAI error body for a faulted ``status``."""
    if status == 429 and quota:
        return (
            "You exceeded your current quota, please check your plan and billing details.",
            "insufficient_quota",
            "insufficient_quota",
        )
    if status == 429:
        wait = "later." if wait_s is None else f"in {fmt_seconds(wait_s)}s."
        return (
            f"Rate limit reached for {model} (mock) on requests per min. Please try again {wait}",
            "requests",
            "rate_limit_exceeded",
        )
    if status == 400:
        return ("Invalid request (mock).", "invalid_request_error", "invalid_request_error")
    if status == 401:
        return ("Incorrect API key provided (mock).", "invalid_request_error", "invalid_api_key")
    if status == 403:
        return ("You are not allowed to use this model (mock).", "permission_error", None)
    if status == 404:
        return (
            f"The model `{model}` does not exist or you do not have access to it.",
            "invalid_request_error",
            "model_not_found",
        )
    if status >= 500:
        return (
            f"The server had an error while processing your request (mock {status}).",
            "server_error",
            "server_error",
        )
    return (f"Mock error {status}.", "invalid_request_error", None)


def status_error(
    status: int,
    model: str,
    *,
    quota: bool = False,
    retry_after: float | None = None,
    retry_after_ms: float | None = None,
) -> web.Response:
    """An injected fault: ``status`` with its OpenAI body and optional retry headers.

    ``retry_after`` (seconds) sets ``retry-after``, ``retry_after_ms`` (milliseconds)
    sets ``retry-after-ms``; a 429's message ends "Please try again in <s>s." when known.
    """
    headers: dict[str, str] = {}
    if retry_after is not None:
        headers["retry-after"] = fmt_seconds(retry_after)
    if retry_after_ms is not None:
        headers["retry-after-ms"] = fmt_seconds(retry_after_ms)
    wait_s = retry_after
    if wait_s is None and retry_after_ms is not None:
        wait_s = retry_after_ms / 1000.0
    message, type_, code = _describe(status, model, quota=quota, wait_s=wait_s)
    return error_response(status, message, type_=type_, code=code, headers=headers)
