"""The result line: what a request ends as, in one definition.

    {"id": "batch_req_...", "custom_id": "q1", "response": {"status_code", "request_id",
     "body"} | null, "error": {"code", "message"} | null, "latency_ms": 812.4,
     "attempts": 1, "route": "realtime"}

The OpenAI Batch API output line plus ``latency_ms`` (first attempt to final answer,
retries and backoff included, queue wait excluded), ``attempts`` (0: never sent) and
``route``. Workers build it from an ``Outcome`` (``result_line``); the stop script
builds the lines of never-sent requests from ``stop_template``, a line of the same
shape with holes for the id and the custom_id; readers validate it as
``models.Result``.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

import orjson

from promptq.shared.errors import UpstreamError

#: how a request was answered (the ``route`` of its line)
REALTIME = "realtime"
BATCH_API = "batch-api"

#: the keys of every result line, in order (``models.Result`` has the same fields, plus
#: the ``cached`` marker that only a line answered from the cache carries)
FIELDS = ("id", "custom_id", "response", "error", "latency_ms", "attempts", "route")


@dataclass(slots=True)
class Outcome:
    """The final answer for one request after all attempts."""

    status_code: int | None  # last upstream HTTP status, None if none answered
    body: Any  # last upstream body (parsed JSON), if any
    request_id: str | None
    error: UpstreamError | None  # None on success
    attempts: int
    latency_ms: float  # first attempt to final answer, backoff included
    cached: bool = False  # answered from the cache, not by the upstream

    @property
    def ok(self) -> bool:
        return self.error is None


def new_line_id() -> str:
    return f"batch_req_{uuid.uuid4().hex}"


def line(
    *,
    custom_id: str,
    response: dict[str, Any] | None,
    error: dict[str, str] | None,
    latency_ms: float | None,
    attempts: int,
    route: str = REALTIME,
    line_id: str | None = None,
) -> dict[str, Any]:
    """A result line from its parts (the one place its keys are written)."""
    return {
        "id": line_id or new_line_id(),
        "custom_id": custom_id,
        "response": response,
        "error": error,
        "latency_ms": latency_ms,
        "attempts": attempts,
        "route": route,
    }


def result_line(
    custom_id: str, outcome: Outcome, *, route: str = REALTIME, line_id: str | None = None
) -> dict[str, Any]:
    """The line for a request that was sent (or tried to be), or answered from the cache
    (``line_id``: the provider's id of the line, for the batch-api route's)."""
    response = None
    if outcome.status_code is not None:
        response = {
            "status_code": outcome.status_code,
            "request_id": outcome.request_id,
            "body": outcome.body,
        }
    error = None
    if outcome.error is not None:
        error = {"code": outcome.error.code, "message": outcome.error.message}
    out = line(
        custom_id=custom_id,
        response=response,
        error=error,
        latency_ms=outcome.latency_ms,
        attempts=outcome.attempts,
        route=route,
        line_id=line_id,
    )
    if outcome.cached:
        out["cached"] = True
    return out


def internal_error(exc: BaseException) -> Outcome:
    """The outcome of a request that failed inside promptq (a bug, not an upstream answer)."""
    return Outcome(
        status_code=None,
        body=None,
        request_id=None,
        error=UpstreamError(f"internal error: {type(exc).__name__}", code="internal_error"),
        attempts=1,
        latency_ms=0.0,
    )


_ID_HOLE = "\x01id\x01"
_CID_HOLE = "\x01custom_id\x01"


def stop_template(code: str, message: str, *, route: str = REALTIME) -> tuple[str, str, str]:
    """The line of a never-sent request, cut around its id and custom_id: the stop script
    joins ``prefix + json(id) + middle + json(custom_id) + suffix``."""
    text = orjson.dumps(
        line(
            custom_id=_CID_HOLE,
            response=None,
            error={"code": code, "message": message},
            latency_ms=None,
            attempts=0,
            route=route,
            line_id=_ID_HOLE,
        )
    ).decode()
    prefix, rest = text.split(orjson.dumps(_ID_HOLE).decode())
    middle, suffix = rest.split(orjson.dumps(_CID_HOLE).decode())
    return prefix, middle, suffix
