"""Retry policy as data, and the one place upstream answers are classified.

Backoff is exponential with full jitter (``uniform(0, min(max_delay_s, base_delay_s *
2**(n-1)))``, the AWS "full jitter" scheme, which spreads a herd of failed requests
evenly instead of retrying them in waves). When the upstream says how long to wait
(``retry-after-ms``, ``retry-after`` in seconds or as an HTTP date, or OpenAI's
"Please try again in 1.5s." message), that wait is a floor: we never retry sooner,
and add up to 10% so that the requests told the same thing do not all return at once.
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
    retryable = (status in _RETRYABLE_STATUS or status >= 500) and code not in STOP_BATCH_CODES
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


def _error_fields(status: int, body: Any, raw: bytes) -> tuple[str, str]:
    code: str | None = None
    message: str | None = None
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict):
        # OpenAI puts the useful name in `code`, sometimes only in `type`; vLLM may send
        # an integer code.
        for candidate in (error.get("code"), error.get("type")):
            if isinstance(candidate, str) and candidate:
                code = candidate
                break
        if isinstance(error.get("message"), str):
            message = error["message"]
    elif isinstance(error, str):
        message = error
    if code is None:
        code = _CODE_BY_STATUS.get(status, "server_error" if status >= 500 else f"http_{status}")
    if message is None:
        message = raw[:200].decode("utf-8", "replace") or f"HTTP {status}"
    return code, f"HTTP {status}: {message}"
