"""The chat lane: chat completion requests through the queue, grouped on the way in.

Each ``POST /v1/chat/completions`` could be a batch of its own, but a batch costs a
fixed amount of work on both sides (creating it, a claim ticket, an aggregator job,
its keys): at a few hundred requests a second that fixed cost, not the requests,
would fill the CPUs. So requests waiting to be enqueued go together: one submitter
task enqueues whatever has arrived as one urgent batch, then the next group while
the first is on its way, and one follower per batch hands each result to its waiting
handler. Under light load a group is one request and nothing waits for company; under
heavy load groups grow by themselves, with no timer and no added latency.

Results are per request (each has its own custom_id), so one request's failure does
not touch its neighbours. A request whose handler gave up before it was enqueued is
dropped from its group; once enqueued it runs (a batch cannot drop one request).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from typing import Any

import orjson

from promptq.api.objects import CHAT_BATCH_PREFIX
from promptq.api.streaming import closing
from promptq.producer import Producer
from promptq.producer.parsing import ParsedBatch, parse_items
from promptq.shared import keys
from promptq.shared.models import CHAT_ENDPOINT, Priority, QueuedRequest

logger = logging.getLogger(__name__)

#: at most this many requests go into one batch
MAX_GROUP = 1000
#: chat answers are returned inline; their batch is kept this long only for debugging
CHAT_RESULT_TTL_S = 3600


class LaneClosed(Exception):
    """The API process is shutting down; the request was not answered."""


class ResultLost(Exception):
    """The request's batch ended without a result for it (e.g. it was cancelled)."""


#: what a waiting handler gets: (result line, id of the batch it ran in)
Answer = tuple[dict[str, Any], str]


class ChatLane:
    """Groups chat requests into urgent batches and routes their results back."""

    def __init__(self, producer: Producer, *, max_batches: int = 512) -> None:
        self._producer = producer
        # Each batch in flight has a follower holding a Redis connection while it waits;
        # at the cap the submitter waits for one to end, and groups grow meanwhile.
        self._slots = asyncio.Semaphore(max_batches)
        self._queued: list[tuple[QueuedRequest, asyncio.Future[Answer]]] = []
        self._waiting: dict[str, asyncio.Future[Answer]] = {}
        self._arrived = asyncio.Event()
        self._submitter: asyncio.Task[None] | None = None
        self._followers: set[asyncio.Task[None]] = set()

    @property
    def queued(self) -> int:
        """Requests waiting to be enqueued."""
        return len(self._queued)

    def validate(self, body: dict[str, Any]) -> QueuedRequest:
        """The request as it will be queued; raises ``InputError`` if the body is invalid."""
        item = {
            "custom_id": f"chat-{uuid.uuid4().hex}",
            "method": "POST",
            "url": CHAT_ENDPOINT,
            "body": body,
        }
        parsed = parse_items([item], default_model=self._producer.settings.model)
        return parsed.requests[0]

    async def send(self, request: QueuedRequest, *, timeout_s: float) -> Answer:
        """Enqueue ``request`` and wait for its result line. Raises ``TimeoutError``."""
        if self._submitter is None or self._submitter.done():
            self._submitter = asyncio.create_task(self._submit_loop(), name="chat lane")
        future: asyncio.Future[Answer] = asyncio.get_running_loop().create_future()
        self._waiting[request.custom_id] = future
        self._queued.append((request, future))
        self._arrived.set()
        try:
            async with asyncio.timeout(timeout_s):
                return await future  # a timeout cancels it: the submitter skips it
        finally:
            self._waiting.pop(request.custom_id, None)

    async def close(self) -> None:
        tasks = [t for t in (self._submitter, *self._followers) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for future in self._waiting.values():
            if not future.done():
                future.set_exception(LaneClosed("the server is shutting down"))

    async def _submit_loop(self) -> None:
        while True:
            await self._arrived.wait()
            self._arrived.clear()
            while self._queued:
                await self._slots.acquire()  # released when the group's follower ends
                group = [(r, f) for r, f in self._queued[:MAX_GROUP] if not f.done()]
                del self._queued[:MAX_GROUP]
                if group:
                    await self._submit(group)
                else:
                    self._slots.release()

    async def _submit(self, group: list[tuple[QueuedRequest, asyncio.Future[Answer]]]) -> None:
        requests = [
            QueuedRequest(custom_id=r.custom_id, body=r.body, line=i)
            for i, (r, _f) in enumerate(group, start=1)
        ]
        models = {str(r.body.get("model", "")) for r in requests}
        parsed = ParsedBatch(
            requests=requests,
            endpoint=CHAT_ENDPOINT,
            model=models.pop() if len(models) == 1 else "mixed",
        )
        batch_id = f"{CHAT_BATCH_PREFIX}{uuid.uuid4().hex}"
        try:
            await self._producer.submit(
                parsed,
                batch_id=batch_id,
                priority=Priority.URGENT,
                result_ttl_s=CHAT_RESULT_TTL_S,  # answered inline; kept only to debug
            )
        except Exception as exc:  # Redis trouble: every handler of the group answers it
            self._slots.release()
            for _r, future in group:
                if not future.done():
                    future.set_exception(exc)
            return
        follower = asyncio.create_task(
            self._follow(batch_id, {r.custom_id for r in requests}), name=f"follow {batch_id}"
        )
        self._followers.add(follower)
        follower.add_done_callback(self._followers.discard)

    async def _follow(self, batch_id: str, expected: set[str]) -> None:
        error: Exception = ResultLost(f"batch {batch_id} ended without this request's result")
        try:
            results = self._producer.batch(batch_id).as_completed_raw()
            async with closing(results):
                async for raw in results:
                    line = orjson.loads(raw)
                    expected.discard(line["custom_id"])
                    future = self._waiting.get(line["custom_id"])
                    if future is not None and not future.done():
                        future.set_result((line, batch_id))
                    if not expected:
                        break
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            logger.warning("lost track of chat batch %s: %s", batch_id, exc)
            error = exc
        finally:
            self._slots.release()
            # Chat batches are not listed (GET /v1/batches, the /metrics queue scan).
            with contextlib.suppress(Exception):
                await self._producer.redis.zrem(keys.BATCHES, batch_id)
        for custom_id in expected:
            future = self._waiting.get(custom_id)
            if future is not None and not future.done():
                future.set_exception(error)
