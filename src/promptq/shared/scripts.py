"""Lua scripts: every multi-step change of promptq's state is one atomic script.

The scripts live in ``shared/lua/*.lua``, one step each, with a ``KEYS``/``ARGV`` header.
Each is loaded behind one prelude generated here from Python's definitions, so that no
script spells out a status or a constant of its own:

* ``S.QUEUED`` ... (``Status``) and the sets ``CLAIMABLE``, ``RUNNING``, ``STOPPABLE``,
  ``TERMINAL`` (``shared.status``) as Lua tables;
* ``now_s()``: Redis' clock as unix seconds with ms resolution (a decimal string), one
  clock for producers, workers and API replicas on every machine;
* ``service_score(batch_key)``: where a batch goes in the runnable index (its next turn,
  urgent batches ``URGENT_HEAD_START_MS`` ahead).

Scripts are called through the stores that own their keys (``shared.batches``,
``shared.chatqueue``, ``shared.registry``), never directly.
"""

from __future__ import annotations

from functools import cache
from importlib import resources
from typing import Any

from redis.asyncio import Redis
from redis.commands.core import AsyncScript

from promptq.shared.status import CLAIMABLE, RUNNING, STOPPABLE, TERMINAL, Status

#: an urgent batch's turn comes this much earlier than a bulk one's: it overtakes bulk
#: work queued less than this before it, and bulk work waiting longer goes first
URGENT_HEAD_START_MS = 60_000


def _lua_set(name: str, members: frozenset[Status]) -> str:
    inner = ", ".join(f"{m.value}=true" for m in sorted(members))
    return f"local {name} = {{{inner}}}\n"


@cache
def prelude() -> str:
    names = ", ".join(f"{s.name}='{s.value}'" for s in Status)
    return (
        f"local S = {{{names}}}\n"
        + _lua_set("CLAIMABLE", CLAIMABLE)
        + _lua_set("RUNNING", RUNNING)
        + _lua_set("STOPPABLE", STOPPABLE)
        + _lua_set("TERMINAL", TERMINAL)
        + f"local URGENT_HEAD_START_MS = {URGENT_HEAD_START_MS}\n"
        + """
local function now_s()
  local t = redis.call('TIME')
  return string.format('%.3f', tonumber(t[1]) + math.floor(tonumber(t[2]) / 1000) / 1000)
end
local function service_score(batch_key)
  -- ms with µs resolution: two scripts never run in the same µs, so turns never tie
  local t = redis.call('TIME')
  local ms = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
  if redis.call('HGET', batch_key, 'priority') == 'urgent' then
    ms = ms - URGENT_HEAD_START_MS
  end
  return ms
end
"""
    )


@cache
def source(name: str) -> str:
    """The full text of script ``name`` (prelude included), as Redis runs it."""
    body = resources.files("promptq.shared").joinpath("lua", f"{name}.lua").read_text("utf-8")
    return prelude() + body


def register(redis: Redis, name: str) -> AsyncScript:
    """Script ``name`` on ``redis`` (EVALSHA, with EVAL when Redis does not know it)."""
    return redis.register_script(source(name))


def decode(value: Any) -> str:
    """A Redis reply (bytes) as text."""
    return value.decode() if isinstance(value, bytes) else str(value)
