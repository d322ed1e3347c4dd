"""Configuration and live counters of the mock upstream."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from promptq.mock._flavours import FLAVOURS

__all__ = ["MockConfig", "MockStats"]

#: llama-server as started with --parallel 4 --ctx-size 2048 (512 tokens per slot)
_LLAMACPP_DEFAULTS: dict[str, Any] = {
    "context_tokens": 512,
    "slots": 4,
    "keepalive_s": 5.0,
    "keepalive_max": 100,
    "embeddings": False,
}


@dataclass(frozen=True, kw_only=True)
class MockConfig:
    """Behaviour of the mock upstream. Defaults: instant, fault-free answers.

    Fault rates are fractions in ``[0, 1]`` of requests *without* ``[[mock ...]]``
    directives; their sum must not exceed 1 (one uniform draw picks at most one fault).

    Attributes:
        latency_ms: fixed latency added to every response, milliseconds (default 0).
        jitter_ms: plus ``uniform(0, jitter_ms)`` milliseconds (default 0).
        error_rate: fraction answered 500 ``server_error`` (default 0).
        rate_429: fraction answered 429 ``rate_limit_exceeded`` (default 0).
        retry_after_s: if set, 429 rate-limit answers carry ``retry-after`` (seconds, may
            be fractional, e.g. ``"1.5"``) and ``retry-after-ms`` (default ``None``).
        hang_rate: fraction never answered until the client gives up or the server
            shuts down (default 0).
        malformed_rate: fraction answered 200 with truncated, invalid JSON (default 0).
        drop_rate: fraction whose connection is closed without a response (default 0).
        seed: RNG seed for reproducible fault injection and jitter (default ``None``).
        model: model reported when the request names none (default ``"mock-gpt"``).
        rpm_limit: enforce this many requests per minute (a token bucket holding one
            second's worth): beyond it, 429 ``rate_limit_exceeded`` with ``retry-after``;
            every answer carries ``x-ratelimit-*-requests`` headers (default ``None``).
        max_concurrency: answer 429 to requests beyond this many in flight, like a
            self-hosted server at capacity (default ``None``).
        batch_turnaround_s: the Batch API's turnaround: a provider batch completes this
            long after it is created (default 0: at once).
        flavour: which server to imitate: ``openai`` (default), ``vllm``, ``ollama``,
            ``llamacpp`` or ``tgi`` — their error bodies (:mod:`promptq.mock._flavours`)
            and, for ``llamacpp``, its HTTP layer and slots (the defaults below).
        api_key: if set, a request without ``Authorization: Bearer <api_key>`` gets the
            flavour's authentication error (default ``None``: no check).
        context_tokens: prompts estimated longer than this get the flavour's context
            error (default ``None``: unlimited; ``llamacpp``: 512, its context per slot).
        slots: requests processed at once; the others queue, as on a self-hosted server
            (default ``None``: unlimited; ``llamacpp``: 4, its ``--parallel``).
        http_threads: connections served at once, each from accept until it closes, as
            a thread-per-connection server; the others wait to be served (default
            ``None``: unlimited; ``llamacpp``: ``slots + 4``, its ``--threads-http``).
        keepalive_s: an idle keep-alive connection is closed after this long (default
            ``None``: aiohttp's 75 s; ``llamacpp``: 5, announced as ``Keep-Alive:
            timeout=5, max=100``).
        keepalive_max: requests served on one connection before it is closed (default
            ``None``: unlimited; ``llamacpp``: 100, cpp-httplib's default).
        embeddings: ``POST /v1/embeddings`` is served (default ``True``; ``llamacpp``:
            ``False``, answered 501 as ``llama-server`` without ``--embeddings`` does).
        stream_chunks: a streamed answer's content comes in this many pieces (default 8).
        stream_interval_ms: milliseconds between streamed events (default 0); the
            configured latency comes before the first.
    """

    latency_ms: float = 0.0
    jitter_ms: float = 0.0
    error_rate: float = 0.0
    rate_429: float = 0.0
    retry_after_s: float | None = None
    hang_rate: float = 0.0
    malformed_rate: float = 0.0
    drop_rate: float = 0.0
    seed: int | None = None
    model: str = "mock-gpt"
    rpm_limit: int | None = None
    max_concurrency: int | None = None
    batch_turnaround_s: float = 0.0
    flavour: str = "openai"
    api_key: str | None = None
    context_tokens: int | None = None
    slots: int | None = None
    http_threads: int | None = None
    keepalive_s: float | None = None
    keepalive_max: int | None = None
    embeddings: bool | None = None
    stream_chunks: int = 8
    stream_interval_ms: float = 0.0

    def __post_init__(self) -> None:
        if self.flavour not in FLAVOURS:
            raise ValueError(
                f"MockConfig.flavour must be one of {', '.join(FLAVOURS)}, got {self.flavour!r}"
            )
        defaults = _LLAMACPP_DEFAULTS if self.flavour == "llamacpp" else {"embeddings": True}
        for name, value in defaults.items():
            if getattr(self, name) is None:
                object.__setattr__(self, name, value)
        if self.flavour == "llamacpp" and self.http_threads is None:
            object.__setattr__(self, "http_threads", (self.slots or 1) + 4)
        for name in ("context_tokens", "slots", "http_threads", "keepalive_max"):
            limit = getattr(self, name)
            if limit is not None and limit < 1:
                raise ValueError(f"MockConfig.{name} must be >= 1, got {limit}")
        if self.keepalive_s is not None and (
            not math.isfinite(self.keepalive_s) or self.keepalive_s <= 0
        ):
            raise ValueError(f"MockConfig.keepalive_s must be > 0, got {self.keepalive_s}")
        for name in ("rpm_limit", "max_concurrency"):
            limit = getattr(self, name)
            if limit is not None and limit < 1:
                raise ValueError(f"MockConfig.{name} must be >= 1, got {limit}")
        if self.stream_chunks < 1:
            raise ValueError(f"MockConfig.stream_chunks must be >= 1, got {self.stream_chunks}")
        for name in ("latency_ms", "jitter_ms", "batch_turnaround_s", "stream_interval_ms"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"MockConfig.{name} must be a finite number >= 0, got {value}")
        if self.retry_after_s is not None and (
            not math.isfinite(self.retry_after_s) or self.retry_after_s < 0
        ):
            raise ValueError(f"MockConfig.retry_after_s must be >= 0, got {self.retry_after_s}")
        rates = {
            "error_rate": self.error_rate,
            "rate_429": self.rate_429,
            "hang_rate": self.hang_rate,
            "malformed_rate": self.malformed_rate,
            "drop_rate": self.drop_rate,
        }
        for name, rate in rates.items():
            if not 0.0 <= rate <= 1.0:
                raise ValueError(f"MockConfig.{name} must be in [0, 1], got {rate}")
        if sum(rates.values()) > 1.0 + 1e-9:
            raise ValueError(f"MockConfig fault rates must sum to <= 1, got {rates}")
        if not self.model:
            raise ValueError("MockConfig.model must be a non-empty string")


@dataclass(slots=True)
class MockStats:
    """Live counters of ``POST /v1/chat/completions`` (other endpoints are not counted).

    Attributes:
        requests: chat requests received, including invalid ones.
        responses_by_status: responses sent, by HTTP status (malformed ones count as 200;
            hangs and drops send nothing and are not counted here).
        in_flight: chat requests currently being handled (a gauge).
        max_in_flight: high-water mark of ``in_flight`` since start or the last reset.
        hangs: requests that hung; drops: connections closed without a response;
        malformed: 200 answers with invalid JSON.
    """

    requests: int = 0
    responses_by_status: dict[int, int] = field(default_factory=dict)
    in_flight: int = 0
    max_in_flight: int = 0
    hangs: int = 0
    drops: int = 0
    malformed: int = 0
    rate_limited: int = 0  # 429s sent by the enforcing modes (rpm_limit, max_concurrency)
    #: Batch API calls by kind: upload, create, retrieve, list, cancel, content
    batch_calls: dict[str, int] = field(default_factory=dict)
    #: open TCP connections (a gauge), their high-water mark, and how many waited for a
    #: free HTTP thread (``http_threads``) and for how long in all
    #: streamed answers begun, and those whose client left before the end
    streams: int = 0
    streams_cancelled: int = 0
    connections: int = 0
    max_connections: int = 0
    connections_waited: int = 0
    connection_wait_s: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready copy; ``responses_by_status`` keys become strings (as JSON has it)."""
        return {
            "requests": self.requests,
            "responses_by_status": {
                str(status): count for status, count in sorted(self.responses_by_status.items())
            },
            "in_flight": self.in_flight,
            "max_in_flight": self.max_in_flight,
            "hangs": self.hangs,
            "drops": self.drops,
            "malformed": self.malformed,
            "rate_limited": self.rate_limited,
            "batch_calls": dict(sorted(self.batch_calls.items())),
            "streams": self.streams,
            "streams_cancelled": self.streams_cancelled,
            "connections": self.connections,
            "max_connections": self.max_connections,
            "connections_waited": self.connections_waited,
            "connection_wait_s": round(self.connection_wait_s, 3),
        }

    def reset(self) -> None:
        """Zero the counters. ``in_flight`` is a gauge, so it is kept (and seeds the max)."""
        self.requests = 0
        self.responses_by_status.clear()
        self.max_in_flight = self.in_flight
        self.hangs = 0
        self.drops = 0
        self.malformed = 0
        self.rate_limited = 0
        self.batch_calls.clear()
        self.streams = 0
        self.streams_cancelled = 0
        self.max_connections = self.connections
        self.connections_waited = 0
        self.connection_wait_s = 0.0
