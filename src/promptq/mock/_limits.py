"""Enforcing modes of the mock: a requests-per-minute limit and a concurrency capacity.

They make the mock behave like a real rate-limited upstream, so promptq's cluster-wide
limiter and adaptive concurrency can be tested against something that says no.
"""

from __future__ import annotations

import math
import time


class RequestBucket:
    """Token bucket for ``rpm`` requests per minute, holding at most one second's worth
    (at least one request): a client that spreads its requests evenly never sees a 429,
    one that bursts does. Times in seconds from ``time.monotonic``."""

    def __init__(self, rpm: int) -> None:
        self.rpm = rpm
        self.rate_per_s = rpm / 60.0
        self.capacity = max(1.0, self.rate_per_s)
        self.tokens = self.capacity
        self._last = time.monotonic()

    def _refill(self) -> None:
        now = time.monotonic()
        self.tokens = min(self.capacity, self.tokens + (now - self._last) * self.rate_per_s)
        self._last = now

    def take(self) -> float:
        """Take one request; returns 0.0 if allowed, else seconds until one is available."""
        self._refill()
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return 0.0
        return (1.0 - self.tokens) / self.rate_per_s

    def headers(self) -> dict[str, str]:
        """OpenAI's ``x-ratelimit-*-requests`` headers for the current state."""
        to_full_s = (self.capacity - self.tokens) / self.rate_per_s
        return {
            "x-ratelimit-limit-requests": str(self.rpm),
            "x-ratelimit-remaining-requests": str(math.floor(self.tokens)),
            "x-ratelimit-reset-requests": f"{max(to_full_s * 1000, 0):.0f}ms",
        }
