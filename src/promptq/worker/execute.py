"""Fetch-with-retry, for any backend: one request's attempts until its final answer.

Every attempt first books its send time in the cluster-wide limits (RPM/TPM, shared
cooldowns; ``shared.ratelimit``) and waits for it outside the backend's slots, then
asks the backend (``worker.backends``). A retryable failure waits
``RetryPolicy.delay_s`` (full jitter; the upstream's Retry-After is a floor) and tries
again, up to ``max_attempts``. ``latency_ms`` runs from the first attempt to the final
answer: waiting for a rate-limit slot before the first attempt is queueing, not
latency; waits before retries count.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from random import Random
from types import TracebackType
from typing import Any

from promptq.shared.errors import UpstreamError
from promptq.shared.ratelimit import RateLimiter, estimate_tokens
from promptq.shared.results import Outcome
from promptq.worker.backends import Backend, Relay
from promptq.worker.breaker import CircuitBreaker
from promptq.worker.retry import RetryPolicy

logger = logging.getLogger(__name__)

Sleep = Callable[[float], Awaitable[None]]
#: told about every attempt's outcome (None = success); adaptive concurrency listens
AttemptObserver = Callable[[UpstreamError | None], None]


class Executor:
    """Runs requests through ``backend`` with retries and limits. Use as ``async with``
    (it starts and closes the backend)."""

    def __init__(
        self,
        backend: Backend,
        *,
        policy: RetryPolicy,
        limiter: RateLimiter | None = None,
        breaker: CircuitBreaker | None = None,
        sleep: Sleep = asyncio.sleep,
        rng: Random | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.backend = backend
        self.policy = policy
        self.limiter = limiter
        self.breaker = breaker
        self._sleep = sleep
        self._rng = rng or Random()
        self._clock = clock
        self.on_attempt: AttemptObserver | None = None

    async def __aenter__(self) -> Executor:
        await self.backend.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.backend.close()

    @property
    def in_flight(self) -> int:
        return self.backend.in_flight

    async def execute(
        self, endpoint: str, body: dict[str, Any], *, relay: Relay | None = None
    ) -> Outcome:
        """Run one request, retrying retryable failures per the policy. With ``relay``
        (a streamed request) events go there as they come, and no attempt is retried
        once one has been relayed."""
        limiter, breaker = self.limiter, self.breaker
        model = body.get("model") if isinstance(body.get("model"), str) else None
        tokens = estimate_tokens(body) if limiter is not None and limiter.tpm else 0
        start: float | None = None
        attempt = 0
        while True:
            attempt += 1
            if breaker is not None and breaker.tripped:
                refusal = await breaker.before_attempt()  # no attempt is spent waiting
                if refusal is not None:
                    return Outcome(
                        status_code=None,
                        body=None,
                        request_id=None,
                        error=refusal,
                        attempts=attempt - 1,
                        latency_ms=0.0 if start is None else _ms(self._clock() - start),
                    )
            if limiter is not None:
                await self._wait_for_limits(limiter, model, tokens)
            if start is None:
                start = self._clock()
            answer = await self.backend.attempt(endpoint, body, relay=relay)
            error = answer.error
            if self.on_attempt is not None:
                self.on_attempt(error)
            if breaker is not None:
                await breaker.after_attempt(error)
            if limiter is not None:
                await self._report(limiter, model, tokens, answer.body, error, answer.headers)
            if (
                error is None
                or not error.retryable
                or attempt >= self.policy.max_attempts
                or (relay is not None and relay.started)
            ):
                return Outcome(
                    status_code=answer.status_code,
                    body=answer.body,
                    request_id=answer.request_id,
                    error=error,
                    attempts=attempt,
                    latency_ms=_ms(self._clock() - start),
                )
            delay = self.policy.delay_s(attempt, error.retry_after_s, self._rng)
            logger.debug("attempt %d failed (%s); retrying in %.2fs", attempt, error.code, delay)
            await self._sleep(delay)

    async def _wait_for_limits(self, limiter: RateLimiter, model: str | None, tokens: int) -> None:
        try:
            wait_s = await limiter.reserve(model, tokens)
        except Exception as exc:  # Redis unreachable: send unthrottled rather than stall
            logger.warning("rate limiter unavailable (%s); sending without it", exc)
            return
        if wait_s > 0:
            await self._sleep(wait_s)

    async def _report(
        self,
        limiter: RateLimiter,
        model: str | None,
        tokens: int,
        answer: Any,
        error: UpstreamError | None,
        headers: Mapping[str, str],
    ) -> None:
        try:
            used = 0
            if error is None and isinstance(answer, dict):
                usage = answer.get("usage")
                if isinstance(usage, dict) and isinstance(usage.get("total_tokens"), int):
                    used = usage["total_tokens"]
                else:
                    used = tokens  # no usage reported: keep what was booked
            await limiter.settle_tokens(model, booked=tokens, used=used)
            if error is not None and error.status_code == 429 and error.retryable:
                await limiter.cool_down(model, error.retry_after_s or 1.0, why=f"429 {error.code}")
            pause_s = limiter.observe_headers(headers)
            if pause_s:
                await limiter.cool_down(model, pause_s, why="rate-limit budget spent")
        except Exception as exc:
            logger.warning("rate limiter unavailable (%s)", exc)


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 3)
