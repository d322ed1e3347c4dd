"""Execution backends: what a worker does with one attempt of a request.

A backend answers one attempt at a time (``attempt(endpoint, body) -> Attempt``); the
retries, backoff, rate limits and latency around it are the same for every backend
(``worker.execute.Executor``). ``load(settings)`` picks one from ``PROMPTQ_BACKEND``:

    openai                  HTTP to PROMPTQ_UPSTREAM_URL + the endpoint (``backends.http``)
    python:MODULE:FUNCTION  FUNCTION(endpoint, body) -> dict (``backends.python``)

Adding a backend is one module with a class that follows ``Backend``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from contextlib import AbstractAsyncContextManager
from typing import Any, NamedTuple, Protocol

from promptq.shared.errors import UpstreamError
from promptq.shared.settings import Settings


class Attempt(NamedTuple):
    """One attempt's answer: HTTP-like status (None: no answer), parsed body, request id,
    the classified error (None: success) and the answer's headers."""

    status_code: int | None
    body: Any
    request_id: str | None
    error: UpstreamError | None
    headers: Mapping[str, str]


NO_HEADERS: Mapping[str, str] = {}


class Relay(Protocol):
    """Where a streamed request's events go (``worker.relay.StreamRelay``)."""

    started: bool
    cancelled: bool

    def send(self, event: str) -> bool: ...

    def watching(self, task: asyncio.Task[Any]) -> AbstractAsyncContextManager[None]: ...


class Backend(Protocol):
    """What the executor needs of a backend."""

    #: shown in logs and heartbeats (never a secret)
    label: str
    #: at most this many attempts make progress at once (a pool's size), None: no cap
    parallelism: int | None

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def attempt(
        self, endpoint: str, body: dict[str, Any], *, relay: Relay | None = None
    ) -> Attempt:
        """One attempt; with ``relay``, a backend that can stream sends the events there
        (one that cannot answers whole, and the API makes the events)."""
        ...

    @property
    def in_flight(self) -> int: ...


def load(settings: Settings) -> Backend:
    """The backend ``settings.backend`` names; raises ``ConfigError`` when it cannot be
    loaded (unknown name, module or function missing), before any request is taken."""
    spec = settings.backend
    if spec == "openai":
        from promptq.worker.backends.http import HttpBackend

        return HttpBackend(
            base_url=settings.upstream_url,
            api_key=settings.api_key,
            concurrency=settings.concurrency,
            timeout_s=settings.timeout_s,
            keepalive=settings.upstream_keepalive,
        )
    from promptq.worker.backends.python import PythonBackend

    return PythonBackend.from_spec(
        spec,
        threads=settings.backend_threads,
        processes=settings.backend_processes,
        timeout_s=settings.timeout_s,
    )
