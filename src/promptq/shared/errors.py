"""The promptq exception tree.

    PromptqError
    ├── ConfigError              bad settings or environment
    ├── InputError               a request file or payload is invalid (lists every problem)
    ├── BatchError               a batch cannot be created / found / changed
    │   ├── BatchNotFound
    │   └── BatchExists
    ├── QueueFull                backpressure: too many queued requests
    ├── RedisUnavailable         Redis does not answer
    ├── UnsafePayload            a Redis payload that is not our JSON (e.g. a planted pickle)
    ├── BackendError             raised by a ``python:`` backend function on purpose
    └── UpstreamError            one failed attempt against the LLM upstream
        ├── RetryableUpstreamError   429, 408, 409, 5xx, timeout, connection, bad body
        └── FatalUpstreamError       400, 401, 403, 404, insufficient_quota

Upstream errors are classified once, in ``promptq.worker.retry.classify``; they carry
the HTTP status, the error code reported in results and the Retry-After delay. A
``python:`` backend's failures become upstream errors in ``worker.backends.python``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


class PromptqError(Exception):
    """Root of every error promptq raises on purpose."""


class ConfigError(PromptqError):
    """Invalid settings (environment variables or flags)."""


@dataclass(frozen=True, slots=True)
class LineError:
    """One problem in an input file: where it is and what is wrong."""

    line: int  # 1-based line number, 0 for the file as a whole
    field: str | None
    message: str

    def __str__(self) -> str:
        where = f"line {self.line}" if self.line else "file"
        if self.field:
            where += f", field '{self.field}'"
        return f"{where}: {self.message}"


class InputError(PromptqError):
    """An input (file or payload) was rejected whole; ``errors`` lists every bad line."""

    def __init__(self, source: str, errors: list[LineError], *, total: int | None = None) -> None:
        self.source = source
        self.errors = errors
        #: every problem found; ``errors`` may keep only the first ones
        self.total = max(total or 0, len(errors))
        super().__init__(self.render(limit=20))

    def render(self, *, limit: int | None = None) -> str:
        shown = self.errors if limit is None else self.errors[:limit]
        head = f"{self.source}: rejected, {self.total} problem(s); nothing was enqueued"
        lines = [head, *(f"  {self.source}: {e}" for e in shown)]
        if self.total > len(shown):
            lines.append(f"  ... and {self.total - len(shown)} more")
        return "\n".join(lines)


class BatchError(PromptqError):
    """A batch cannot be created, found or changed."""


class BatchNotFound(BatchError):
    def __init__(self, batch_id: str) -> None:
        self.batch_id = batch_id
        super().__init__(f"no batch '{batch_id}' in Redis (wrong id, wrong Redis URL, or expired)")


class BatchExists(BatchError):
    def __init__(self, batch_id: str, status: str) -> None:
        self.batch_id = batch_id
        self.status = status
        super().__init__(f"batch '{batch_id}' already exists (status {status}); choose another id")


class QueueFull(PromptqError):
    """Submitting would exceed the configured maximum of queued requests."""

    def __init__(self, message: str, *, queued: int, limit: int) -> None:
        super().__init__(message)
        self.queued = queued
        self.limit = limit


class RedisUnavailable(PromptqError):
    """Redis did not answer; the message says which URL (without password) and how to fix it."""


class UnsafePayload(PromptqError):
    """A payload read from Redis is not promptq JSON; it is rejected, never executed."""


class BackendError(PromptqError):
    """Raise this from a ``python:`` backend function to record a classified failure.

    ``status_code`` and ``code`` end up in the request's result line; ``retryable=True``
    makes promptq try the request again (with backoff, up to PROMPTQ_MAX_ATTEMPTS), as
    for an upstream's 5xx. Any other exception is recorded as ``backend_error``, not
    retried.
    """

    def __init__(
        self,
        message: str,
        *,
        status_code: int = 500,
        code: str = "backend_error",
        retryable: bool = False,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status_code = status_code
        self.code = code
        self.retryable = retryable

    def __reduce__(self) -> tuple[Any, ...]:
        # keyword-only arguments: rebuilt the same in a --backend-processes pool
        return (_rebuild_backend_error, (self.message, self.status_code, self.code, self.retryable))

    def __repr__(self) -> str:
        return (
            f"BackendError({self.message!r}, status_code={self.status_code}, "
            f"code={self.code!r}, retryable={self.retryable})"
        )


def _rebuild_backend_error(
    message: str, status_code: int, code: str, retryable: bool
) -> BackendError:
    return BackendError(message, status_code=status_code, code=code, retryable=retryable)


class UpstreamError(PromptqError):
    """One failed attempt against the upstream LLM API.

    ``code`` is what results report (``rate_limit_exceeded``, ``server_error``, ``timeout``,
    ``insufficient_quota``...); ``retry_after_s`` is the upstream's requested wait, if any;
    ``body`` is the upstream's parsed JSON answer, if there was one.
    """

    retryable = False

    def __init__(
        self,
        message: str,
        *,
        code: str,
        status_code: int | None = None,
        retry_after_s: float | None = None,
        body: Any = None,
        request_id: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.status_code = status_code
        self.retry_after_s = retry_after_s
        self.body = body
        self.request_id = request_id

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(code={self.code!r}, status_code={self.status_code!r}, "
            f"retry_after_s={self.retry_after_s!r})"
        )


class RetryableUpstreamError(UpstreamError):
    retryable = True


class FatalUpstreamError(UpstreamError):
    retryable = False


#: upstream answers that every other request of the batch would get too: never retried,
#: and they stop the batch instead of spending every attempt of every request on them
STOP_BATCH_CODES = frozenset(
    {
        "insufficient_quota",
        "invalid_api_key",
        "billing_hard_limit_reached",
        "upstream_unreachable",  # the circuit breaker gave up (worker.breaker)
        "not_supported",  # the server cannot run this endpoint (llama.cpp's 501)
    }
)
#: statuses that stop a batch whatever their code (the key or the account is refused)
STOP_BATCH_STATUSES = frozenset({401, 403})


def stops_batch(error: UpstreamError) -> bool:
    """True when ``error`` would fail every request of its batch (see STOP_BATCH_CODES)."""
    return not error.retryable and (
        error.code in STOP_BATCH_CODES or error.status_code in STOP_BATCH_STATUSES
    )
