"""``POST /v1/chat/completions``: one request through the queue, ahead of batch work.

The request goes into the chat queue, which workers serve before any batch work (see
``api.lane``); the handler answers with the upstream's final status and body once a worker is
done with it, retries included. When no upstream answer came back (timeouts,
connection errors) it answers 502 (504 for a timeout) in the OpenAI error shape.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from promptq.api.errors import (
    ApiError,
    bad_request,
    json_response,
    queue_full,
    read_json_object,
)
from promptq.api.lane import LaneClosed
from promptq.api.state import LANE, SETTINGS
from promptq.shared.errors import InputError, QueueFull

UPSTREAM_ERROR = "upstream_error"


def _invalid(exc: InputError) -> ApiError:
    first = exc.errors[0]
    param = first.field.removeprefix("body.") if first.field else None
    where = f"'{param}' " if param else ""
    return bad_request(
        f"Invalid request: {where}{first.message}.", param=param, code="invalid_request"
    )


def _answer(line: dict[str, Any], chat_id: str) -> web.Response:
    response = line.get("response") or {}
    error = line.get("error")
    headers = {"x-promptq-request-id": chat_id}
    if response.get("request_id"):
        headers["x-request-id"] = str(response["request_id"])
    status = response.get("status_code")
    body = response.get("body")
    if isinstance(status, int) and (error is None or (status >= 400 and isinstance(body, dict))):
        # The upstream's own answer, success or final error (400, 429 after retries...).
        return json_response(body, status=status, headers=headers)
    error = error or {}
    code = str(error.get("code") or UPSTREAM_ERROR)
    raise ApiError(
        504 if code == "timeout" else 502,
        f"The upstream gave no usable answer after {line.get('attempts', 0)} attempt(s): "
        f"{error.get('message', 'unknown error')}",
        type=UPSTREAM_ERROR,
        code=code,
        headers=headers,
    )


async def chat_completions(request: web.Request) -> web.Response:
    """POST /v1/chat/completions, answered when a worker is done with it."""
    body = await read_json_object(request)
    if body.get("stream"):
        raise bad_request(
            "Streaming is not supported yet: send 'stream': false (or leave it out); the "
            "completion is returned whole once it is done.",
            param="stream",
            code="unsupported_parameter",
        )
    lane = request.app[LANE]
    try:
        queued = lane.validate(body)
    except InputError as exc:
        raise _invalid(exc) from exc
    timeout_s = request.app[SETTINGS].api_chat_timeout_s
    try:
        line, chat_id = await lane.send(queued, timeout_s=timeout_s)
    except QueueFull as exc:
        raise queue_full(str(exc)) from exc
    except TimeoutError:
        raise ApiError(
            504,
            f"No answer within {timeout_s:g} s (PROMPTQ_API_CHAT_TIMEOUT_S): are workers "
            "running (`promptq workers`)?",
            type=UPSTREAM_ERROR,
            code="timeout",
        ) from None
    except LaneClosed as exc:
        raise ApiError(
            503,
            "The server is shutting down; retry.",
            type="server_error",
            code="shutting_down",
            headers={"Retry-After": "1"},
        ) from exc
    return _answer(line, chat_id)
