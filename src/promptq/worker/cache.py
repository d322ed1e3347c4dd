"""No paying twice (opt-in): identical requests answered once.

A request whose endpoint and body are byte for byte identical (canonical JSON: keys
sorted) to one answered successfully within the TTL is answered from Redis
(``promptq:cache:{<sha256>}``, the upstream's body), without an upstream call; its line
says ``"cached": true`` and the batch's stats count it. Identical requests in flight at
the same time are sent once: the first takes a lock (``...:lock``, the worker's id) and
the others wait for its answer (in this worker on a future, in other workers by polling
the cache key), sending themselves only if it fails.

Lookups and stores of requests running at the same time go to Redis together (one
script call for all that start in the same turn of the event loop): a round trip per
request would cost more CPU than the request itself.

Off unless ``PROMPTQ_CACHE_TTL_S`` is set on the workers or a batch is submitted with
``--cache``: with a temperature above 0, identical requests are meant to get different
answers.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import uuid
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Generic, TypeVar

import orjson
from arq.connections import ArqRedis

from promptq.shared import keys, scripts
from promptq.shared.results import Outcome

#: a lock lives this long past the request's timeout (a dead holder frees it then)
LOCK_SLACK_S = 10.0
#: how often a request waiting for another worker's answer looks for it
POLL_S = 0.05
#: requests looked up or stored per script call at most
GROUP_MAX = 256
#: what a lookup says when this worker took the request's lock, or another holds it
MINE = b""
THEIRS = b"-"

logger = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")


def cache_key(endpoint: str, body: Any) -> str:
    canonical = orjson.dumps(body, option=orjson.OPT_SORT_KEYS)
    return hashlib.sha256(endpoint.encode() + b"\0" + canonical).hexdigest()


class Coalesced(Generic[T, R]):
    """Calls of one turn of the event loop, sent as one: ``await group(item)`` queues the
    item, and ``run(items)`` runs once for every item queued in the same turn (at most
    ``GROUP_MAX`` at a time)."""

    def __init__(self, run: Callable[[list[T]], Awaitable[Sequence[R]]]) -> None:
        self._run = run
        self._queued: list[tuple[T, asyncio.Future[R]]] = []
        self._tasks: set[asyncio.Task[None]] = set()

    async def __call__(self, item: T) -> R:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[R] = loop.create_future()
        if not self._queued:
            loop.call_soon(self._flush)
        self._queued.append((item, future))
        return await future

    def _flush(self) -> None:
        queued, self._queued = self._queued, []
        for start in range(0, len(queued), GROUP_MAX):
            task = asyncio.create_task(self._send(queued[start : start + GROUP_MAX]))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _send(self, group: list[tuple[T, asyncio.Future[R]]]) -> None:
        try:
            results = await self._run([item for item, _ in group])
        except Exception as exc:
            for _, future in group:
                if not future.done():
                    future.set_exception(exc)
            return
        for (_, future), result in zip(group, results, strict=True):
            if not future.done():
                future.set_result(result)


class ResponseCache:
    """The cache of one worker process (see the module docstring)."""

    def __init__(self, redis: ArqRedis, *, worker_id: str, timeout_s: float) -> None:
        self.redis = redis
        self.worker_id = worker_id
        self.lock_ms = int((timeout_s + LOCK_SLACK_S) * 1000)
        self._local: dict[str, asyncio.Future[Outcome]] = {}
        self._lookup_script = scripts.register(redis, "cache_lookup")
        self._store_script = scripts.register(redis, "cache_store")
        self._lookup: Coalesced[str, bytes] = Coalesced(self._lookups)
        self._store: Coalesced[tuple[str, bytes, int], int] = Coalesced(self._stores)

    async def run(
        self,
        endpoint: str,
        body: Any,
        *,
        ttl_s: int,
        send: Callable[[], Awaitable[Outcome]],
    ) -> Outcome:
        """The cached answer, the answer of an identical request in flight, or ``send()``'s
        (cached when it succeeds)."""
        digest = cache_key(endpoint, body)
        waiting = self._local.get(digest)
        if waiting is not None:  # an identical request of this worker is on the wire
            try:
                outcome = await asyncio.shield(waiting)
            except Exception:  # it broke: send this one itself
                return await send()
            return _cached(outcome.body) if outcome.ok else await send()
        # registered before any await: an identical request arriving meanwhile waits on it
        future: asyncio.Future[Outcome] = asyncio.get_running_loop().create_future()
        self._local[digest] = future
        try:
            outcome = await self._once(digest, ttl_s=ttl_s, send=send)
            future.set_result(outcome)
            return outcome
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # retrieved: nobody else may be waiting
            raise
        finally:
            if self._local.get(digest) is future:
                del self._local[digest]

    async def _once(
        self, digest: str, *, ttl_s: int, send: Callable[[], Awaitable[Outcome]]
    ) -> Outcome:
        while True:
            found = await self._lookup(digest)
            if found == MINE:
                break
            if found != THEIRS:
                return _cached(orjson.loads(found))
            await asyncio.sleep(POLL_S)  # another worker sends it: wait for its answer
        answer = b""
        try:
            outcome = await send()
            if outcome.ok:
                answer = orjson.dumps(outcome.body)
            return outcome
        finally:
            try:
                await self._store((digest, answer, ttl_s))  # and the lock goes
            except Exception as exc:  # Redis away: the answer stands, the lock expires
                logger.warning("could not cache an answer: %s", exc)

    async def _lookups(self, digests: list[str]) -> list[bytes]:
        pairs = [k for d in digests for k in (keys.cache(d), keys.cache_lock(d))]
        found = await self._lookup_script(keys=pairs, args=[self.worker_id, self.lock_ms])
        return [bytes(v) for v in found]

    async def _stores(self, items: list[tuple[str, bytes, int]]) -> list[int]:
        pairs = [k for d, _, _ in items for k in (keys.cache(d), keys.cache_lock(d))]
        args: list[Any] = [self.worker_id]
        for _, answer, ttl_s in items:
            args += [answer, ttl_s]
        await self._store_script(keys=pairs, args=args)
        return [1] * len(items)


def _cached(body: Any) -> Outcome:
    return Outcome(
        status_code=200,
        body=body,
        request_id=f"req_cached_{uuid.uuid4().hex[:16]}",
        error=None,
        attempts=0,
        latency_ms=0.0,
        cached=True,
    )
