"""A circuit breaker for an upstream that refuses every connection, shared by all workers.

Without it, a dead upstream (a wrong URL, a server that is down) costs every request all
of its attempts: 2,000 prompts, 8,000 connection errors, minutes of backoff, no result.
With it:

* **closed** (normal): attempts go out; a worker that sees ``THRESHOLD`` connection
  failures in a row opens the breaker for everyone (one Redis hash per upstream,
  ``promptq:breaker:{scope}``) and logs one warning that says what to check;
* **open**: no request spends an attempt; they wait, and one probe at a time (whichever
  worker takes the probe slot, every 0.5 s doubling to 10 s) tries the upstream. A
  probe that gets any HTTP answer closes the breaker and everybody carries on;
* after ``down_s`` seconds open (PROMPTQ_UPSTREAM_DOWN_S), waiting requests end with
  ``upstream_unreachable``, which stops their batch: its other requests are not sent.

In the normal path this costs nothing: no Redis call unless the breaker is open, and
workers learn that another worker opened it from their heartbeat (``refresh``) or from
their own failures.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from arq.connections import ArqRedis

from promptq.shared import keys
from promptq.shared.errors import FatalUpstreamError, UpstreamError
from promptq.shared.ratelimit import scope_for
from promptq.shared.scripts import decode

logger = logging.getLogger(__name__)

#: connection failures in a row that open the breaker
THRESHOLD = 3
PROBE_FIRST_S = 0.5
PROBE_MAX_S = 10.0
#: the code of the requests given up on
UNREACHABLE = "upstream_unreachable"

# KEYS: breaker hash.  ARGV: reason, first probe interval ms.
# Opens the breaker (if closed): down_since and the first probe time, on Redis' clock.
# Returns {down_since_ms, 1 if this call opened it}.
_OPEN = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if redis.call('HSETNX', KEYS[1], 'down_since', now) == 1 then
  redis.call('HSET', KEYS[1], 'reason', ARGV[1], 'probe_at', now + tonumber(ARGV[2]),
             'interval_ms', ARGV[2])
  redis.call('PEXPIRE', KEYS[1], 86400000)
  return {now, 1}
end
return {tonumber(redis.call('HGET', KEYS[1], 'down_since')), 0}
"""

# KEYS: breaker hash.  ARGV: max probe interval ms.
# While open: the caller may probe now (it takes the slot; the next probe is one interval
# later, the interval doubling) or must wait. Returns {'closed'} | {'probe', down_ms} |
# {'wait', wait_ms, down_ms}.
_CHECK = """
local down = redis.call('HGET', KEYS[1], 'down_since')
if not down then return {'closed'} end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local probe_at = tonumber(redis.call('HGET', KEYS[1], 'probe_at') or '0')
local down_ms = tostring(now - tonumber(down))
if now >= probe_at then
  local interval = tonumber(redis.call('HGET', KEYS[1], 'interval_ms') or '500')
  redis.call('HSET', KEYS[1], 'probe_at', now + interval,
             'interval_ms', math.min(interval * 2, tonumber(ARGV[1])))
  return {'probe', down_ms}
end
return {'wait', tostring(probe_at - now), down_ms}
"""


def breaker_key(upstream_url: str) -> str:
    return keys.breaker(scope_for(upstream_url, None))


class CircuitBreaker:
    """One worker's handle on the breaker of one upstream (see the module docstring)."""

    def __init__(
        self,
        redis: ArqRedis,
        *,
        upstream_url: str,
        down_s: float,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.redis = redis
        self.upstream_url = upstream_url
        self.down_s = down_s
        self.key = breaker_key(upstream_url)
        self._sleep = sleep
        self._open = redis.register_script(_OPEN)
        self._check = redis.register_script(_CHECK)
        self._failures = 0
        #: the breaker is (or was lately seen) open: attempts ask Redis first
        self.tripped = False

    def __repr__(self) -> str:
        return f"CircuitBreaker({self.upstream_url}, {'open' if self.tripped else 'closed'})"

    async def before_attempt(self) -> UpstreamError | None:
        """Wait while the breaker is open (no attempt is spent); None: go ahead (the
        breaker is closed, or this attempt is the probe), else the error to end the
        request with (the upstream has been down for longer than ``down_s``)."""
        while self.tripped:
            try:
                verdict = await self._check(keys=[self.key], args=[int(PROBE_MAX_S * 1000)])
            except Exception as exc:  # Redis trouble: do not hold requests on our account
                logger.debug("circuit breaker unavailable: %s", exc)
                return None
            kind = decode(verdict[0])
            if kind == "closed":
                self.tripped = False
                return None
            down_s = float(verdict[-1]) / 1000
            if down_s > self.down_s:
                return FatalUpstreamError(
                    f"the upstream at {self.upstream_url} refused every connection for "
                    f"{down_s:.0f}s: is it running, and is PROMPTQ_UPSTREAM_URL right?",
                    code=UNREACHABLE,
                )
            if kind == "probe":
                return None
            await self._sleep(min(float(verdict[1]) / 1000, PROBE_MAX_S))
        return None

    async def after_attempt(self, error: UpstreamError | None) -> None:
        """Count connection failures; open the breaker, or close it on any answer."""
        if error is not None and error.code == "connection_error":
            self._failures += 1
            if self._failures >= THRESHOLD or self.tripped:
                await self._trip(error)
            return
        self._failures = 0
        if self.tripped:  # an answer came back (this was a probe): close it for everyone
            self.tripped = False
            try:
                if await self.redis.delete(self.key):
                    logger.warning("upstream %s answers again; sending", self.upstream_url)
            except Exception as exc:
                logger.debug("circuit breaker unavailable: %s", exc)

    async def _trip(self, error: UpstreamError) -> None:
        self.tripped = True
        try:
            _down, opened = await self._open(
                keys=[self.key], args=[error.message[:300], int(PROBE_FIRST_S * 1000)]
            )
        except Exception as exc:
            logger.debug("circuit breaker unavailable: %s", exc)
            return
        if int(opened):
            logger.warning(
                "upstream %s refuses connections (%s): requests wait and one probe at a "
                "time tries it; after %.0fs they fail with %s. Is it running, and is "
                "PROMPTQ_UPSTREAM_URL right?",
                self.upstream_url,
                error.message,
                self.down_s,
                UNREACHABLE,
            )

    async def refresh(self) -> None:
        """Learn that another worker opened the breaker (called with each heartbeat)."""
        self.tripped = bool(await self.redis.exists(self.key))
