"""Every error the HTTP API answers, in the OpenAI error shape.

    {"error": {"message": str, "type": str, "param": str | null, "code": str | null}}

Handlers raise ``ApiError``; ``error_middleware`` turns it, aiohttp's own HTTP errors
(404 unknown URL, 405, 413) and anything unexpected (500, traceback logged here only)
into that body. A message says what to fix.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from aiohttp import web
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from promptq.shared.errors import RedisUnavailable

logger = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

INVALID_REQUEST = "invalid_request_error"
SERVER_ERROR = "server_error"


class ApiError(Exception):
    """An HTTP error answer: status, message and the OpenAI ``type``/``param``/``code``."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = INVALID_REQUEST,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers

    def __repr__(self) -> str:
        return f"ApiError({self.status}, {self.message!r}, code={self.code!r})"

    def response(self) -> web.Response:
        return error_response(
            self.status,
            self.message,
            type=self.type,
            param=self.param,
            code=self.code,
            headers=self.headers,
        )


def bad_request(message: str, *, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, param=param, code=code)


def not_found(message: str, *, param: str | None = None, code: str = "not_found") -> ApiError:
    return ApiError(404, message, param=param, code=code)


def error_response(
    status: int,
    message: str,
    *,
    type: str = INVALID_REQUEST,
    param: str | None = None,
    code: str | None = None,
    headers: dict[str, str] | None = None,
) -> web.Response:
    body = {"error": {"message": message, "type": type, "param": param, "code": code}}
    return json_response(body, status=status, headers=headers)


def json_response(
    obj: Any, *, status: int = 200, headers: dict[str, str] | None = None
) -> web.Response:
    return web.Response(
        body=orjson.dumps(obj), status=status, content_type="application/json", headers=headers
    )


def _from_http_exception(request: web.Request, exc: web.HTTPException) -> web.Response:
    if isinstance(exc, web.HTTPNotFound):
        return error_response(
            404,
            f"Unknown request URL: {request.method} {request.path}. promptq serves "
            "/v1/files, /v1/batches, /v1/chat/completions, /healthz and /metrics.",
            code="unknown_url",
        )
    if isinstance(exc, web.HTTPMethodNotAllowed):
        allowed = ", ".join(sorted(exc.allowed_methods))
        return error_response(
            405,
            f"{request.method} is not allowed on {request.path}; use {allowed}.",
            code="method_not_allowed",
            headers={"Allow": allowed},
        )
    if isinstance(exc, web.HTTPRequestEntityTooLarge):
        return error_response(
            413,
            f"The request body is too large for {request.path}: {exc.text}",
            code="request_too_large",
        )
    if exc.status < 400:  # redirects and the like pass through
        raise exc
    return error_response(exc.status, exc.reason or "HTTP error", code=None)


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except ApiError as exc:
        return exc.response()
    except web.HTTPException as exc:
        return _from_http_exception(request, exc)
    except (RedisUnavailable, RedisConnectionError, RedisTimeoutError) as exc:
        logger.warning("%s %s: Redis unavailable: %s", request.method, request.path, exc)
        return error_response(
            503,
            "promptq cannot reach its Redis right now; retry in a moment.",
            type=SERVER_ERROR,
            code="redis_unavailable",
            headers={"Retry-After": "1"},
        )
    except ConnectionResetError:
        raise  # the client went away; nothing to answer
    except Exception:
        logger.exception("%s %s failed", request.method, request.path)
        return error_response(
            500,
            "The server had an error while processing your request; it is logged. "
            "Retry, and report it if it persists.",
            type=SERVER_ERROR,
            code="internal_error",
        )


async def read_json_object(request: web.Request) -> dict[str, Any]:
    """The request's JSON object body, or a 400 that says what is wrong with it."""
    if request.content_type not in ("application/json", "application/octet-stream", ""):
        raise ApiError(
            400,
            f"Expected a JSON body (Content-Type: application/json), got '{request.content_type}'.",
            code="invalid_content_type",
        )
    raw = await request.read()
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise ApiError(400, f"The body is not valid JSON: {exc}.", code="invalid_json") from exc
    if not isinstance(body, dict):
        raise ApiError(400, "The body must be a JSON object.", code="invalid_json")
    return body


#: how long a client told "queue full" should wait before trying again (seconds)
QUEUE_FULL_RETRY_AFTER_S = 30


def list_limit(request: web.Request, *, default: int, maximum: int) -> int:
    """The ``limit`` query parameter of a listing, checked."""
    raw = request.query.get("limit")
    if raw is None:
        return default
    try:
        limit = int(raw)
    except ValueError:
        limit = 0
    if not 1 <= limit <= maximum:
        raise bad_request(
            f"'limit' must be an integer from 1 to {maximum}, got '{raw}'.",
            param="limit",
            code="invalid_limit",
        )
    return limit


def unknown_cursor(after: str, what: str) -> ApiError:
    return bad_request(
        f"Unknown 'after' cursor '{after}': pass the id of a {what} from the previous page "
        "(it may have expired; list again from the start).",
        param="after",
        code="invalid_cursor",
    )


def queue_full(exc_message: str) -> ApiError:
    """Backpressure (PROMPTQ_MAX_QUEUED): 429 with a retry-after, as rate limits are."""
    return ApiError(
        429,
        exc_message,
        type="queue_full",
        code="queue_full",
        headers={"retry-after": str(QUEUE_FULL_RETRY_AFTER_S)},
    )
