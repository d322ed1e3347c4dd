"""The worker's slot pool: how many requests one worker process holds at once.

A slot is held from the moment a request is claimed until its result is handed to its
sink (backoff waits included), so a worker never takes more work than it can run and
other workers get the rest. ``capacity`` is PROMPTQ_CONCURRENCY (capped by a
``python:`` backend's pool size).

Adaptive concurrency (AIMD, opt-in, PROMPTQ_ADAPTIVE_CONCURRENCY): the limit starts
small and doubles per round of successes until the first 429 or timeout (slow start),
then grows by one per round and shrinks by 30% (at most once a second) on 429s and
timeouts, the way TCP finds a link's capacity.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from promptq.shared.errors import UpstreamError

logger = logging.getLogger(__name__)

#: adaptive concurrency: at most one multiplicative decrease per this many seconds
AIMD_DECREASE_GAP_S = 1.0
AIMD_DECREASE_FACTOR = 0.7
#: claims wait until this fraction of the slots is free, so they come in groups
LOW_WATER_FRACTION = 8


class Slots:
    """Slots held, the current limit, and a way to wait for free ones."""

    def __init__(self, capacity: int, *, adaptive: bool = False) -> None:
        self.capacity = capacity
        self.adaptive = adaptive
        self.limit = float(min(capacity, 4) if adaptive else capacity)
        self.held = 0
        self._slow_start = adaptive
        self._last_decrease = 0.0
        self._changed = asyncio.Event()

    def __repr__(self) -> str:
        return f"Slots(held={self.held}, limit={int(self.limit)}, capacity={self.capacity})"

    @property
    def free(self) -> int:
        return max(0, int(self.limit) - self.held)

    @property
    def low_water(self) -> int:
        # Claim in groups: waiting until an eighth of the slots are free keeps the number
        # of claim round trips per request low when the worker is saturated.
        return max(1, int(self.limit) // LOW_WATER_FRACTION)

    def cap(self, capacity: int) -> None:
        """Hold at most ``capacity`` from now on (the upstream runs no more than that)."""
        self.capacity = max(1, min(self.capacity, capacity))
        self.limit = min(self.limit, float(self.capacity))

    def take(self, n: int = 1) -> None:
        self.held += n

    def give(self, n: int = 1) -> None:
        self.held -= n
        self._changed.set()

    async def wait_until(self, ready: Callable[[], bool]) -> None:
        """Return once ``ready()`` holds (checked again whenever a slot is given back)."""
        while not ready():
            self._changed.clear()
            await self._changed.wait()

    def notify(self) -> None:
        """Wake the waiters (e.g. to notice a shutdown)."""
        self._changed.set()

    def observe(self, error: UpstreamError | None) -> None:
        """AIMD: told about every attempt (None: success)."""
        if not self.adaptive:
            return
        if error is None:
            step = 1.0 if self._slow_start else 1.0 / self.limit
            self.limit = min(float(self.capacity), self.limit + step)
            return
        overloaded = (error.status_code == 429 and error.retryable) or error.code == "timeout"
        now = time.monotonic()
        if overloaded and now - self._last_decrease >= AIMD_DECREASE_GAP_S:
            self._slow_start = False
            self._last_decrease = now
            self.limit = max(1.0, self.limit * AIMD_DECREASE_FACTOR)
            logger.info("adaptive concurrency: %s, limit now %d", error.code, int(self.limit))
