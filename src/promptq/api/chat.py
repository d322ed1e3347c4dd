"""The lane's endpoints: one request through the queue, ahead of batch work.

``POST /v1/chat/completions``, ``/v1/responses``, ``/v1/embeddings``, ``/v1/completions``
and ``/v1/moderations`` go into the chat queue, which workers serve before any batch
work (see ``api.lane``); the handler answers with the upstream's final status and body
once a worker is done with it, retries included. When no upstream answer came back
(timeouts, connection errors) it answers 502 (504 for a timeout) in the OpenAI error
shape. ``GET /v1/models`` asks a worker for the upstream's list (workers hold the key),
kept for ``MODELS_TTL_S``.

``"stream": true`` (chat completions and responses) answers Server-Sent Events as the
upstream produces them, relayed through Redis by whichever worker runs the request
(``worker.relay``). Retries and rate limits happen before the first event: a request
that fails before it gets the same JSON error as without ``stream``. A failure midway
ends the stream with an error event (``data: {"error": ...}``), which the OpenAI SDKs
raise as ``APIError``; a client that disconnects stops the upstream request, also before
the first event (a slow model's long wait for its first token). A backend
that answers whole (a ``python:`` function) is sent as the events the client expects
(``shared.sse.events_from_answer``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

from aiohttp import web

from promptq.api.errors import (
    ApiError,
    bad_request,
    json_response,
    queue_full,
    read_json_object,
)
from promptq.api.lane import LaneClosed, LaneStream
from promptq.api.state import LANE, PRODUCER, SETTINGS
from promptq.shared.errors import InputError, QueueFull
from promptq.shared.models import CHAT_ENDPOINT, MODELS_ENDPOINT, QueuedRequest
from promptq.shared.registry import WorkerRegistry
from promptq.shared.sse import STREAMING_ENDPOINTS, error_event, events_from_answer

logger = logging.getLogger(__name__)

UPSTREAM_ERROR = "upstream_error"
#: while a stream waits for its first event, this often: has its client gone?
CLIENT_CHECK_S = 0.5
#: GET /v1/models: the upstream's answer is kept this long, and asked for this long
MODELS_TTL_S = 60.0
MODELS_TIMEOUT_S = 10.0
#: the models cache, per application (``create_app`` sets it)
MODELS_CACHE = web.AppKey("promptq_models", dict[str, Any])

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


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


def _no_answer(timeout_s: float) -> ApiError:
    return ApiError(
        504,
        f"No answer within {timeout_s:g} s (PROMPTQ_API_CHAT_TIMEOUT_S): are workers "
        "running (`promptq workers`)?",
        type=UPSTREAM_ERROR,
        code="timeout",
    )


def _closing() -> ApiError:
    return ApiError(
        503,
        "The server is shutting down; retry.",
        type="server_error",
        code="shutting_down",
        headers={"Retry-After": "1"},
    )


@contextlib.contextmanager
def _lane_errors(timeout_s: float) -> Iterator[None]:
    """The lane's refusals as HTTP answers: 429 queue full, 504 no answer, 503 closing."""
    try:
        yield
    except QueueFull as exc:
        raise queue_full(str(exc)) from exc
    except TimeoutError:
        raise _no_answer(timeout_s) from None
    except LaneClosed as exc:
        raise _closing() from exc


def lane_endpoint(endpoint: str) -> Handler:
    """The handler of ``POST endpoint``: validated, queued, answered (or streamed)."""

    async def handle(request: web.Request) -> web.StreamResponse:
        body = await read_json_object(request)
        stream = body.get("stream")
        if stream not in (None, False, True):
            raise bad_request("'stream' must be a boolean.", param="stream")
        if stream and endpoint not in STREAMING_ENDPOINTS:
            raise bad_request(
                f"{endpoint} does not stream: send 'stream': false (or leave it out).",
                param="stream",
                code="unsupported_parameter",
            )
        lane = request.app[LANE]
        try:
            queued = lane.validate(body, endpoint)
        except InputError as exc:
            raise _invalid(exc) from exc
        timeout_s = request.app[SETTINGS].api_chat_timeout_s
        if stream:
            return await _stream(request, queued, endpoint, timeout_s)
        with _lane_errors(timeout_s):
            line, chat_id = await lane.send(queued, timeout_s=timeout_s, endpoint=endpoint)
        return _answer(line, chat_id)

    handle.__doc__ = f"POST {endpoint}, answered when a worker is done with it."
    return handle


chat_completions = lane_endpoint(CHAT_ENDPOINT)


async def _stream(
    request: web.Request, queued: QueuedRequest, endpoint: str, timeout_s: float
) -> web.StreamResponse:
    lane = request.app[LANE]
    with _lane_errors(timeout_s):
        stream = await lane.open_stream(queued, timeout_s=timeout_s, endpoint=endpoint)
    async with stream:
        with _lane_errors(timeout_s):
            first = await _first_item(request, stream)
        if first is None:  # the client left before anything came: stop the upstream
            await lane_cancel(request, stream.id)
            return web.Response(status=499, reason="Client Closed Request")  # unread
        if "event" not in first:  # the final answer came before any event
            if first.get("error") is not None:
                return _answer(first, stream.id)  # as without stream: retried, then JSON
            body = (first.get("response") or {}).get("body")
            events = events_from_answer(endpoint, queued.body, body)
            return await _write_all(request, stream, events)
        return await _relay(request, stream, first["event"], timeout_s)


async def _first_item(request: web.Request, stream: LaneStream) -> dict[str, Any] | None:
    """The stream's first item; None when the client disconnects first (asked every
    ``CLIENT_CHECK_S``: nothing is written before the first event, so no write fails
    to tell). ``TimeoutError`` past the stream's deadline."""
    while True:
        try:
            async with asyncio.timeout(CLIENT_CHECK_S):
                return await stream.next()
        except TimeoutError:
            if time.monotonic() >= stream.deadline:
                raise
            if request.transport is None or request.transport.is_closing():
                return None


def _sse_response(chat_id: str) -> web.StreamResponse:
    return web.StreamResponse(
        headers={
            "Content-Type": "text/event-stream",
            "Cache-Control": "no-cache",
            "X-Accel-Buffering": "no",  # nginx in front: do not buffer the events
            "x-promptq-request-id": chat_id,
        }
    )


async def _write_all(
    request: web.Request, stream: LaneStream, events: list[str]
) -> web.StreamResponse:
    response = _sse_response(stream.id)
    await response.prepare(request)
    try:
        await response.write("".join(f"{event}\n\n" for event in events).encode())
        await response.write_eof()
    except ConnectionResetError:
        pass  # the client left; nothing runs upstream any more
    return response


async def _relay(
    request: web.Request, stream: LaneStream, first: str, timeout_s: float
) -> web.StreamResponse:
    response = _sse_response(stream.id)
    await response.prepare(request)
    finished = False
    try:
        await response.write(f"{first}\n\n".encode())
        error: str | None = None
        try:
            async with asyncio.timeout_at(stream.deadline_at()):  # one timer per stream
                while not finished:
                    # everything that has arrived goes in one write (one syscall, not one
                    # per event); the final answer comes last
                    events: list[str] = []
                    for item in await stream.take():
                        event = item.get("event")
                        if isinstance(event, str):
                            events.append(f"{event}\n\n")
                            continue
                        finished = True
                        failed = item.get("error")
                        body = (item.get("response") or {}).get("body") or {}
                        if failed is not None and not body.get("error_relayed"):
                            message = str(failed.get("message") or "the upstream failed")
                            code = str(failed.get("code") or UPSTREAM_ERROR)
                            events.append(f"{error_event(message, code=code)}\n\n")
                        break
                    await response.write("".join(events).encode())
        except TimeoutError:  # the client is told; the upstream request is stopped
            message = f"the stream did not finish within {timeout_s:g} s"
            error = error_event(message, code="timeout")
            await lane_cancel(request, stream.id)
        except LaneClosed:
            error = error_event("the server is shutting down", code="shutting_down")
        if error is not None:
            await response.write(f"{error}\n\n".encode())
        await response.write_eof()
    except ConnectionResetError:  # the client left midway: stop the upstream request
        if not finished:
            await lane_cancel(request, stream.id)
    except asyncio.CancelledError:
        if not finished:
            await asyncio.shield(lane_cancel(request, stream.id))
        raise
    return response


async def lane_cancel(request: web.Request, chat_id: str) -> None:
    await request.app[LANE].cancel(chat_id)


async def list_models(request: web.Request) -> web.Response:
    """GET /v1/models: the upstream's models, asked of a worker and kept briefly."""
    cache = request.app[MODELS_CACHE]
    now = time.monotonic()
    if cache.get("until", 0.0) > now:
        return json_response(cache["body"])
    lane = request.app[LANE]
    settings = request.app[SETTINGS]
    registry = WorkerRegistry(request.app[PRODUCER].redis, heartbeat_s=settings.heartbeat_s)
    try:
        if not await registry.count_live():  # nobody would answer: do not wait for it
            raise TimeoutError
        line, _chat_id = await lane.send(
            QueuedRequest(custom_id="models", body={}, line=1),
            timeout_s=MODELS_TIMEOUT_S,
            endpoint=MODELS_ENDPOINT,
        )
    except (TimeoutError, QueueFull, LaneClosed) as exc:
        logger.warning("GET /v1/models: no worker answered (%s)", type(exc).__name__)
        line = {}
    body = (line.get("response") or {}).get("body")
    if line.get("error") is None and isinstance(body, dict) and isinstance(body.get("data"), list):
        cache.update(body=body, until=now + MODELS_TTL_S)
        return json_response(body)
    # no worker, or a backend without a model list: the model promptq sends by default
    model = {"id": settings.model, "object": "model", "created": 0, "owned_by": "promptq"}
    return json_response({"object": "list", "data": [model]})
