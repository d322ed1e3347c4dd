"""Retry policy as data, and the one place upstream answers are classified.

Backoff is exponential with full jitter (``uniform(0, min(max_delay_s, base_delay_s *
2**(n-1)))``, the AWS "full jitter" scheme, which spreads a herd of failed requests
evenly instead of retrying them in waves). When the upstream says how long to wait
(``retry-after-ms``, ``retry-after`` in seconds or as an HTTP date, or OpenAI's
"Please try again in 1.5s." message), that wait is a floor: we never retry sooner,
and add up to 10% so that the requests told the same thing do not all return at once.

Answers are read by body, not only by status, because self-hosted servers copy OpenAI's
paths but not its errors (the shapes are in ``promptq.mock._flavours``, which the tests
run against this): vLLM's ``{"object": "error", "message", "type", "code": 400}`` and
its newer nesting under ``error``, llama.cpp's ``{"error": {"code": 400, "message",
"type"}}``, TGI's ``{"error": "...", "error_type"}``, Ollama's and FastAPI's. A prompt
over the context is ``context_length_exceeded`` on each of them (never retried); a 500
whose message is a JSON parse error or an input too large for the server is a request
error (retrying the same bytes cannot help); llama.cpp's 501 ``not_supported_error``
stops the batch (every request would get it); "loading", "no slot", "busy" and
"overloaded" answers are retried with backoff, and so is TGI's 424 generation error.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from random import Random
from typing import Any

import orjson

from promptq.shared.errors import (
    STOP_BATCH_CODES,
    FatalUpstreamError,
    RetryableUpstreamError,
    UpstreamError,
)

_TRY_AGAIN_RE = re.compile(r"try again in (\d+(?:\.\d+)?)\s*(ms|s)\b", re.IGNORECASE)

#: error codes when the upstream's body names none
_CODE_BY_STATUS = {
    400: "invalid_request_error",
    401: "invalid_api_key",
    403: "permission_denied",
    404: "not_found",
    408: "request_timeout",
    409: "conflict",
    413: "request_too_large",
    422: "invalid_request_error",
    429: "rate_limit_exceeded",
}
_RETRYABLE_STATUS = frozenset({408, 409, 429})

#: error ``type`` names of self-hosted servers, and the code promptq reports for each
_CODE_BY_TYPE = {
    "exceed_context_size_error": "context_length_exceeded",  # llama.cpp
    "not_supported_error": "not_supported",  # llama.cpp, e.g. embeddings switched off
    "authentication_error": "invalid_api_key",  # llama.cpp
    "authentication": "invalid_api_key",  # TGI
    "not_found_error": "not_found",  # llama.cpp
    "NotFoundError": "not_found",  # vLLM
    "BadRequestError": "invalid_request_error",  # vLLM
    "validation": "invalid_request_error",  # TGI
    "unavailable_error": "server_unavailable",  # llama.cpp: loading, no free slot
    "unhealthy": "server_unavailable",  # TGI
    "ServiceUnavailableError": "server_unavailable",  # vLLM
    "overloaded": "overloaded",  # TGI (429)
    "generation": "generation_error",  # TGI (424)
    "incomplete_generation": "generation_error",  # TGI
    "InternalServerError": "server_error",  # vLLM
}
#: codes that are retried whatever their status (TGI answers a failed generation 424)
_RETRYABLE_CODES = frozenset({"server_unavailable", "overloaded", "generation_error"})
#: a prompt over the model's context, in the words of OpenAI, vLLM, llama.cpp, TGI, Ollama
_CONTEXT_RE = re.compile(
    r"maximum context length|context length|context size|context window"
    r"|exceeds? the (?:available )?context|must be <= \d+|prompt is too long"
    r"|input (?:length|is too long)|too many (?:input )?tokens|must have less than \d+ tokens",
    re.IGNORECASE,
)
#: a 5xx that is the request's fault: bytes that do not parse, an input too large to run
_CLIENT_FAULT_RE = re.compile(
    r"parse error|json\.exception|json decode|invalid json|could not parse|failed to parse"
    r"|too large to process|physical batch size",
    re.IGNORECASE,
)


@dataclass(frozen=True, kw_only=True, slots=True)
class RetryPolicy:
    """When to try again and how long to wait. Durations in seconds.

    ``max_attempts`` counts the first attempt; ``max_retry_after_s`` caps how long an
    upstream may make us wait (OpenAI's SDK honours up to 60-120 s).
    """

    max_attempts: int = 5
    base_delay_s: float = 0.5
    max_delay_s: float = 8.0
    max_retry_after_s: float = 120.0

    def backoff_cap_s(self, attempt: int) -> float:
        """Upper bound of the jittered wait after failed attempt number ``attempt`` (1-based)."""
        return min(self.max_delay_s, self.base_delay_s * 2.0 ** max(attempt - 1, 0))

    def delay_s(self, attempt: int, retry_after_s: float | None, rng: Random) -> float:
        """Seconds to wait after failed attempt ``attempt`` before the next one."""
        jittered = rng.uniform(0, self.backoff_cap_s(attempt))
        if retry_after_s is None:
            return jittered
        floor = min(max(retry_after_s, 0.0), self.max_retry_after_s)
        return max(floor * (1 + rng.uniform(0, 0.1)), jittered)


def parse_retry_after(headers: Mapping[str, str], *, now_s: float | None = None) -> float | None:
    """The upstream's requested wait in seconds, from ``retry-after-ms`` (preferred, as the
    OpenAI SDK does) or ``retry-after`` (seconds or HTTP date). None if absent or invalid."""
    raw_ms = headers.get("retry-after-ms")
    if raw_ms is not None:
        try:
            value = float(raw_ms) / 1000
            if math.isfinite(value) and value >= 0:
                return value
        except ValueError:
            pass
    raw = headers.get("retry-after")
    if raw is None:
        return None
    try:
        value = float(raw)
        return value if math.isfinite(value) and value >= 0 else None
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(raw)
    except (TypeError, ValueError, IndexError):
        return None
    now = time.time() if now_s is None else now_s
    return max(when.timestamp() - now, 0.0)


def classify(
    status: int, headers: Mapping[str, str], raw: bytes
) -> tuple[Any, UpstreamError | None]:
    """Turn one upstream HTTP answer into ``(parsed_body, error)``; error is None on success.

    Retryable: 408, 409, 429 (rate limit), 5xx and a 2xx whose body is not a JSON object.
    Fatal: other 4xx, and ``insufficient_quota`` / ``invalid_api_key`` whatever the status.
    ``x-should-retry: true|false`` overrides the judgement, as in the OpenAI SDK.
    """
    request_id = headers.get("x-request-id")
    try:
        body: Any = orjson.loads(raw) if raw else None
        parsed = True
    except orjson.JSONDecodeError:
        body, parsed = None, False
    if 200 <= status < 300:
        if parsed and isinstance(body, dict):
            return body, None
        snippet = raw[:80].decode("utf-8", "replace")
        return None, RetryableUpstreamError(
            f"upstream answered {status} with a body that is not a JSON object: {snippet!r}",
            code="invalid_response",
            status_code=status,
            request_id=request_id,
        )
    code, message = _error_fields(status, body if parsed else None, raw)
    retryable = (
        status in _RETRYABLE_STATUS or status >= 500 or code in _RETRYABLE_CODES
    ) and code not in STOP_BATCH_CODES
    if code in _FATAL_BY_BODY:
        retryable = False
    should_retry = headers.get("x-should-retry")
    if should_retry == "true":
        retryable = True
    elif should_retry == "false":
        retryable = False
    retry_after = parse_retry_after(headers)
    if retry_after is None and status == 429:
        match = _TRY_AGAIN_RE.search(message)
        if match:
            value = float(match.group(1))
            retry_after = value / 1000 if match.group(2).lower() == "ms" else value
    cls = RetryableUpstreamError if retryable else FatalUpstreamError
    return body, cls(
        message,
        code=code,
        status_code=status,
        retry_after_s=retry_after,
        body=body,
        request_id=request_id,
    )


#: error types that say less than the status does (Ollama's "api_error" is any error)
_GENERIC_TYPES = frozenset(
    {"", "invalid_request_error", "server_error", "api_error", "Bad Request"}
)
#: codes read from the body that are never retried, whatever the status said
_FATAL_BY_BODY = frozenset({"context_length_exceeded", "invalid_request_error", "not_supported"})


def _error_fields(status: int, body: Any, raw: bytes) -> tuple[str, str]:
    """(code, message) of an error answer, from the body of any of the servers above."""
    code_field: Any = None
    type_: Any = None
    message: Any = None
    if isinstance(body, dict):
        error = body.get("error")
        if isinstance(error, dict):  # OpenAI, vLLM (new), llama.cpp, Ollama
            code_field, type_, message = error.get("code"), error.get("type"), error.get("message")
        elif isinstance(error, str):  # TGI {"error", "error_type"}; vLLM's 401 {"error"}
            message, type_ = error, body.get("error_type")
        elif body.get("object") == "error":  # vLLM's ErrorResponse before it was nested
            code_field, type_, message = body.get("code"), body.get("type"), body.get("message")
        elif isinstance(body.get("detail"), str):  # FastAPI: {"detail": "Not Found"}
            message = body["detail"]
    if not isinstance(message, str) or not message:
        message = raw[:200].decode("utf-8", "replace").strip() or f"HTTP {status}"
    # OpenAI puts the useful name in `code`, sometimes only in `type`; vLLM and llama.cpp
    # send the status as an integer code and the name in `type`.
    code: str | None = code_field if isinstance(code_field, str) and code_field else None
    if code is None and isinstance(type_, str) and type_ not in _GENERIC_TYPES:
        code = _CODE_BY_TYPE.get(type_, type_)
    if status != 429 and code != "context_length_exceeded" and _CONTEXT_RE.search(message):
        code = "context_length_exceeded"
    elif status >= 500 and _CLIENT_FAULT_RE.search(message):
        code = "invalid_request_error"
    elif status == 501 and code is None:
        code = "not_supported"
    elif status == 503 and (code_field is None or code_field == 503):
        code = "server_unavailable"  # loading, no free slot, busy, overloaded
    if code is None:
        code = _CODE_BY_STATUS.get(status, "server_error" if status >= 500 else f"http_{status}")
    return code, f"HTTP {status}: {message}"
