"""OpenAI-shaped response bodies of the mock upstream (success and errors)."""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from typing import Any, Final

import orjson
from aiohttp import web
from aiohttp.typedefs import Handler

from promptq.mock._directives import estimate_tokens, expected_content, prompt_chars

__all__ = [
    "error_response",
    "fmt_seconds",
    "invalid_request",
    "openai_errors",
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
                    "message": {"role": "assistant", "content": content},
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


@web.middleware
async def openai_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Turn aiohttp's plain-text 404/405/413 into OpenAI-shaped error bodies."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return error_response(exc.status, exc.reason, type_="invalid_request_error", code=None)
