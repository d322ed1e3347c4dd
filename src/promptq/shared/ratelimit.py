"""Cluster-wide rate limits (RPM, TPM) and upstream cooldowns, shared by every worker.

The limits are GCRA (the generic cell rate algorithm, a token bucket kept as one
timestamp) in Redis, one Lua call per attempt, with *reservations*: the script books the
next free send time and says how long to wait, so nobody polls and nobody is refused.

* Requests are spaced evenly, ``60 / rpm`` seconds apart across all workers: an upstream
  that enforces its limit per second or per minute never sees more than it allows.
* Tokens use a bucket of one minute's worth (OpenAI's own model): a request books its
  estimated tokens (prompt estimate + ``max_tokens``) before it is sent, and the
  difference with the response's ``usage`` is given back (or charged) afterwards.
* A 429, or an ``x-ratelimit-remaining-*`` of 0, sets one cooldown for the upstream that
  every worker honours (max of the deadlines, so a burst of 429s is one pause, not N).
  Without RPM/TPM the cooldown is kept locally and refreshed from Redis with each
  heartbeat, so an unlimited worker makes no extra round trip per request.

Timestamps come from Redis' ``TIME``: one clock for every machine.
"""

from __future__ import annotations

import hashlib
import logging
import math
import re
import time
from collections.abc import Mapping
from typing import Any

from redis.asyncio import Redis

from promptq.shared import keys

logger = logging.getLogger(__name__)

#: completion tokens booked for a request that sets no max_tokens
DEFAULT_COMPLETION_TOKENS = 256
#: the token bucket holds this much time's worth of tokens (ms)
TOKEN_BURST_MS = 60_000

_NOW_MS = """
local _t = redis.call('TIME')
local now = tonumber(_t[1]) * 1000 + tonumber(_t[2]) / 1000
"""

# KEYS: limiter hash. ARGV: rpm (0 = none), tpm (0 = none), tokens, token burst ms.
# Books the next send time; returns the wait in ms (as a string, fractional).
RESERVE = (
    _NOW_MS
    + """
local send = now
local cd = tonumber(redis.call('HGET', KEYS[1], 'cooldown_until') or '0')
if cd > send then send = cd end
local rpm = tonumber(ARGV[1])
if rpm > 0 then
  local tat = tonumber(redis.call('HGET', KEYS[1], 'req_tat') or '0')
  if tat > send then send = tat end
  redis.call('HSET', KEYS[1], 'req_tat', string.format('%.3f', send + 60000 / rpm))
end
local tpm = tonumber(ARGV[2])
if tpm > 0 then
  local per_token = 60000 / tpm
  local tat = tonumber(redis.call('HGET', KEYS[1], 'tok_tat') or '0')
  if tat < now then tat = now end
  tat = tat + tonumber(ARGV[3]) * per_token
  local earliest = tat - tonumber(ARGV[4])
  if earliest > send then send = earliest end
  redis.call('HSET', KEYS[1], 'tok_tat', string.format('%.3f', tat))
end
redis.call('PEXPIRE', KEYS[1], 3600000)
return string.format('%.3f', send - now)
"""
)

# KEYS: limiter hash. ARGV: tpm, tokens to give back (negative: charge more).
ADJUST_TOKENS = """
local tat = tonumber(redis.call('HGET', KEYS[1], 'tok_tat') or '0')
if tat > 0 then
  redis.call('HSET', KEYS[1], 'tok_tat',
             string.format('%.3f', tat - tonumber(ARGV[2]) * 60000 / tonumber(ARGV[1])))
end
return 1
"""

# KEYS: limiter hash. ARGV: pause ms. Returns the cooldown deadline (ms, unix).
COOLDOWN = (
    _NOW_MS
    + """
local until_ms = now + tonumber(ARGV[1])
local cd = tonumber(redis.call('HGET', KEYS[1], 'cooldown_until') or '0')
if until_ms > cd then
  redis.call('HSET', KEYS[1], 'cooldown_until', string.format('%.3f', until_ms))
  redis.call('PEXPIRE', KEYS[1], 3600000)
  cd = until_ms
end
return string.format('%.3f', cd)
"""
)

_DURATION_RE = re.compile(r"(\d+(?:\.\d+)?)(ms|h|m|s)")
_UNIT_S = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration_s(text: str) -> float | None:
    """OpenAI's reset durations: ``1s``, ``6m0s``, ``20ms``, ``1h2m3.5s`` -> seconds."""
    parts = _DURATION_RE.findall(text.strip())
    if not parts or "".join(n + u for n, u in parts) != text.strip():
        return None
    return sum(float(n) * _UNIT_S[u] for n, u in parts)


def _text_of(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return " ".join(_text_of(v) for v in value)
    if isinstance(value, dict):
        return _text_of(value.get("text") or value.get("content") or "")
    return ""


def estimate_tokens(body: Mapping[str, Any]) -> int:
    """Tokens a request may use: prompt estimate + ``max_tokens`` (or 256).

    The prompt is counted with tiktoken when it is installed and its encoding is
    available offline, else as characters / 4 (OpenAI's rule of thumb), at least 1.
    """
    text = _text_of(body.get("messages") or body.get("prompt") or body.get("input") or "")
    prompt = _count(text)
    completion = body.get("max_completion_tokens") or body.get("max_tokens")
    if not isinstance(completion, int) or completion < 0:
        completion = DEFAULT_COMPLETION_TOKENS
    return prompt + completion


_encoder: Any = None
_encoder_tried = False


def _count(text: str) -> int:
    global _encoder, _encoder_tried
    if not _encoder_tried:
        _encoder_tried = True
        try:  # optional, and its encodings may need a download: fall back quietly
            import tiktoken

            _encoder = tiktoken.get_encoding("cl100k_base")
        except Exception:
            _encoder = None
    if _encoder is not None:
        return max(1, len(_encoder.encode(text, disallowed_special=())))
    return max(1, math.ceil(len(text) / 4))


def scope_for(upstream_url: str, model: str | None) -> str:
    """Limiter scope: the upstream base URL, plus the model when limits are per model."""
    raw = upstream_url if model is None else f"{upstream_url}|{model}"
    return hashlib.sha1(raw.encode()).hexdigest()[:16]


class RateLimiter:
    """One worker's handle on the cluster-wide limits of one upstream."""

    def __init__(
        self,
        redis: Redis,
        *,
        upstream_url: str,
        rpm: int | None,
        tpm: int | None,
        per_model: bool = False,
    ) -> None:
        self.redis = redis
        self.upstream_url = upstream_url
        self.rpm = rpm or 0
        self.tpm = tpm or 0
        self.per_model = per_model
        self._reserve = redis.register_script(RESERVE)
        self._adjust = redis.register_script(ADJUST_TOKENS)
        self._cooldown = redis.register_script(COOLDOWN)
        self._local_cooldown_until: dict[str, float] = {}  # key -> unix seconds

    def __repr__(self) -> str:
        return f"RateLimiter(rpm={self.rpm or None}, tpm={self.tpm or None})"

    @property
    def enforcing(self) -> bool:
        return bool(self.rpm or self.tpm)

    def key(self, model: str | None) -> str:
        return keys.ratelimit(scope_for(self.upstream_url, model if self.per_model else None))

    async def reserve(self, model: str | None, tokens: int) -> float:
        """Book a send slot; returns the seconds to wait before sending."""
        key = self.key(model)
        if not self.enforcing:
            return max(0.0, self._local_cooldown_until.get(key, 0.0) - time.time())
        wait_ms = await self._reserve(keys=[key], args=[self.rpm, self.tpm, tokens, TOKEN_BURST_MS])
        return max(0.0, float(wait_ms) / 1000)

    async def settle_tokens(self, model: str | None, *, booked: int, used: int) -> None:
        """Give back booked tokens the request did not use (or charge the excess)."""
        if self.tpm and booked != used:
            await self._adjust(keys=[self.key(model)], args=[self.tpm, booked - used])

    async def cool_down(self, model: str | None, pause_s: float, *, why: str) -> None:
        """Pause sending to this upstream for every worker for ``pause_s`` seconds."""
        key = self.key(model)
        deadline_ms = float(await self._cooldown(keys=[key], args=[pause_s * 1000]))
        if deadline_ms / 1000 > self._local_cooldown_until.get(key, 0.0) + 0.5:
            logger.warning("upstream %s: %s; pausing all workers for %.1fs", self.upstream_url,
                           why, pause_s)  # fmt: skip
        self._local_cooldown_until[key] = deadline_ms / 1000

    async def refresh(self) -> None:
        """Learn cooldowns set by other workers (called with each heartbeat)."""
        for key in list(self._local_cooldown_until) or [self.key(None)]:
            raw = await self.redis.hget(key, "cooldown_until")  # type: ignore[misc]
            if raw is not None:
                self._local_cooldown_until[key] = float(raw) / 1000

    def observe_headers(self, headers: Mapping[str, str]) -> float | None:
        """A pause (seconds) if ``x-ratelimit-remaining-*`` says the budget is spent."""
        pause = None
        for kind in ("requests", "tokens"):
            remaining = headers.get(f"x-ratelimit-remaining-{kind}")
            reset = headers.get(f"x-ratelimit-reset-{kind}")
            if remaining is None or reset is None:
                continue
            try:
                spent = int(float(remaining)) <= 0
            except ValueError:
                continue
            reset_s = parse_duration_s(reset)
            if spent and reset_s:
                pause = max(pause or 0.0, reset_s)
        return pause


async def limiter_states(redis: Any, now_s: float) -> list[dict[str, Any]]:
    """Every upstream (+ model) scope cooling down or with an open circuit breaker, for
    ``promptq top`` and the dashboard: ``{"scope", "state", "seconds_left" | "reason"}``."""
    states: list[dict[str, Any]] = []
    async for key in redis.scan_iter(match=f"{keys.PREFIX}:ratelimit:*", count=200):
        until = await redis.hget(key, "cooldown_until")
        if until and float(until) / 1000 > now_s:
            states.append({"scope": key.decode().split(":", 2)[2], "state": "cooldown",
                           "seconds_left": round(float(until) / 1000 - now_s, 1)})  # fmt: skip
    async for key in redis.scan_iter(match=f"{keys.PREFIX}:breaker:*", count=200):
        reason = await redis.hget(key, "reason")
        states.append({"scope": key.decode().split(":", 2)[2], "state": "circuit open",
                       "reason": (reason or b"").decode()})  # fmt: skip
    return states
