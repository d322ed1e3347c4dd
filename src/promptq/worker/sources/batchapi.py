"""The batch-api route: a batch's shards driven through the provider's own Batch API.

The producer cuts a batch of this route into shards (``shared.routes.ShardCutter``)
and lists each in the ``promptq:shards`` index, due at once. Any worker with the
``openai`` backend takes a due shard, leased (``BatchStore.take_shard``), and steps it:

    new ──► running ──► downloading ──► settling ──► done
     │   upload its input file (``POST /files``), create the provider batch
     │          poll it every PROMPTQ_BATCH_API_POLL_S until it ends; at the deadline or
     │          at a stop (cancel, budget) cancel it
     │                    its output and error files become result lines (exactly once:
     │                    the record script's HSETNX), ``"route": "batch-api"``
     │                                 requests still without a line: the realtime lane
     │                                 (a deadline), or an error line with the code
     └── (deadline passed or batch stopped first) ──► settling

A worker may die at any point; the lease runs out and another carries on from the
shard's state. The provider batch is created once: before creating, the shard says so
(``creating_at``), and a worker that finds that mark looks for a provider batch with
the shard's marker in its metadata (``promptq_batch``, ``promptq_shard``) before it
creates one. Downloads start over (recording twice changes nothing); settling moves a
cursor in the same script that pushes, so nothing is pushed twice.

A step that waits (a poll) ends the task and leaves the shard due later; an idle
driver looks at the index once a second, and at once on a wake-up message.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson

from promptq.shared import serialization
from promptq.shared.batches import RECORD_ARGS, BatchStore, Shard, record_args
from promptq.shared.connection import REDIS_DOWN, RedisHealth
from promptq.shared.errors import UpstreamError
from promptq.shared.prices import PriceTable, Spend
from promptq.shared.registry import liveness_window_s
from promptq.shared.results import BATCH_API, Outcome, result_line
from promptq.shared.routes import MARKER_BATCH, MARKER_SHARD, provider_line
from promptq.shared.stats import usage_tokens
from promptq.shared.status import Status, parse
from promptq.worker.provider import BatchApiClient, ProviderError
from promptq.worker.retry import classify
from promptq.worker.sources.batch import RECORD_MAX, budget_stop

logger = logging.getLogger(__name__)

#: shards one worker steps at the same time (uploads and downloads are big)
SHARD_TASKS = 2
#: a taken shard is this worker's for a lease as long as a worker's liveness window
#: (``shared.registry``), renewed every heartbeat: one that dies hands it on as fast as
#: its requests
#: an idle driver looks at the shards index this often
IDLE_S = 1.0
#: after a cancel, how often the provider batch is polled until it says cancelled
CANCEL_POLL_S = 5.0
#: a provider batch that does not confirm a cancel within this long is left: its
#: requests are settled anyway (OpenAI: cancelling takes up to 10 minutes)
CANCEL_GRACE_S = 600.0
#: requests settled per script call
SETTLE_CHUNK = 500
#: a failed step is tried again after this long at most (doubling from 1 s)
RETRY_MAX_S = 300.0
#: provider batches created this long before the shard's mark still count as its own
#: (clock skew between this machine and the provider)
FIND_SLACK_S = 3600.0

#: the provider batch statuses that end it
ENDED = frozenset({"completed", "failed", "expired", "cancelled"})
#: error lines of requests the provider never ran (settled like missing lines)
NOT_RUN = frozenset({"batch_expired", "batch_cancelled"})

#: the line code and message of requests a provider batch left without a result (no
#: deadline to fall back on), by its status
UNFINISHED = {
    "failed": ("batch_failed", "the provider's batch failed"),
    "expired": ("batch_expired", "the provider's batch expired (24h) before this request ran"),
    "cancelled": ("batch_cancelled", "the provider's batch was cancelled outside promptq"),
    "completed": ("batch_missing", "the provider's batch ended without a line for this request"),
    "refused": ("batch_failed", "the provider refused the batch"),
    "cancelling": ("batch_cancelled", "the provider did not confirm the cancel in time"),
}


class LeaseLost(Exception):
    """Another worker took the shard over (this one was too slow): stop touching it."""


class ShardDriver:
    """Steps the batch-api route's shards (see the module docstring)."""

    def __init__(
        self,
        store: BatchStore,
        client: BatchApiClient,
        *,
        worker_id: str,
        health: RedisHealth,
        poll_s: float,
        prices: PriceTable,
        on_final: Callable[[str], None],
        clock_offset_s: float = 0.0,
        spend: Spend | None = None,
        heartbeat_s: float = 2.0,
    ) -> None:
        self.store = store
        self.renew_s = heartbeat_s
        self.lease_ms = int(liveness_window_s(heartbeat_s) * 1000)
        self.spend = spend or Spend()
        self.client = client
        self.worker_id = worker_id
        self.health = health
        self.poll_s = poll_s
        self.prices = prices
        self.on_final = on_final
        #: Redis' clock minus this machine's (due times and deadlines are on Redis' clock)
        self.clock_offset_s = clock_offset_s
        self._running: dict[str, asyncio.Task[None]] = {}
        self._failures: dict[str, int] = {}
        self._loop: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()

    def __repr__(self) -> str:
        return f"ShardDriver({self.client.base_url!r}, {len(self._running)} running)"

    @property
    def idle(self) -> bool:
        return not self._running

    def poke(self) -> None:
        """Look at the shards index now (a producer defined shards)."""
        self._wake.set()

    def now(self) -> float:
        return time.time() + self.clock_offset_s

    # -- the loop ------------------------------------------------------------------------

    async def start(self) -> None:
        await self.client.__aenter__()
        self._loop = asyncio.create_task(self._run(), name="batch-api shards")

    async def stop(self) -> None:
        """Stop stepping: steps under way are cut, their shards due at once for another
        worker (each step starts over safely)."""
        if self._loop is not None:
            self._loop.cancel()
            await asyncio.gather(self._loop, return_exceptions=True)
            self._loop = None
        tasks = list(self._running.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self.client.__aexit__(None, None, None)

    async def _run(self) -> None:
        while True:
            try:
                await self._take_due()
                self.health.ok()
            except REDIS_DOWN as exc:
                self.health.failed(exc, doing="looking for batch-api shards")
            except Exception:
                logger.exception("looking for batch-api shards failed")
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(IDLE_S):
                    await self._wake.wait()

    async def _take_due(self) -> None:
        if len(self._running) >= SHARD_TASKS:
            return
        now_ms = self.now() * 1000
        for member, due_ms in await self.store.next_shards(SHARD_TASKS * 4):
            if due_ms > now_ms or len(self._running) >= SHARD_TASKS:
                return
            if member in self._running:
                continue
            token = f"{self.worker_id}:{uuid.uuid4().hex[:8]}"
            shard = await self.store.take_shard(member, lease_ms=self.lease_ms, token=token)
            if shard is None:
                continue
            task = asyncio.create_task(self._drive(shard, token), name=f"shard {member}")
            self._running[member] = task
            task.add_done_callback(functools.partial(self._done, member))

    def _done(self, member: str, _task: asyncio.Task[None]) -> None:
        self._running.pop(member, None)
        self._wake.set()  # a free task: look for the next due shard now

    # -- one shard -----------------------------------------------------------------------

    async def _drive(self, shard: Shard, token: str) -> None:
        """Step the shard while its next step is due now; then leave it due later."""
        renew = asyncio.create_task(self._renew(shard, token))
        try:
            while True:
                next_ms = await self._step(shard, token)
                if next_ms is None:
                    self._failures.pop(shard.member, None)
                    return
                if next_ms > 0:
                    self._failures.pop(shard.member, None)
                    await self._update(shard, token, next_ms=next_ms)
                    return
        except LeaseLost:
            logger.info("shard %s: taken over by another worker", shard.member)
        except asyncio.CancelledError:
            with contextlib.suppress(Exception):  # shutting down: due at once elsewhere
                await self.store.update_shard(shard, token, next_ms=0)
            raise
        except Exception as exc:
            await self._failed_step(shard, token, exc)
        finally:
            renew.cancel()

    async def _failed_step(self, shard: Shard, token: str, exc: Exception) -> None:
        if isinstance(exc, ProviderError) and not exc.retryable:
            # the provider refuses this shard (a bad file, a refused key...): its requests
            # cannot go this way; settled like a failed provider batch
            logger.error("batch %s, shard %d: %s", shard.batch_id, shard.k, exc)
            with contextlib.suppress(Exception):
                await self._update(
                    shard, token, next_ms=0, state="settling", provider_status="refused",
                    errors=str(exc),
                )  # fmt: skip
            return
        failures = self._failures.get(shard.member, 0) + 1
        self._failures[shard.member] = failures
        delay_s = min(2.0 ** (failures - 1), RETRY_MAX_S)
        if isinstance(exc, ProviderError):
            logger.warning("batch %s, shard %d: %s; trying again in %.0f s", shard.batch_id,
                           shard.k, exc, delay_s)  # fmt: skip
        elif isinstance(exc, REDIS_DOWN):
            self.health.failed(exc, doing=f"stepping shard {shard.member}")
            return  # its lease runs out, and it is taken again
        else:
            logger.exception("batch %s, shard %d: step failed; trying again in %.0f s",
                             shard.batch_id, shard.k, delay_s)  # fmt: skip
        with contextlib.suppress(Exception):
            await self.store.update_shard(shard, token, next_ms=delay_s * 1000)

    async def _renew(self, shard: Shard, token: str) -> None:
        while True:
            await asyncio.sleep(self.renew_s)
            with contextlib.suppress(Exception):
                if not await self.store.update_shard(shard, token, next_ms=self.lease_ms):
                    return

    async def _update(self, shard: Shard, token: str, *, next_ms: float, **fields: Any) -> None:
        if not await self.store.update_shard(shard, token, next_ms=next_ms, **fields):
            raise LeaseLost(shard.member)

    async def _step(self, shard: Shard, token: str) -> float | None:
        """One step of the shard: ms until its next one (0: now), None when done."""
        batch = await self.store.read(shard.batch_id)
        status = parse(batch.get("status"))
        if status is None or status.terminal or status is Status.FINALIZING:
            # every request has its line (the realtime lane finished them, or a stop)
            await self._abandon(shard)
            await self._update(shard, token, next_ms=-1, state="done")
            return None
        stopped = bool(batch.get("final_status"))
        deadline = float(batch["deadline_at"]) if batch.get("deadline_at") else None
        late = deadline is not None and self.now() >= deadline
        state = shard.state
        if state == "new":
            if stopped or late:
                await self._update(shard, token, next_ms=0, state="settling")
                return 0
            await self._create(shard, token, batch)
            return 0
        if state == "running":
            return await self._poll(shard, token, stopped=stopped, late=late, deadline=deadline)
        if state == "downloading":
            await self._download(shard, token)
            await self._update(shard, token, next_ms=0, state="settling")
            return 0
        if state == "settling":
            await self._settle(shard, token, deadline=deadline)
            await self._update(shard, token, next_ms=-1, state="done")
            logger.info("batch %s: shard %d settled", shard.batch_id, shard.k)
            return None
        await self._update(shard, token, next_ms=-1)  # 'done', or unknown
        return None

    async def _create(self, shard: Shard, token: str, batch: dict[str, str]) -> None:
        """Upload the shard's input file and create its provider batch, once."""
        marker = {MARKER_BATCH: shard.batch_id, MARKER_SHARD: str(shard.k)}
        creating_at = shard.get("creating_at")
        if creating_at is not None:  # a worker got this far before: it may have created it
            found = await self.client.find(marker, created_after=float(creating_at) - FIND_SLACK_S)
            if found is not None:
                logger.info("batch %s, shard %d: provider batch %s (created before)",
                            shard.batch_id, shard.k, found["id"])  # fmt: skip
                await self._update(
                    shard, token, next_ms=self.lease_ms, start=True, state="running",
                    provider_batch=found["id"],
                )  # fmt: skip
                return
        endpoint = batch.get("endpoint") or "/v1/chat/completions"
        file_id = shard.get("file_id")
        if file_id is None:
            path = await self._write_input(shard, endpoint)
            try:
                uploaded = await self.client.upload(
                    path, filename=f"promptq-{shard.batch_id}-{shard.k}.jsonl"
                )
            finally:
                os.unlink(path)
            file_id = str(uploaded["id"])
            await self._update(shard, token, next_ms=self.lease_ms, file_id=file_id)
        await self._update(shard, token, next_ms=self.lease_ms, creating_at=f"{time.time():.3f}")
        created = await self.client.create(input_file_id=file_id, endpoint=endpoint,
                                           metadata=marker)  # fmt: skip
        await self._update(
            shard, token, next_ms=self.lease_ms, start=True, state="running",
            provider_batch=str(created["id"]),
        )  # fmt: skip
        logger.info("batch %s, shard %d: %d requests in provider batch %s", shard.batch_id,
                    shard.k, shard.size, created["id"])  # fmt: skip

    async def _write_input(self, shard: Shard, endpoint: str) -> Path:
        """The shard's Batch API input file, written from Redis a chunk at a time."""
        fd, name = tempfile.mkstemp(prefix="promptq-shard-", suffix=".jsonl")
        path = Path(name)
        try:
            with os.fdopen(fd, "wb") as out:
                async for ids in self.store.shard_id_chunks(shard):
                    for request in await self.store.requests_of(shard.batch_id, ids):
                        out.write(provider_line(request, endpoint) + b"\n")
        except BaseException:
            os.unlink(path)
            raise
        return path

    async def _poll(
        self, shard: Shard, token: str, *, stopped: bool, late: bool, deadline: float | None
    ) -> float:
        provider_batch = shard.get("provider_batch") or ""
        cancel_at = shard.get("cancel_at")
        if (stopped or late) and cancel_at is None:
            why = "the batch was stopped" if stopped else "its deadline passed"
            logger.info("batch %s, shard %d: %s: cancelling provider batch %s",
                        shard.batch_id, shard.k, why, provider_batch)  # fmt: skip
            await self._update(shard, token, next_ms=self.lease_ms, cancel_at=f"{self.now():.3f}")
            cancel_at = shard.get("cancel_at")
            try:
                await self.client.cancel(provider_batch)
            except ProviderError as exc:  # it ended meanwhile, or the provider is down
                logger.info("batch %s, shard %d: cancel: %s", shard.batch_id, shard.k, exc)
        try:
            found = await self.client.retrieve(provider_batch)
        except ProviderError:
            if cancel_at is not None and self.now() - float(cancel_at) > CANCEL_GRACE_S:
                await self._give_up(shard, token)
                return 0
            raise
        pstatus = str(found.get("status") or "")
        if pstatus in ENDED:
            errors = _error_messages(found.get("errors"))
            if errors:
                logger.warning("batch %s, shard %d: provider batch %s %s: %s", shard.batch_id,
                               shard.k, provider_batch, pstatus, "; ".join(errors))  # fmt: skip
            await self._update(
                shard, token, next_ms=0, state="downloading", provider_status=pstatus,
                output_file=found.get("output_file_id") or "",
                error_file=found.get("error_file_id") or "",
                errors="; ".join(errors),
                provider_created=found.get("created_at") or "",
                provider_ended=_ended_at(found) or "",
            )  # fmt: skip
            return 0
        if cancel_at is not None:
            if self.now() - float(cancel_at) > CANCEL_GRACE_S:
                await self._give_up(shard, token)
                return 0
            return min(self.poll_s, CANCEL_POLL_S) * 1000
        delay_s = self.poll_s
        if deadline is not None:
            delay_s = min(delay_s, max(deadline - self.now(), 0.0) + 0.01)
        return delay_s * 1000

    async def _give_up(self, shard: Shard, token: str) -> None:
        logger.warning("batch %s, shard %d: provider batch %s did not confirm the cancel in "
                       "%.0f s; settling its requests without it", shard.batch_id, shard.k,
                       shard.get("provider_batch"), CANCEL_GRACE_S)  # fmt: skip
        await self._update(shard, token, next_ms=0, state="settling",
                           provider_status="cancelling")  # fmt: skip

    async def _abandon(self, shard: Shard) -> None:
        """The batch ended without this shard: cancel its provider batch if it runs."""
        provider_batch = shard.get("provider_batch")
        if shard.state == "running" and provider_batch and not shard.get("cancel_at"):
            with contextlib.suppress(ProviderError):
                await self.client.cancel(provider_batch)

    # -- results -------------------------------------------------------------------------

    async def _download(self, shard: Shard, token: str) -> None:
        """Record the provider's output and error lines of the shard (streamed)."""
        started = time.monotonic()
        remaining = set(await self.store.shard_ids(shard))
        created, ended = shard.get("provider_created"), shard.get("provider_ended")
        latency_ms = None
        if created and ended:
            latency_ms = max(float(ended) - float(created), 0.0) * 1000
        recorded = foreign = 0
        for name in ("output_file", "error_file"):
            file_id = shard.get(name)
            if not file_id:
                continue
            args: list[Any] = []
            # one record call in flight while the next lines are parsed (Redis runs it on
            # its own core meanwhile)
            writing: asyncio.Task[int] | None = None
            try:
                async for raw in self.client.lines(file_id):
                    item = self._result(raw, remaining, latency_ms)
                    if item is None:
                        foreign += 1
                        continue
                    if item:
                        args.extend(item)
                        if len(args) >= RECORD_MAX * RECORD_ARGS:
                            if writing is not None:
                                recorded += await writing
                            writing = asyncio.create_task(self._record(shard.batch_id, args))
                            args = []
            finally:
                if writing is not None:  # written before going on, or before failing
                    recorded += await writing
            if args:
                recorded += await self._record(shard.batch_id, args)
        if foreign:
            logger.warning("batch %s, shard %d: %d provider lines were not this shard's "
                           "requests (ignored)", shard.batch_id, shard.k, foreign)  # fmt: skip
        logger.info("batch %s, shard %d: %d results recorded from provider batch %s in %.2f s",
                    shard.batch_id, shard.k, recorded, shard.get("provider_batch"),
                    time.monotonic() - started)  # fmt: skip

    def _result(
        self, raw: bytes, remaining: set[str], latency_ms: float | None
    ) -> tuple[Any, ...] | None:
        """A provider line's record arguments; () for a request it never ran (settled
        later), None for a line that is not one of the shard's requests."""
        try:
            obj = orjson.loads(raw)
        except orjson.JSONDecodeError:
            return None
        if not isinstance(obj, dict):
            return None
        custom_id = obj.get("custom_id")
        if not isinstance(custom_id, str) or custom_id not in remaining:
            return None
        response = obj.get("response") if isinstance(obj.get("response"), dict) else None
        error = obj.get("error") if isinstance(obj.get("error"), dict) else None
        if response is None and error is not None and error.get("code") in NOT_RUN:
            return ()
        remaining.discard(custom_id)
        status_code = response.get("status_code") if response else None
        body = response.get("body") if response else None
        request_id = response.get("request_id") if response else None
        failure: UpstreamError | None = None
        if error is None and isinstance(body, dict) and isinstance(status_code, int):
            if not 200 <= status_code < 300:  # the provider's error answer, classified
                _, failure = classify(status_code, {}, orjson.dumps(body))
        elif isinstance(status_code, int) and not 200 <= status_code < 300:
            _, failure = classify(status_code, {}, orjson.dumps(body))
        if failure is None and (error is not None or not isinstance(body, dict)):
            message = str((error or {}).get("message") or "the provider gave no response")
            failure = UpstreamError(message, code=str((error or {}).get("code") or "batch_error"))
        outcome = Outcome(
            status_code=status_code if isinstance(status_code, int) else None,
            body=body,
            request_id=request_id if isinstance(request_id, str) else None,
            error=failure,
            attempts=1,
            latency_ms=latency_ms or 0.0,
        )
        cost = None
        tokens = (0, 0)
        if outcome.ok:
            tokens = usage_tokens(body)
            cost = self.prices.cost_of(body, None, batch=True, tokens=tokens)
            self.spend.add(cost, tokens=tokens)
        line_id = obj.get("id")
        line = serialization.dumps(
            result_line(custom_id, outcome, route=BATCH_API,
                        line_id=line_id if isinstance(line_id, str) else None)
        )  # fmt: skip
        return record_args(custom_id, line, outcome, cost=cost, tokens=tokens)

    async def _record(self, batch_id: str, args: list[Any]) -> int:
        recorded = await self.store.record(batch_id, args)
        if recorded.became_final:
            self.on_final(batch_id)
        elif recorded.over_budget:
            (raw,) = await self.store.fields(batch_id, "max_cost_usd")
            code, message, reason = budget_stop(float(raw or 0))
            logger.error("batch %s %s", batch_id, reason)
            await self.store.stop(batch_id, code=code, message=message,
                                  final_status=Status.FAILED, reason=reason)  # fmt: skip
        return recorded.added

    async def _settle(self, shard: Shard, token: str, *, deadline: float | None) -> None:
        """Requests of the shard without a line: realtime (a deadline) or an error line."""
        mode, code, message = await self._settle_mode(shard, deadline=deadline)
        pushed = 0
        while True:
            settled = await self.store.settle_shard(
                shard, mode=mode, code=code, message=message, count=SETTLE_CHUNK
            )
            if settled.stopped:  # stopped meanwhile: the stop's code, not realtime
                mode, code, message = await self._settle_mode(shard, deadline=deadline)
                continue
            pushed += settled.pushed
            if settled.became_final:
                self.on_final(shard.batch_id)
            if settled.done:
                break
            await self._update(shard, token, next_ms=self.lease_ms)
        if pushed:
            logger.info("batch %s, shard %d: %d requests go through the realtime lane",
                        shard.batch_id, shard.k, pushed)  # fmt: skip

    async def _settle_mode(self, shard: Shard, *, deadline: float | None) -> tuple[str, str, str]:
        stop = await self.store.stop_info(shard.batch_id)
        if stop is not None:
            return "fail", stop.code, stop.message
        if deadline is not None:
            return "fallback", "", ""
        code, message = UNFINISHED.get(shard.get("provider_status") or "", UNFINISHED["failed"])
        errors = shard.get("errors")
        if errors:
            message = f"{message}: {errors}"
        return "fail", code, message


def _error_messages(errors: Any) -> list[str]:
    """The messages of a provider batch's ``errors`` (``{"data": [{code, message,
    line}]}``), at most a few."""
    if not isinstance(errors, dict):
        return []
    out = []
    for item in errors.get("data") or []:
        if isinstance(item, dict):
            where = f"line {item['line']}: " if item.get("line") else ""
            out.append(f"{where}{item.get('message') or item.get('code') or 'error'}")
    return out[:5]


def _ended_at(found: dict[str, Any]) -> Any:
    for name in ("completed_at", "failed_at", "expired_at", "cancelled_at", "finalizing_at"):
        if found.get(name):
            return found[name]
    return None
