"""The producer: validate and enqueue batches; follow them from any machine.

async with Producer.from_url("redis://localhost:6379") as producer:
    batch = await producer.submit(["prompt", {"custom_id": "q2", "prompt": "..."}])
    async for result in batch.as_completed():
        ...
    stats = await batch.wait()
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
import uuid
from collections.abc import AsyncIterator, Iterable, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

import orjson
from arq.connections import ArqRedis

from promptq.producer.parsing import (
    ParsedBatch,
    Requests,
    SpooledBatch,
    parse_items,
    spool_jsonl,
)
from promptq.shared import keys
from promptq.shared.batches import BatchStore
from promptq.shared.chatqueue import ChatQueue
from promptq.shared.connection import REDIS_DOWN, RedisHealth, connect
from promptq.shared.errors import (
    BatchError,
    BatchExists,
    BatchNotFound,
    ConfigError,
    InputError,
    LineError,
    QueueFull,
    RedisUnavailable,
)
from promptq.shared.models import BatchInfo, BatchStats, Priority, Result, WebhookState
from promptq.shared.results import BATCH_API, REALTIME
from promptq.shared.routes import ROUTES, ShardCutter
from promptq.shared.scripts import decode
from promptq.shared.settings import Settings
from promptq.shared.status import CLAIMABLE, Status
from promptq.shared.webhooks import check_url, parse_hosts

#: requests written per script call while enqueueing (each call stays a few ms)
WRITE_CHUNK = 500
#: a follower (as_completed, wait) rides out a Redis restart for up to this long
FOLLOW_RECONNECT_S = 120.0

logger = logging.getLogger(__name__)


def new_batch_id() -> str:
    return f"batch_{uuid.uuid4().hex}"


def fingerprint(parsed: Requests) -> str:
    """A digest of what a batch asks for: its endpoint and every (custom_id, body) pair
    (line order does not matter). Stored in the batch hash, so that a resumed run can
    check it was given the same input."""
    return parsed.fingerprint


def legacy_fingerprint(parsed: Requests) -> str:
    """The fingerprint batches of promptq before 0.2 stored (every request in memory)."""
    digest = hashlib.sha256(parsed.endpoint.encode())
    for request in sorted(parsed.requests, key=lambda r: r.custom_id):
        digest.update(b"\0" + request.custom_id.encode() + b"\0")
        digest.update(orjson.dumps(request.body, option=orjson.OPT_SORT_KEYS))
    return f"sha256:{digest.hexdigest()}"


def parse_file(path: str | Path, *, settings: Settings) -> SpooledBatch:
    """Validate a JSONL file line by line into a spool (size and line limits from
    ``settings``); the file is refused before it is read when it is too big."""
    path = Path(path)
    limit = settings.max_file_bytes
    try:
        size = path.stat().st_size
        if size > limit:  # refuse before reading a huge file
            raise InputError(
                str(path),
                [
                    LineError(
                        0,
                        None,
                        f"file is {size:,} bytes, over the {limit:,}-byte limit; split it "
                        "into several batches or raise PROMPTQ_MAX_FILE_BYTES",
                    )
                ],
            )
        with path.open("rb") as stream:
            return spool_jsonl(
                stream,
                source=str(path),
                default_model=settings.model,
                max_lines=settings.max_lines,
                max_bytes=limit,
            )
    except OSError as exc:
        problem = LineError(0, None, f"cannot read: {exc.strerror}")
        raise InputError(str(path), [problem]) from exc


def route_options(
    *,
    route: str = REALTIME,
    deadline_s: float | None = None,
    max_cost_usd: float | None = None,
    cache_ttl_s: int | None = None,
    webhook_url: str | None = None,
    webhook_hosts: tuple[str, ...] = (),
) -> dict[str, str | int | float]:
    """A batch's route, deadline, budget, cache and webhook fields, validated
    (``InputError`` naming the option); ``webhook_hosts``: the hosts a webhook URL may
    name (``PROMPTQ_WEBHOOK_HOSTS``; none: any)."""
    options: dict[str, str | int | float] = {}
    if webhook_url is not None:
        try:
            options["webhook_url"] = check_url(webhook_url, webhook_hosts)
        except ConfigError as exc:
            raise InputError("--webhook-url", [LineError(0, "webhook_url", str(exc))]) from None
    if route not in ROUTES:
        raise InputError("--route", [LineError(0, "route", f"use one of {', '.join(ROUTES)}")])
    if route != REALTIME:
        options["route"] = route
    if deadline_s is not None:
        if route != BATCH_API:
            raise InputError(
                "--deadline",
                [LineError(0, "deadline", "a deadline goes with --route batch-api")],
            )
        if deadline_s <= 0:
            raise InputError("--deadline", [LineError(0, "deadline", "must be above 0")])
        options["deadline_s"] = deadline_s
    if max_cost_usd is not None:
        if max_cost_usd <= 0:
            raise InputError(
                "--max-cost-usd", [LineError(0, "max_cost_usd", "must be above 0 (USD)")]
            )
        options["max_cost_usd"] = max_cost_usd
    if cache_ttl_s is not None:
        if cache_ttl_s <= 0:
            raise InputError("--cache", [LineError(0, "cache_ttl_s", "must be above 0")])
        options["cache_ttl_s"] = int(cache_ttl_s)
    return options


class Producer:
    """Enqueues batches into Redis and reads them back. Use as an async context manager."""

    def __init__(
        self,
        redis: ArqRedis | None = None,
        *,
        settings: Settings | None = None,
        url: str | None = None,
    ) -> None:
        """On a client you own (``redis``), or on one it opens from ``url`` on
        ``async with`` and closes on exit (see ``from_url``)."""
        if (redis is None) == (url is None):
            raise ValueError("Producer needs exactly one of a Redis client or a URL")
        self.settings = settings or Settings()
        self._url = url
        self._redis = redis
        self._store = BatchStore(redis) if redis is not None else None

    @classmethod
    def from_url(cls, url: str, *, settings: Settings | None = None) -> Producer:
        """A producer that connects to ``url`` on ``async with`` and closes on exit."""
        return cls(url=url, settings=settings)

    @property
    def redis(self) -> ArqRedis:
        if self._redis is None:
            raise RuntimeError("use `async with Producer.from_url(...) as producer:`")
        return self._redis

    @property
    def store(self) -> BatchStore:
        """The batch store on this producer's client."""
        if self._store is None:
            raise RuntimeError("use `async with Producer.from_url(...) as producer:`")
        return self._store

    async def __aenter__(self) -> Producer:
        if self._url is not None and self._redis is None:
            self._redis = await connect(self._url, wait_s=self.settings.redis_connect_wait_s)
            self._store = BatchStore(self._redis)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._url is not None and self._redis is not None:
            await self._redis.aclose()
            self._redis = self._store = None

    # -- submitting -----------------------------------------------------------------

    async def submit(
        self,
        items: Iterable[str | Mapping[str, Any]] | Requests,
        *,
        batch_id: str | None = None,
        priority: Priority | str = Priority.BULK,
        resume: bool = False,
        max_failure_rate: float | None = None,
        failure_min_sample: int = 20,
        result_ttl_s: int | None = None,
        retry_of: str | None = None,
        route: str = REALTIME,
        deadline_s: float | None = None,
        max_cost_usd: float | None = None,
        cache_ttl_s: int | None = None,
        webhook_url: str | None = None,
    ) -> Batch:
        """Validate ``items`` (prompts or request dicts) and enqueue them as one batch.

        Raises ``InputError`` listing every bad item before anything is enqueued,
        ``BatchExists`` if ``batch_id`` is taken, and ``QueueFull`` if the batch would
        take the queued requests past ``PROMPTQ_MAX_QUEUED``.

        ``priority="urgent"`` puts the batch in the urgent lane. ``max_failure_rate``
        (0..1) stops the batch early, status ``failed``, once more than that fraction of
        its finished requests failed (after ``failure_min_sample`` of them).
        ``result_ttl_s`` keeps this batch's results for less (or more) than the default.

        ``route="batch-api"`` sends the requests through the upstream's own Batch API (half
        price, up to 24 h); with ``deadline_s``, what has no result by then goes through
        the realtime lane. ``max_cost_usd`` stops the batch (code ``budget_exceeded``)
        once its spend reaches it. ``cache_ttl_s`` answers requests identical to one
        answered within that many seconds from the cache (see ``worker.cache``).
        ``webhook_url`` is told when the batch ends (``batch.completed``, ``failed``,
        ``cancelled``; signed, retried: see ``worker.webhooks``), instead of the
        workers' ``PROMPTQ_WEBHOOK_URL``.

        ``resume=True`` (needs ``batch_id``) picks up a batch submitted earlier from the
        same items, e.g. by a run that crashed: if ``batch_id`` exists (queued, running
        or finished) and holds exactly these requests, nothing is enqueued again and the
        existing batch is returned (with a fresh claim ticket if it is still running, in
        case every worker died); if it holds other requests, ``BatchError``. A batch
        still ``validating`` (its producer died while enqueueing) or absent is submitted
        anew; one whose producer died while loading it gets the rest of its requests.
        """
        parsed = (
            items
            if isinstance(items, ParsedBatch | SpooledBatch)
            else parse_items(items, default_model=self.settings.model)
        )
        if resume and batch_id is None:
            raise ValueError("resume=True needs the batch_id to resume")
        batch_id = batch_id or new_batch_id()
        if not keys.BATCH_ID_RE.match(batch_id):
            raise InputError(
                "--batch-id",
                [LineError(0, "batch_id", "use 1-64 letters, digits, '_' or '-'")],
            )
        if max_failure_rate is not None and not 0 <= max_failure_rate < 1:
            raise InputError(
                "--max-failure-rate",
                [LineError(0, "max_failure_rate", "must be at least 0 and below 1")],
            )
        options: dict[str, str | int | float] = route_options(
            route=route,
            deadline_s=deadline_s,
            max_cost_usd=max_cost_usd,
            cache_ttl_s=cache_ttl_s,
            webhook_url=webhook_url,
            webhook_hosts=parse_hosts(self.settings.webhook_hosts),
        )
        if resume and await self._resume(parsed, batch_id):
            return Batch(self, batch_id)
        if max_failure_rate is not None:
            options.update(max_failure_rate=max_failure_rate, failure_min_sample=failure_min_sample)
        if result_ttl_s is not None:
            options["result_ttl_s"] = result_ttl_s
        if retry_of is not None:
            options["retry_of"] = retry_of
        if route != BATCH_API:  # the Batch API's requests never wait in a worker's queue
            await self.check_backpressure(parsed.total)
        await self._enqueue(parsed, batch_id, Priority(priority), options)
        return Batch(self, batch_id)

    async def queued_requests(self) -> int:
        """Requests waiting in every running batch and in the chat queue (not yet
        claimed)."""
        return await ChatQueue(self.redis).length() + await self.store.pending_total()

    async def check_backpressure(self, adding: int) -> None:
        """Raise ``QueueFull`` if ``adding`` more requests would pass PROMPTQ_MAX_QUEUED."""
        limit = self.settings.max_queued
        if limit is None:
            return
        queued = await self.queued_requests()
        if queued + adding > limit:
            raise QueueFull(
                f"{queued:,} requests are already queued and this batch adds {adding:,}, over "
                f"the limit of {limit:,} (PROMPTQ_MAX_QUEUED); submit again once the workers "
                "have caught up, add workers, or raise the limit",
                queued=queued,
                limit=limit,
            )

    async def retry_failed(self, batch_id: str, *, new_batch_id: str | None = None) -> Batch:
        """Submit the failed requests of a finished batch again, as a new batch linked to
        it (``retry_of`` on the new one, ``retried_by`` on the old one). A batch is
        retried once: its retry's failures are retried from the retry."""
        old = await self.batch(batch_id).info(with_stats=False)
        if old.retried_by:
            raise BatchError(
                f"batch '{batch_id}' was already retried as '{old.retried_by}'; retry what "
                f"failed there: promptq retry-failed {old.retried_by}"
            )
        if not old.status.terminal:
            raise BatchError(
                f"batch '{batch_id}' is {old.status.value}; retry its failures once it has "
                "ended (promptq watch, or promptq cancel)"
            )
        failed_ids = [
            r.custom_id async for r in self.batch(batch_id).results() if r.error is not None
        ]
        if not failed_ids:
            raise BatchError(f"batch '{batch_id}' has no failed requests to retry")
        requests = await self.store.requests_of(batch_id, failed_ids)
        if len(requests) != len(failed_ids):
            raise BatchError(f"the requests of batch '{batch_id}' have expired from Redis")
        parsed = ParsedBatch.of(requests, endpoint=old.endpoint, model=old.model or "")
        batch = await self.submit(
            parsed, batch_id=new_batch_id, priority=old.priority, retry_of=batch_id
        )
        if not await self.store.link_retry(batch_id, batch.id):
            # another retry-failed of the same batch won: this one is not needed
            await batch.cancel()
            winner = (await self.batch(batch_id).info(with_stats=False)).retried_by
            raise BatchError(f"batch '{batch_id}' was retried meanwhile as '{winner}'")
        return batch

    async def submit_file(
        self,
        path: str | Path,
        *,
        batch_id: str | None = None,
        priority: Priority | str = Priority.BULK,
        resume: bool = False,
    ) -> Batch:
        """Validate a JSONL file whole, then enqueue it (``resume``: see ``submit``)."""
        with self.parse_file(path) as parsed:
            return await self.submit(parsed, batch_id=batch_id, priority=priority, resume=resume)

    def parse_file(self, path: str | Path) -> SpooledBatch:
        """Validate a JSONL file into a spool (close it, or use it in ``with``)."""
        return parse_file(path, settings=self.settings)

    async def _enqueue(
        self,
        parsed: Requests,
        batch_id: str,
        priority: Priority,
        options: Mapping[str, str | int | float] | None = None,
    ) -> None:
        total = parsed.total
        fields: dict[str, str | int | float] = {
            "total": total,
            "model": parsed.model,
            "endpoint": parsed.endpoint,
            "priority": priority.value,
            "fingerprint": fingerprint(parsed),
            **(options or {}),
        }
        existing = await self.store.create(batch_id, fields)
        if existing:
            raise BatchExists(batch_id, existing)
        # The first chunk while the batch says 'validating' (workers ignore it), then one
        # script flips it to 'queued' and lists it: workers start on it while the rest is
        # written. A producer that dies before the flip leaves a 'validating' batch that
        # nothing runs; one that dies after it leaves a batch that resuming completes.
        batch_api = fields.get("route") == BATCH_API
        first = next(parsed.chunks(WRITE_CHUNK))
        await self.store.append(batch_id, first, pending=not batch_api)
        await self.store.queue(batch_id, total, written=len(first))
        await self._load(batch_id, parsed, written=len(first), sharded=0 if batch_api else None)

    async def _load(
        self, batch_id: str, parsed: Requests, *, written: int, sharded: int | None
    ) -> None:
        """Write the rest of a queued batch's requests (after the first ``written``), in
        input order. ``sharded``: the batch-api route's shards are defined up to there;
        the rest are cut as the requests go in (each once all its lines are written)."""
        cutter = None
        begin = written
        if sharded is not None:
            cutter = ShardCutter(
                parsed.endpoint,
                max_lines=self.settings.batch_api_max_lines,
                max_bytes=self.settings.batch_api_max_bytes,
                start=sharded,
            )
            begin = min(written, sharded)
        stopped = False
        index = begin
        for chunk in parsed.chunks(WRITE_CHUNK, skip=begin):
            new = chunk[max(written - index, 0) :]
            if new:
                appended = await self.store.append(batch_id, new, pending=cutter is None)
                stopped = appended.stopped or stopped
            index += len(chunk)
            written = max(written, index)
            if cutter is not None:
                for request in chunk:
                    cutter.add(request)
                await self._define_shards(batch_id, cutter, written)
        if cutter is not None:
            cutter.close()
            await self._define_shards(batch_id, cutter, written)
        if stopped:  # cancelled while loading: what came after the stop ends the same way
            await self.store.stop_again(batch_id)

    async def _define_shards(self, batch_id: str, cutter: ShardCutter, written: int) -> None:
        defined = False
        for start, end, nbytes in cutter.take(before=written):
            await self.store.define_shard(batch_id, start, end, nbytes)
            defined = True
        if defined:
            await self.store.wake()  # the shard drivers of idle workers take it now

    async def _resume(self, parsed: Requests, batch_id: str) -> bool:
        """Take up an existing batch with the same requests; False if there is none to
        take up (absent, or left 'validating' by a producer that died enqueueing it)."""
        status_raw, stored, total, written, route, sharded = await self.store.fields(
            batch_id, "status", "fingerprint", "total", "written", "route", "sharded"
        )
        status = Status(status_raw) if status_raw else None
        if status is None or status is Status.VALIDATING:
            return False
        if stored is not None and stored.startswith("sha256:"):
            same = stored == legacy_fingerprint(parsed)  # a batch of an older promptq
        elif stored is not None:
            same = stored == fingerprint(parsed)
        else:  # submitted by an older promptq: compare the custom_ids at least
            ids = {decode(c) async for c in self.redis.hscan_iter(keys.requests(batch_id))}
            same = total == str(parsed.total) and ids == {r.custom_id for r in parsed.requests}
        if not same:
            raise BatchError(
                f"batch '{batch_id}' exists ({status.value}, {total} requests) but was "
                f"submitted from other requests than these {parsed.total} "
                "(custom_ids, bodies or default model differ); resume it with the same "
                "input, or choose another --batch-id"
            )
        done = int(written or total or 0)
        cut = int(sharded or 0) if route == BATCH_API else None
        if done < parsed.total or (cut is not None and cut < parsed.total):
            # its producer died while loading it: write the rest
            logger.info("batch %s: writing the %d requests not loaded yet", batch_id,
                        parsed.total - done)  # fmt: skip
            await self._load(batch_id, parsed, written=done, sharded=cut)
        if status in CLAIMABLE:
            # Every worker may have died with it: their requests go back once their
            # heartbeats expire, and any live worker picks the batch up when woken.
            await self.store.relist(batch_id)
            await self.store.wake()
        elif status is Status.FINALIZING:
            # the worker that finished it may have died before aggregating it (the job
            # does nothing twice)
            await self.store.request_aggregation(batch_id)
        logger.info("resuming batch %s (%s)", batch_id, status.value)
        return True

    # -- reading --------------------------------------------------------------------

    def batch(self, batch_id: str) -> Batch:
        """A handle on an existing batch (no Redis call until used)."""
        return Batch(self, batch_id)

    async def list_batches(self, *, limit: int = 20) -> list[BatchInfo]:
        ids = await self.redis.zrevrange(keys.BATCHES, 0, limit - 1)
        infos = []
        for raw_id in ids:
            try:
                infos.append(await Batch(self, decode(raw_id)).info())
            except BatchNotFound:
                await self.redis.zrem(keys.BATCHES, raw_id)  # expired
        return infos


class Batch:
    """A submitted batch: progress, results as they finish, and the final stats."""

    def __init__(self, producer: Producer, batch_id: str) -> None:
        self.producer = producer
        self.id = batch_id

    def __repr__(self) -> str:
        return f"Batch(id={self.id!r})"

    @property
    def _redis(self) -> ArqRedis:
        return self.producer.redis

    async def info(self, *, with_stats: bool = True) -> BatchInfo:
        """The batch's state; ``with_stats``: also its final stats (once it has them) and
        its spend so far."""
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.hgetall(keys.batch(self.id))
            if with_stats:
                pipe.hgetall(keys.stats(self.id))
                pipe.hmget(keys.tally(self.id), ["cost", "saved", "unpriced", "cached"])
                pipe.hgetall(keys.webhook(self.id))
            raw, *rest = await pipe.execute()
        stats, spend, webhook = rest if rest else (None, None, None)
        if not raw:
            raise BatchNotFound(self.id)
        info = BatchInfo.from_redis(
            self.id,
            {decode(k): decode(v) for k, v in raw.items()},
            {decode(k): decode(v) for k, v in stats.items()} if stats else None,
            None if spend is None else [None if v is None else decode(v) for v in spend],
        )
        if webhook:
            info.webhook = WebhookState.from_redis(
                {decode(k): decode(v) for k, v in webhook.items()}
            )
        return info

    async def spent_usd(self) -> float | None:
        """What the batch cost so far in USD (None: a model with no price was used)."""
        cost, unpriced = await self._redis.hmget(keys.tally(self.id), ["cost", "unpriced"])  # type: ignore[misc]
        return None if unpriced and int(unpriced) else float(cost or 0.0)

    async def as_completed(self, *, block_ms: int = 1000) -> AsyncIterator[Result]:
        """Yield results as they finish, on whichever machine, until the batch ends.

        The distributed counterpart of ``asyncio.as_completed``: reads the batch's
        event stream, so it can start late (it replays from the beginning) and any
        number of readers can follow one batch.
        """
        async for raw in self.as_completed_raw(block_ms=block_ms):
            yield Result.model_validate_json(raw)

    async def as_completed_raw(self, *, block_ms: int = 1000) -> AsyncIterator[bytes]:
        """Like ``as_completed`` but yields the stored JSON lines unparsed (fast export).

        Rides out a Redis restart: it reconnects with backoff (for up to
        ``FOLLOW_RECONNECT_S``, then ``RedisUnavailable``) and carries on where it was.
        """
        events = keys.events(self.id)
        last = "0-0"
        reconnect = _Reconnect(f"following batch {self.id}")
        while True:
            try:
                last, values, ended = await self._read_events(events, last, block_ms)
            except REDIS_DOWN as exc:
                await reconnect.after(exc)
                continue
            reconnect.ok()
            for value in values:
                yield value
            if ended:
                return

    async def _read_events(
        self, events: str, last: str, block_ms: int
    ) -> tuple[str, list[bytes], bool]:
        """One step of following: (the last event id read, result lines, batch ended)."""
        reply = await self._redis.xread({events: last}, count=1000, block=block_ms)
        if not reply:
            info = await self.info(with_stats=False)
            # A failed batch (or one whose stream expired) has no end marker to wait for.
            ended = info.status.terminal and (
                info.status is Status.FAILED or not await self._redis.exists(events)
            )
            return last, [], ended
        ended = False
        ids: list[bytes] = []
        for entry_id, fields in reply[0][1]:
            last = decode(entry_id)
            if b"c" in fields:
                ids.append(fields[b"c"])
            elif b"end" in fields:
                ended = True
        if not ids:
            return last, [], ended
        values: list[bytes | None] = await self._redis.hmget(  # type: ignore[misc]
            keys.results(self.id), ids
        )
        return last, [v for v in values if v is not None], ended

    async def input_order(self) -> AsyncIterator[str]:
        """Every custom_id of the batch in input order."""
        async for cid in self.producer.store.input_order(self.id):
            yield cid

    async def results_in_input_order(self) -> AsyncIterator[bytes]:
        """The stored result lines recorded so far, in input order."""
        async for raw in self.producer.store.results_in_input_order(self.id):
            yield raw

    async def results(self) -> AsyncIterator[Result]:
        """Every result recorded so far (any order), without waiting."""
        async for raw in self.raw_results():
            yield Result.model_validate_json(raw)

    async def raw_results(self) -> AsyncIterator[bytes]:
        """Like ``results`` but the stored JSON lines, unparsed (fast export)."""
        async for value in self.producer.store.result_lines(self.id):
            yield value

    async def cancel(self) -> BatchInfo:
        """Stop the batch: requests not yet sent end with ``batch_cancelled``, requests in
        flight finish, results are kept. Status goes cancelling -> cancelled.

        Workers stop dispatching at their next claim (claims check the status), so no
        new request of the batch is sent after this returns. Cancelling a finished batch
        changes nothing. Returns the batch's state after the call.
        """
        status = await self.producer.store.cancel(self.id)
        if not status:
            raise BatchNotFound(self.id)
        return await self.info()

    async def wait(self, *, timeout_s: float | None = None) -> BatchStats:
        """Wait until the batch ends; return the aggregator's stats.

        Blocks on the batch's event stream rather than polling. A batch that promptq
        stopped early (fatal upstream answer, failure rate) returns its stats too; check
        ``info().status`` and ``info().reason``. Raises ``TimeoutError`` after
        ``timeout_s`` seconds, ``BatchError`` if the batch failed without running. Rides
        out a Redis restart like ``as_completed``.
        """
        reconnect = _Reconnect(f"waiting for batch {self.id}")
        async with asyncio.timeout(timeout_s):
            events = keys.events(self.id)
            while True:
                try:
                    tail = await self._redis.xrevrange(events, count=1)
                    info = await self.info()
                    if info.status.terminal:
                        if info.stats is not None:
                            # a batch that ran, even if it was stopped (see info.reason)
                            return info.stats
                        if info.status is Status.FAILED:  # never ran: rejected input
                            raise BatchError(f"batch {self.id} failed: {info.reason or 'unknown'}")
                        return BatchStats()
                    last = decode(tail[0][0]) if tail else "0-0"
                    await self._redis.xread({events: last}, count=1, block=1000)
                except REDIS_DOWN as exc:
                    await reconnect.after(exc)
                    continue
                reconnect.ok()


class _Reconnect:
    """Backoff for a loop that follows a batch while Redis is down (restarting, failing
    over): up to 1 s between tries, ``RedisUnavailable`` after ``FOLLOW_RECONNECT_S``."""

    def __init__(self, doing: str) -> None:
        self.doing = doing
        self.delay_s = 0.0
        self.since: float | None = None
        self.health = RedisHealth()

    async def after(self, exc: Exception) -> None:
        now = time.monotonic()
        if self.since is None:
            self.since = now
        elif now - self.since > FOLLOW_RECONNECT_S:
            raise RedisUnavailable(
                f"Redis unreachable for over {FOLLOW_RECONNECT_S:.0f} s while {self.doing}: {exc}"
            ) from exc
        self.health.failed(exc, doing=self.doing)
        self.delay_s = min(max(self.delay_s * 2, 0.1), 1.0)
        await asyncio.sleep(self.delay_s)

    def ok(self) -> None:
        if self.since is not None:
            self.since = None
            self.delay_s = 0.0
            self.health.ok()
