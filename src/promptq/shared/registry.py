"""The worker registry: heartbeats, liveness on Redis' clock, the dead.

Each worker beats every ``heartbeat_s``: its hash ``promptq:worker:<id>`` (host, pid,
counters, ``last_beat``) is renewed with a TTL of ``LIVENESS_BEATS`` beats (at least
``MIN_TTL_S``), and ``promptq:workers`` scores it by the beat's time on Redis' clock.

* live: beat within the liveness window (``LIVENESS_BEATS * heartbeat_s``) on Redis'
  clock. Every reader (``promptq workers``, /metrics, backpressure, ``run``) asks here.
* dead: no beat within the window *and* its hash expired: its unfinished requests go
  back to their queues (``worker.recovery``). A worker whose beat is only late is never
  taken for dead while its hash lives.

No machine's clock is compared with another's: the scripts read Redis' ``TIME``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from arq.connections import ArqRedis

from promptq.shared import keys, scripts
from promptq.shared.scripts import decode

#: a worker is live while its last beat is this many heartbeats old at most
LIVENESS_BEATS = 3
#: the heartbeat hash lives at least this long (short heartbeats in tests)
MIN_TTL_S = 5.0
#: entries of workers gone for longer than this leave the index (its rule for shrinking)
FORGET_AFTER_S = 3600.0

#: heartbeat fields that are numbers (``promptq workers --json`` prints them as numbers)
NUMERIC_FIELDS = frozenset(
    {
        "pid",
        "started_at",
        "last_beat",
        "cost_usd",
        "saved_usd",
        "cached",
        "concurrency",
        "limit",
        "in_flight",
        "claimed",
        "done",
        "failed",
        "retries",
        "tokens",
    }
)


def liveness_window_s(heartbeat_s: float) -> float:
    return LIVENESS_BEATS * heartbeat_s


#: numeric heartbeat fields that stay floats even when whole
FLOAT_FIELDS = frozenset({"last_beat", "cost_usd", "saved_usd"})


def typed(beat: Mapping[str, str]) -> dict[str, Any]:
    """A heartbeat hash with its numeric fields as numbers."""
    out: dict[str, Any] = {}
    for name, value in beat.items():
        if name in NUMERIC_FIELDS:
            try:
                number = float(value)
            except ValueError:
                out[name] = value
                continue
            whole = number.is_integer() and name not in FLOAT_FIELDS
            out[name] = int(number) if whole else number
        else:
            out[name] = value
    return out


class WorkerRegistry:
    """Heartbeats of every worker in one Redis."""

    def __init__(self, redis: ArqRedis, *, heartbeat_s: float) -> None:
        self.redis = redis
        self.heartbeat_s = heartbeat_s
        self._beat = scripts.register(redis, "worker_beat")
        self._window = scripts.register(redis, "worker_window")

    @property
    def window_s(self) -> float:
        return liveness_window_s(self.heartbeat_s)

    def beat_args(self, worker_id: str, fields: Mapping[str, Any]) -> tuple[list[str], list[Any]]:
        """Keys and arguments of one beat (to send it in a pipeline with other writes)."""
        ttl_ms = int(max(self.window_s, MIN_TTL_S) * 1000)
        args: list[Any] = [worker_id, ttl_ms]
        for name, value in fields.items():
            args += [name, value]
        return [keys.worker(worker_id), keys.WORKERS], args

    async def beat(self, worker_id: str, fields: Mapping[str, Any], *, client: Any = None) -> None:
        """One heartbeat (``client``: a pipeline to send it with)."""
        keys_, args = self.beat_args(worker_id, fields)
        await self._beat(keys=keys_, args=args, client=client)

    async def live_ids(self) -> list[str]:
        """Workers that beat within the liveness window (on Redis' clock)."""
        raw = await self._window(keys=[keys.WORKERS], args=[self.window_s, "live"])
        return [decode(w) for w in raw]

    async def live(self) -> list[dict[str, Any]]:
        """Every live worker's heartbeat, typed, with its ``id``."""
        ids = await self.live_ids()
        if not ids:
            return []
        async with self.redis.pipeline(transaction=False) as pipe:
            for worker_id in ids:
                pipe.hgetall(keys.worker(worker_id))
            beats = await pipe.execute()
        return [
            {"id": worker_id, **typed({decode(k): decode(v) for k, v in beat.items()})}
            for worker_id, beat in zip(ids, beats, strict=True)
            if beat  # the hash expires with the heartbeat
        ]

    async def count_live(self) -> int:
        return len(await self.live_ids())

    async def dead(self, *, me: str) -> list[str]:
        """Workers to recover: no beat within the window, heartbeat hash expired."""
        stale = [
            decode(w)
            for w in await self._window(keys=[keys.WORKERS], args=[self.window_s, "stale"])
        ]
        stale = [w for w in stale if w != me]
        if not stale:
            return []
        async with self.redis.pipeline(transaction=False) as pipe:
            for worker_id in stale:
                pipe.exists(keys.worker(worker_id))
            alive = await pipe.execute()
        return [w for w, exists in zip(stale, alive, strict=True) if not int(exists)]

    async def forget(self, worker_id: str) -> None:
        """Remove a worker from the registry (it stopped, or it was recovered)."""
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.delete(keys.worker(worker_id))
            pipe.zrem(keys.WORKERS, worker_id)
            await pipe.execute()
