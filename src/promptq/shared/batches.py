"""The batch store: every batch key, every batch script and every transition, in one place.

Producers create, write and queue batches and stop them; workers claim, record, hand
back and finish; the HTTP API fails batches whose input is invalid. None of them builds
a key or calls a script: they call this store. Keys of one batch share the ``{ID}``
hash tag; the scripts that also keep one of promptq's indexes current (``runnable``,
``batches``, ``active``) name those keys too.

A batch's requests wait in its ``:pending`` list. The runnable index lists the batches
with pending requests, scored by their next turn: a claim takes from the batch at the
front and moves it to the back of its lane, so batches of one lane take turns and an
urgent batch overtakes bulk ones (``scripts.URGENT_HEAD_START_MS``). Every step that
puts requests back in ``:pending`` lists the batch again, in the same script.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from arq.connections import ArqRedis

from promptq.shared import keys, scripts
from promptq.shared.errors import BatchError
from promptq.shared.models import QueuedRequest
from promptq.shared.results import BATCH_API, Outcome, stop_template
from promptq.shared.scripts import decode
from promptq.shared.stats import latency_bucket, usage_tokens
from promptq.shared.status import RUNNING, Status, parse

logger = logging.getLogger(__name__)

#: never-sent requests given their result per stop script call (keeps each call short)
STOP_CHUNK = 500
CANCELLED_CODE = "batch_cancelled"
CANCELLED_MESSAGE = "the batch was cancelled before this request was sent"
#: finished batches swept per call (each: one UNLINK of its keys)
SWEEP_BATCH = 20
#: a big key of a finished batch expires this long after its TTL, should no worker
#: sweep it (then Redis frees it on its main thread, unless lazyfree-lazy-expire is on)
SWEEP_BACKSTOP_S = 3 * 24 * 3600
#: ids read per command when a batch is read in order (keeps each command short)
READ_CHUNK = 1000
#: an aggregator job not started within this time is dropped by arq (the batch is gone)
AGGREGATE_JOB_EXPIRES_S = 7 * 24 * 3600


#: items per result in ``record``'s arguments: custom_id, line, what the tally counts
RECORD_ARGS = 3


def record_args(
    custom_id: str,
    line: bytes,
    outcome: Outcome,
    *,
    cost: tuple[float, float] | None,
    tokens: tuple[int, int] | None = None,
) -> tuple[Any, ...]:
    """The arguments that record one result: its custom_id, its line, and what the tally
    counts in one string (``batch_record.lua`` reads it): ``ok|retries|latency_ms|bucket|
    tokens_in|tokens_out|cost|saved|cached|code`` (latency and bucket empty for a request
    never sent, cost and saved for a model with no price). One string, not ten
    arguments: packing a command costs the client a few µs per argument.
    ``cost``: (paid, saved) in USD, or None when the model has no price; ``tokens``:
    the answer's (input, output) tokens, when the caller has them."""
    sent = outcome.attempts > 0 and not outcome.cached
    if not outcome.ok:
        tokens_in, tokens_out = 0, 0
    else:
        tokens_in, tokens_out = usage_tokens(outcome.body) if tokens is None else tokens
    if outcome.cached:
        tokens_in = tokens_out = 0
    tokens_in, tokens_out = max(tokens_in, 0), max(tokens_out, 0)
    if outcome.cached or (tokens_in == 0 and tokens_out == 0):
        priced = "0.0|0.0"  # nothing was paid for
    elif cost is None:
        priced = "|"
    else:
        priced = f"{cost[0]!r}|{cost[1]!r}"
    latency = f"{outcome.latency_ms!r}|{latency_bucket(outcome.latency_ms)}" if sent else "|"
    code = "" if outcome.error is None else outcome.error.code
    tally = (
        f"{1 if outcome.ok else 0}|{max(outcome.attempts - 1, 0)}|{latency}|{tokens_in}|"
        f"{tokens_out}|{priced}|{1 if outcome.cached else 0}|{code}"
    )
    return custom_id, line, tally


@dataclass(frozen=True, slots=True)
class Claim:
    """What one claim took: ``remaining`` requests still pending (-1: the batch takes no
    claims: stopped, finished or gone), the batch's priority and endpoint, the requests."""

    remaining: int
    priority: str
    endpoint: str
    requests: list[QueuedRequest]
    token: str = ""
    cache_ttl_s: int | None = None


@dataclass(frozen=True, slots=True)
class Appended:
    """What one append did: requests written so far, and whether the batch is stopped
    (then the caller stops it again once done, so the new ones end the same way)."""

    written: int
    stopped: bool


@dataclass(frozen=True, slots=True)
class Recorded:
    """What one record call did: results newly recorded, whether this call made the batch
    final (exactly one caller ever sees True), whether its failure rate is over the limit,
    whether its spend reached its ``max_cost_usd``."""

    added: int
    became_final: bool
    too_many_failures: bool
    over_budget: bool = False


@dataclass(frozen=True, slots=True)
class Shard:
    """One shard of a batch of the batch-api route: input order lines [start, end), and
    how far it got (``state``: new, running, downloading, settling; see
    ``worker.sources.batchapi``)."""

    batch_id: str
    k: int
    start: int
    end: int
    fields: dict[str, str]

    @property
    def state(self) -> str:
        return self.fields.get("state") or "new"

    @property
    def member(self) -> str:
        return keys.shard_member(self.batch_id, self.k)

    @property
    def size(self) -> int:
        return self.end - self.start

    def get(self, name: str) -> str | None:
        value = self.fields.get(name)
        return value or None


@dataclass(frozen=True, slots=True)
class Settled:
    """What one settle call of a shard did (see ``BatchStore.settle_shard``)."""

    done: bool
    pushed: int
    became_final: bool
    stopped: bool


@dataclass(frozen=True, slots=True)
class StopInfo:
    """How a stopped batch ends: its final status, and the code and message of the lines of
    requests that were never sent."""

    final_status: str
    code: str
    message: str
    reason: str


class BatchStore:
    """promptq's batches in one Redis (owns their keys and scripts)."""

    def __init__(self, redis: ArqRedis) -> None:
        self.redis = redis
        self._create = scripts.register(redis, "batch_create")
        self._queue = scripts.register(redis, "batch_queue")
        self._append = scripts.register(redis, "batch_append")
        self._claim = scripts.register(redis, "batch_claim")
        self._record = scripts.register(redis, "batch_record")
        self._finish = scripts.register(redis, "batch_finish")
        self._release = scripts.register(redis, "batch_release")
        self._stop = scripts.register(redis, "batch_stop")
        self._fail_validating = scripts.register(redis, "batch_fail_validating")
        self._relist = scripts.register(redis, "batch_relist")
        self._sweep_due = scripts.register(redis, "sweep_due")
        self._shard_define = scripts.register(redis, "shard_define")
        self._shard_take = scripts.register(redis, "shard_take")
        self._shard_update = scripts.register(redis, "shard_update")
        self._shard_settle = scripts.register(redis, "shard_settle")

    # -- producing -----------------------------------------------------------------------

    async def create(self, batch_id: str, fields: Mapping[str, str | int | float]) -> str:
        """Create the batch in status ``validating`` (a batch left ``validating`` by a
        producer that died is started over). Returns the status of an existing batch
        that kept the id, or '' when created."""
        args = [item for pair in fields.items() for item in pair]
        reply = await self._create(
            keys=[
                keys.batch(batch_id),
                keys.requests(batch_id),
                keys.pending(batch_id),
                keys.order(batch_id),
            ],
            args=args,
        )
        return decode(reply)

    async def append(
        self, batch_id: str, requests: Sequence[QueuedRequest], *, pending: bool = True
    ) -> Appended:
        """Write requests of a batch, in input order (one script call; a ``validating``
        batch's requests wait for ``queue``, a queued one's can be claimed at once).
        ``pending=False``: stored and in the input order, but not claimable (the batch-api
        route's requests wait for their shard)."""
        args: list[Any] = [batch_id, "1" if pending else "0"]
        for r in requests:
            args += [r.custom_id, r.to_json()]
        written, stopped = await self._append(
            keys=[
                keys.batch(batch_id),
                keys.requests(batch_id),
                keys.pending(batch_id),
                keys.order(batch_id),
                keys.RUNNABLE,
            ],
            args=args,
        )
        if int(written) < 0:
            raise BatchError(f"batch {batch_id} is gone (expired or deleted) while loading")
        return Appended(int(written), bool(int(stopped)))

    async def queue(self, batch_id: str, total: int, *, written: int | None = None) -> None:
        """Flip a batch whose first ``written`` requests (default: all ``total``) are in to
        ``queued``, list it, and wake the workers; until the rest is written it is
        ``loading``. Raises ``BatchError`` when the batch is not ``validating`` or fewer
        requests made it than ``written``."""
        flipped, detail = await self._queue(
            keys=[
                keys.batch(batch_id),
                keys.order(batch_id),
                keys.BATCHES,
                keys.RUNNABLE,
                keys.ACTIVE,
                keys.pending(batch_id),
            ],
            args=[batch_id, total, total if written is None else written],
        )
        if int(flipped) != 1:
            raise BatchError(f"batch {batch_id} could not be queued: {decode(detail)}")
        await self.wake()

    async def wake(self) -> None:
        """Tell idle workers that a batch has requests to claim."""
        await self.redis.publish(keys.WAKEUP_CHANNEL, b"1")

    async def fail_validating(
        self, batch_id: str, *, reason: str, errors_json: str, ttl_s: int
    ) -> str:
        """End a ``validating`` batch as ``failed`` with OpenAI-style ``errors`` (JSON);
        returns its status afterwards (a batch that moved on is left alone)."""
        status = await self._fail_validating(
            keys=[
                keys.batch(batch_id),
                keys.requests(batch_id),
                keys.pending(batch_id),
                keys.BATCHES,
                keys.order(batch_id),
            ],
            args=[batch_id, ttl_s, reason, errors_json],
        )
        return decode(status)

    # -- reading -------------------------------------------------------------------------

    async def read(self, batch_id: str) -> dict[str, str]:
        """The batch hash, decoded ({} for no such batch)."""
        raw = await self.redis.hgetall(keys.batch(batch_id))  # type: ignore[misc]
        return {decode(k): decode(v) for k, v in raw.items()}

    async def result_lines(self, batch_id: str) -> AsyncIterator[bytes]:
        """Every result line recorded so far (stored JSON, any order)."""
        async for _cid, value in self.redis.hscan_iter(keys.results(batch_id), count=1000):
            yield value

    async def input_order(self, batch_id: str) -> AsyncIterator[str]:
        """Every custom_id of the batch, in input order (read in chunks)."""
        start = 0
        while True:
            chunk = await self.redis.lrange(keys.order(batch_id), start, start + READ_CHUNK - 1)  # type: ignore[misc]
            for cid in chunk:
                yield decode(cid)
            if len(chunk) < READ_CHUNK:
                return
            start += READ_CHUNK

    async def results_in_input_order(self, batch_id: str) -> AsyncIterator[bytes]:
        """The result lines recorded so far, in input order (chunked reads)."""
        ids: list[str] = []
        async for cid in self.input_order(batch_id):
            ids.append(cid)
            if len(ids) == READ_CHUNK:
                for line in await self._results_of(batch_id, ids):
                    yield line
                ids = []
        for line in await self._results_of(batch_id, ids):
            yield line

    async def requests_of(self, batch_id: str, custom_ids: list[str]) -> list[QueuedRequest]:
        """The stored requests of these custom_ids (chunked reads; expired ones missing)."""
        found: list[QueuedRequest] = []
        for start in range(0, len(custom_ids), READ_CHUNK):
            chunk = custom_ids[start : start + READ_CHUNK]
            values: list[bytes | None] = await self.redis.hmget(keys.requests(batch_id), chunk)  # type: ignore[misc]
            found += [QueuedRequest.from_json(v) for v in values if v is not None]
        return found

    async def link_retry(self, batch_id: str, retry_id: str) -> bool:
        """Note that ``retry_id`` retries the batch; False when another retry was first."""
        return bool(await self.redis.hsetnx(keys.batch(batch_id), "retried_by", retry_id))  # type: ignore[misc]

    async def _results_of(self, batch_id: str, ids: list[str]) -> list[bytes]:
        if not ids:
            return []
        values: list[bytes | None] = await self.redis.hmget(keys.results(batch_id), ids)  # type: ignore[misc]
        return [v for v in values if v is not None]

    async def tally(self, batch_id: str) -> dict[str, str]:
        """The batch's running tally (``shared.stats``)."""
        raw = await self.redis.hgetall(keys.tally(batch_id))  # type: ignore[misc]
        return {decode(k): decode(v) for k, v in raw.items()}

    async def status(self, batch_id: str) -> Status | None:
        return parse(await self.redis.hget(keys.batch(batch_id), "status"))  # type: ignore[misc]

    async def fields(self, batch_id: str, *names: str) -> list[str | None]:
        raw: list[bytes | None] = await self.redis.hmget(keys.batch(batch_id), list(names))  # type: ignore[misc]
        return [None if v is None else decode(v) for v in raw]

    async def stop_info(self, batch_id: str) -> StopInfo | None:
        """How the batch ends if it was stopped, else None."""
        final, code, message, reason = await self.fields(
            batch_id, "final_status", "stop_code", "stop_message", "reason"
        )
        if not final:
            return None
        return StopInfo(
            final_status=final,
            code=code or CANCELLED_CODE,
            message=message or CANCELLED_MESSAGE,
            reason=reason or "",
        )

    async def pending_total(self) -> int:
        """Requests waiting to be claimed in every running batch. Batches that no longer
        run leave the ``active`` set on the way (its rule for shrinking)."""
        active = await self.active()
        if not active:
            return 0
        async with self.redis.pipeline(transaction=False) as pipe:
            for batch_id in active:
                pipe.llen(keys.pending(batch_id))
                pipe.hget(keys.batch(batch_id), "status")
            replies = await pipe.execute()
        queued = 0
        gone = []
        for batch_id, length, status in zip(active, replies[::2], replies[1::2], strict=True):
            if parse(status) not in RUNNING:
                gone.append(batch_id)
                continue
            queued += int(length)
        if gone:
            await self.redis.srem(keys.ACTIVE, *gone)  # type: ignore[misc]
        return queued

    # -- stopping ------------------------------------------------------------------------

    async def stop(
        self, batch_id: str, *, code: str, message: str, final_status: str, reason: str
    ) -> tuple[str, bool]:
        """Stop dispatching a batch and give every never-sent request a result with
        ``code``. ``final_status`` is ``cancelled`` for a user's cancel, ``failed`` for
        promptq's own stops. Returns the status after the call ('' if the batch does not
        exist) and whether this call made the batch final (its aggregator is then
        enqueued)."""
        prefix, middle, suffix = stop_template(code, message)
        became_final = False
        while True:
            status, remaining, final = await self._stop(
                keys=[
                    keys.batch(batch_id),
                    keys.pending(batch_id),
                    keys.results(batch_id),
                    keys.events(batch_id),
                    keys.RUNNABLE,
                    keys.tally(batch_id),
                    keys.SHARDS,
                ],
                args=[batch_id, STOP_CHUNK, code, message, final_status, reason,
                      prefix, middle, suffix],
            )  # fmt: skip
            if int(final):
                became_final = True
                await self.request_aggregation(batch_id)
            if int(remaining) == 0:
                return decode(status), became_final

    async def cancel(self, batch_id: str) -> str:
        """A user's cancel (see ``Batch.cancel``); returns the status after it."""
        status, _ = await self.stop(
            batch_id,
            code=CANCELLED_CODE,
            message=CANCELLED_MESSAGE,
            final_status=Status.CANCELLED,
            reason="cancelled by the user",
        )
        return status

    async def request_aggregation(self, batch_id: str, *, defer_s: float = 0.0) -> None:
        """Enqueue the batch's aggregator job (arq; a fixed job id, so arq keeps one). The
        job does nothing unless the batch is finalizing."""
        await self.redis.enqueue_job(
            "aggregate",
            batch_id,
            _job_id=keys.aggregate_job_id(batch_id),
            _defer_by=defer_s or None,
            _expires=AGGREGATE_JOB_EXPIRES_S,
        )

    # -- working -------------------------------------------------------------------------

    async def runnable(self, limit: int) -> list[str]:
        """Up to ``limit`` batches with requests to claim, the next turn first."""
        raw = await self.redis.zrange(keys.RUNNABLE, 0, limit - 1)
        return [decode(b) for b in raw]

    async def claim(
        self, batch_id: str, n: int, worker_id: str, *, previous_token: str = ""
    ) -> Claim:
        """Claim up to ``n`` requests of the batch for ``worker_id`` (idempotent: a claim
        that redis-py sends again after a lost reply takes the same requests).
        ``previous_token``: the token of this worker's previous claim of the batch (its
        record goes)."""
        token = uuid.uuid4().hex
        reply = await self._claim(
            keys=[
                keys.batch(batch_id),
                keys.pending(batch_id),
                keys.inflight(batch_id),
                keys.requests(batch_id),
                keys.claims(batch_id),
                keys.RUNNABLE,
            ],
            args=[n, worker_id, batch_id, token, previous_token],
        )
        remaining = int(reply[0])
        if remaining < 0:
            return Claim(remaining=-1, priority="", endpoint="", requests=[])
        requests = [QueuedRequest.from_json(raw) for raw in reply[4:] if raw]
        cache_ttl = decode(reply[3])
        return Claim(
            remaining=remaining,
            priority=decode(reply[1]),
            endpoint=decode(reply[2]),
            requests=requests,
            token=token if requests else previous_token,
            cache_ttl_s=int(cache_ttl) if cache_ttl else None,
        )

    async def relist(self, batch_id: str) -> bool:
        """List a batch with pending requests as runnable (resuming it); True if listed."""
        listed = await self._relist(
            keys=[keys.batch(batch_id), keys.pending(batch_id), keys.RUNNABLE], args=[batch_id]
        )
        return bool(int(listed))

    async def record(self, batch_id: str, args: Sequence[Any]) -> Recorded:
        """Record results: ``args`` holds ``RECORD_ARGS`` items per result (see
        ``record_args``). Each custom_id counts once, whatever happens."""
        added, final, too_many, over_budget = await self._record(
            keys=[
                keys.batch(batch_id),
                keys.results(batch_id),
                keys.inflight(batch_id),
                keys.events(batch_id),
                keys.requests(batch_id),
                keys.tally(batch_id),
            ],
            args=[len(args) // RECORD_ARGS, *args],
        )
        return Recorded(int(added), bool(int(final)), bool(int(too_many)), bool(int(over_budget)))

    async def release(
        self, batch_id: str, custom_ids: Iterable[str] | None = None, *, owner: str | None = None
    ) -> int:
        """Hand claimed, unfinished requests back to the front of the batch's queue: the
        given ones, or all that ``owner`` holds. Requests handed back to a stopped batch
        end with the stop's code at once. Returns how many were handed back."""
        if owner is not None:
            args: list[Any] = [batch_id, "owner", owner]
        else:
            args = [batch_id, "ids", *(custom_ids or ())]
        n, stopped = await self._release(
            keys=[
                keys.batch(batch_id),
                keys.pending(batch_id),
                keys.inflight(batch_id),
                keys.results(batch_id),
                keys.RUNNABLE,
            ],
            args=args,
        )
        if int(n):
            if int(stopped):
                await self.stop_again(batch_id)
            else:
                await self.wake()
        return int(n)

    async def stop_again(self, batch_id: str) -> None:
        """Requests came back to a stopped batch: they end with the stop's code too."""
        stop = await self.stop_info(batch_id)
        if stop is not None:
            await self.stop(
                batch_id,
                code=stop.code,
                message=stop.message,
                final_status=stop.final_status,
                reason=stop.reason,
            )

    async def owned(self, batch_id: str, worker_id: str) -> set[str]:
        """The custom_ids ``worker_id`` holds in flight in the batch."""
        me = worker_id.encode()
        return {
            decode(cid)
            async for cid, owner in self.redis.hscan_iter(keys.inflight(batch_id), count=1000)
            if owner == me
        }

    async def finish(
        self,
        batch_id: str,
        *,
        ttl_s: int,
        stats: Mapping[str, str],
        webhook_url: str | None = None,
    ) -> str:
        """Write the stats and the terminal status of a finalizing batch (no-op for any
        other); returns the status afterwards. Its keys go ``ttl_s`` later (``sweep``).
        Its webhook event (its own URL, else ``webhook_url``) is enqueued with it."""
        fields = [item for pair in stats.items() for item in pair]
        final = decode(
            await self._finish(
                keys=[
                    keys.batch(batch_id),
                    keys.stats(batch_id),
                    keys.events(batch_id),
                    keys.claims(batch_id),
                    keys.tally(batch_id),
                    keys.SWEEP,
                    keys.events(batch_id),
                    keys.requests(batch_id),
                    keys.pending(batch_id),
                    keys.order(batch_id),
                    keys.inflight(batch_id),
                    keys.results(batch_id),
                    keys.shards(batch_id),
                    keys.WEBHOOKS,
                    keys.webhook(batch_id),
                ],
                args=[ttl_s, batch_id, SWEEP_BACKSTOP_S, webhook_url or "", *fields],
            )
        )
        await self.redis.srem(keys.ACTIVE, batch_id)  # type: ignore[misc]
        return final

    async def sweep(self, *, limit: int = SWEEP_BATCH) -> int:
        """UNLINK the keys of finished batches whose TTL is up (Redis frees big values
        off its main thread); returns how many batches went."""
        due = [decode(b) for b in await self._sweep_due(keys=[keys.SWEEP], args=[limit])]
        for batch_id in due:
            async with self.redis.pipeline(transaction=False) as pipe:
                pipe.unlink(*keys.batch_keys(batch_id))
                pipe.zrem(keys.SWEEP, batch_id)
                pipe.zrem(keys.BATCHES, batch_id)
                await pipe.execute()
        return len(due)

    # -- shards (the batch-api route) ----------------------------------------------------
    # A batch of the batch-api route has no pending requests: its input order list is cut
    # into shards (``define_shard``) that workers drive through the provider's Batch API
    # (``worker.sources.batchapi``). The ``SHARDS`` index holds every shard not done,
    # scored by when its next step is due; a worker leases one by taking it.

    async def define_shard(self, batch_id: str, start: int, end: int, nbytes: int) -> int:
        """Define the batch's next shard, lines [start, end) of its input order (left as
        it is when a shard starting there exists); returns where the shards end."""
        sharded, _ = await self._shard_define(
            keys=[keys.batch(batch_id), keys.shards(batch_id), keys.SHARDS],
            args=[batch_id, start, end, nbytes],
        )
        if int(sharded) < 0:
            raise BatchError(f"batch {batch_id} is gone (expired or deleted) while loading")
        return int(sharded)

    async def next_shards(self, limit: int) -> list[tuple[str, float]]:
        """Up to ``limit`` (member, due ms on Redis' clock) of the index, soonest first."""
        raw = await self.redis.zrange(keys.SHARDS, 0, limit - 1, withscores=True)
        return [(decode(member), float(score)) for member, score in raw]

    async def take_shard(self, member: str, *, lease_ms: int, token: str) -> Shard | None:
        """Lease a due shard (None: gone, or another worker took it first)."""
        batch_id, _, k = member.rpartition(":")
        taken = await self._shard_take(
            keys=[keys.SHARDS, keys.shards(batch_id)], args=[member, k, lease_ms, token]
        )
        if not int(taken):
            return None
        shard = await self.shard(batch_id, int(k))
        if shard is None:  # its batch is gone (expired): the member goes too
            await self.redis.zrem(keys.SHARDS, member)
        return shard

    async def shard(self, batch_id: str, k: int) -> Shard | None:
        raw = await self.redis.hgetall(keys.shards(batch_id))  # type: ignore[misc]
        prefix = f"{k}:"
        fields = {
            decode(name)[len(prefix) :]: decode(value)
            for name, value in raw.items()
            if decode(name).startswith(prefix)
        }
        if "start" not in fields:
            return None
        return Shard(
            batch_id=batch_id,
            k=k,
            start=int(fields["start"]),
            end=int(fields["end"]),
            fields=fields,
        )

    async def update_shard(
        self,
        shard: Shard,
        token: str,
        *,
        next_ms: float,
        start: bool = False,
        **fields: str | int | float,
    ) -> bool:
        """Set a leased shard's fields and when its next step is due (``next_ms`` from
        now; negative: done, out of the index). False: the lease is lost (another worker
        took the shard over), nothing changed."""
        args: list[Any] = [shard.member, shard.k, token, int(next_ms), "1" if start else "0"]
        for name, value in fields.items():
            args += [name, value]
            shard.fields[name] = str(value)
        ok = await self._shard_update(
            keys=[keys.shards(shard.batch_id), keys.SHARDS, keys.batch(shard.batch_id)],
            args=args,
        )
        return bool(int(ok))

    async def settle_shard(
        self, shard: Shard, *, mode: str, code: str = "", message: str = "", count: int
    ) -> Settled:
        """Up to ``count`` requests of the shard without a result (from its cursor) go to
        the realtime lane (``mode="fallback"``) or end with ``code`` (``"fail"``). The
        caller aggregates a batch this made final."""
        prefix, middle, suffix = stop_template(code, message, route=BATCH_API)
        batch_id = shard.batch_id
        done, pushed, final, stopped = await self._shard_settle(
            keys=[
                keys.batch(batch_id),
                keys.order(batch_id),
                keys.results(batch_id),
                keys.pending(batch_id),
                keys.events(batch_id),
                keys.RUNNABLE,
                keys.tally(batch_id),
                keys.shards(batch_id),
            ],
            args=[batch_id, shard.k, mode, count, code, prefix, middle, suffix],
        )
        if int(pushed):
            await self.redis.sadd(keys.ACTIVE, batch_id)  # type: ignore[misc]
            await self.wake()
        return Settled(bool(int(done)), int(pushed), bool(int(final)), bool(int(stopped)))

    async def shard_ids(self, shard: Shard) -> list[str]:
        """The custom_ids of a shard, in input order (chunked reads)."""
        ids: list[str] = []
        async for chunk in self.shard_id_chunks(shard):
            ids += chunk
        return ids

    async def shard_id_chunks(self, shard: Shard) -> AsyncIterator[list[str]]:
        for start in range(shard.start, shard.end, READ_CHUNK):
            stop = min(start + READ_CHUNK, shard.end) - 1
            chunk = await self.redis.lrange(keys.order(shard.batch_id), start, stop)  # type: ignore[misc]
            yield [decode(c) for c in chunk]

    async def active(self) -> list[str]:
        """Batches that may hold requests in flight (queued to finalizing): a dead
        worker's requests are looked for here."""
        members = await self.redis.smembers(keys.ACTIVE)  # type: ignore[misc]
        return [decode(b) for b in members]
