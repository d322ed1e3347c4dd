"""Fetch-with-retry against an OpenAI-compatible upstream.

One ``Fetcher`` per worker process: one aiohttp session whose connection pool is sized
to the concurrency, and one ``asyncio.Semaphore`` that bounds in-flight upstream
requests across every job the process runs. The slot is held for one attempt only;
backoff waits do not occupy it. With a ``RateLimiter``, every attempt first books its
send time in the cluster-wide limits (and waits for it outside the semaphore).
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from random import Random
from types import TracebackType
from typing import Any

import aiohttp
import orjson
from pydantic import SecretStr

from promptq.shared.errors import RetryableUpstreamError, UpstreamError
from promptq.shared.ratelimit import RateLimiter, estimate_tokens
from promptq.worker.retry import RetryPolicy, classify

logger = logging.getLogger(__name__)

Sleep = Callable[[float], Awaitable[None]]
#: told about every attempt's outcome (None = success); adaptive concurrency listens
AttemptObserver = Callable[[UpstreamError | None], None]


@dataclass(slots=True)
class Outcome:
    """The final answer for one request after all attempts."""

    status_code: int | None  # last upstream HTTP status, None if none answered
    body: Any  # last upstream body (parsed JSON), if any
    request_id: str | None
    error: UpstreamError | None  # None on success
    attempts: int
    latency_ms: float  # first attempt to final answer, backoff included

    @property
    def ok(self) -> bool:
        return self.error is None


class Fetcher:
    """Sends requests with retries. Use as ``async with Fetcher(...) as fetcher``."""

    def __init__(
        self,
        *,
        base_url: str,
        api_key: SecretStr | None,
        concurrency: int,
        timeout_s: float,
        policy: RetryPolicy,
        sleep: Sleep = asyncio.sleep,
        rng: Random | None = None,
        clock: Callable[[], float] = time.monotonic,
        limiter: RateLimiter | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self._api_key = api_key
        self.concurrency = concurrency
        self.timeout = aiohttp.ClientTimeout(total=timeout_s)
        self.policy = policy
        self._sleep = sleep
        self._rng = rng or Random()
        self._clock = clock
        self.semaphore = asyncio.Semaphore(concurrency)
        self._session: aiohttp.ClientSession | None = None
        self.in_flight = 0  # attempts currently on the wire
        self.limiter = limiter
        self.on_attempt: AttemptObserver | None = None

    async def __aenter__(self) -> Fetcher:
        headers = {"Content-Type": "application/json", "User-Agent": "promptq"}
        if self._api_key is not None:
            headers["Authorization"] = f"Bearer {self._api_key.get_secret_value()}"
        connector = aiohttp.TCPConnector(limit=self.concurrency, ttl_dns_cache=300)
        self._session = aiohttp.ClientSession(
            headers=headers, connector=connector, timeout=self.timeout, raise_for_status=False
        )
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def url_for(self, endpoint: str) -> str:
        """``/v1/chat/completions`` -> ``{base_url}/chat/completions`` (base ends in /v1)."""
        path = endpoint.removeprefix("/v1")
        return f"{self.base_url}{path}"

    async def fetch(self, endpoint: str, body: dict[str, Any]) -> Outcome:
        """Send one request, retrying retryable failures per the policy."""
        url = self.url_for(endpoint)
        payload = orjson.dumps(body)
        model = body.get("model") if isinstance(body.get("model"), str) else None
        tokens = estimate_tokens(body) if self.limiter is not None and self.limiter.tpm else 0
        start: float | None = None
        attempt = 0
        while True:
            attempt += 1
            if self.limiter is not None:
                await self._wait_for_limits(model, tokens)
            if start is None:
                # latency_ms runs from the first attempt: waiting for a rate-limit slot
                # before it is queueing, not latency (waits before retries count)
                start = self._clock()
            status, answer, request_id, error, headers = await self._attempt(url, payload)
            if self.on_attempt is not None:
                self.on_attempt(error)
            if self.limiter is not None:
                await self._report_to_limiter(model, tokens, answer, error, headers)
            if error is None or not error.retryable or attempt >= self.policy.max_attempts:
                return Outcome(
                    status_code=status,
                    body=answer,
                    request_id=request_id,
                    error=error,
                    attempts=attempt,
                    latency_ms=round((self._clock() - start) * 1000, 3),
                )
            delay = self.policy.delay_s(attempt, error.retry_after_s, self._rng)
            logger.debug("attempt %d failed (%s); retrying in %.2fs", attempt, error.code, delay)
            await self._sleep(delay)

    async def _wait_for_limits(self, model: str | None, tokens: int) -> None:
        assert self.limiter is not None
        try:
            wait_s = await self.limiter.reserve(model, tokens)
        except Exception as exc:  # Redis unreachable: send unthrottled rather than stall
            logger.warning("rate limiter unavailable (%s); sending without it", exc)
            return
        if wait_s > 0:
            await self._sleep(wait_s)

    async def _report_to_limiter(
        self,
        model: str | None,
        tokens: int,
        answer: Any,
        error: UpstreamError | None,
        headers: Mapping[str, str],
    ) -> None:
        assert self.limiter is not None
        try:
            used = 0
            if error is None and isinstance(answer, dict):
                usage = answer.get("usage")
                if isinstance(usage, dict) and isinstance(usage.get("total_tokens"), int):
                    used = usage["total_tokens"]
                else:
                    used = tokens  # no usage reported: keep what was booked
            await self.limiter.settle_tokens(model, booked=tokens, used=used)
            if error is not None and error.status_code == 429 and error.retryable:
                await self.limiter.cool_down(
                    model, error.retry_after_s or 1.0, why=f"429 {error.code}"
                )
            pause_s = self.limiter.observe_headers(headers)
            if pause_s:
                await self.limiter.cool_down(model, pause_s, why="rate-limit budget spent")
        except Exception as exc:
            logger.warning("rate limiter unavailable (%s)", exc)

    async def _attempt(
        self, url: str, payload: bytes
    ) -> tuple[int | None, Any, str | None, UpstreamError | None, Mapping[str, str]]:
        assert self._session is not None, "use Fetcher as an async context manager"
        async with self.semaphore:
            self.in_flight += 1
            try:
                async with self._session.post(url, data=payload) as resp:
                    raw = await resp.read()
                    status = resp.status
                    headers = resp.headers
            except TimeoutError:
                return (
                    None,
                    None,
                    None,
                    _retryable(f"no answer within {self.timeout.total:g}s", "timeout"),
                    _NO_HEADERS,
                )
            except (aiohttp.ClientError, OSError) as exc:
                # str(exc) names host and reason, never our headers (the key stays secret)
                return (
                    None,
                    None,
                    None,
                    _retryable(
                        f"connection failed: {type(exc).__name__}: {exc}", "connection_error"
                    ),
                    _NO_HEADERS,
                )
            finally:
                self.in_flight -= 1
        body, error = classify(status, headers, raw)
        request_id = headers.get("x-request-id") or f"req_{uuid.uuid4().hex}"
        return status, body, request_id, error, headers


_NO_HEADERS: Mapping[str, str] = {}


def _retryable(message: str, code: str) -> RetryableUpstreamError:
    return RetryableUpstreamError(message, code=code)
