"""Webhooks: ``batch.completed`` (``failed``, ``cancelled``, ``expired``) told to a URL,
at least once, signed as Standard Webhooks.

The finish script enqueues the event in the same step that ends the batch (a batch's
``webhook_url``, else the finishing worker's ``PROMPTQ_WEBHOOK_URL``): one hash per
batch, ``keys.webhook(id)`` (url, type, attempts, status, last error), and its place in
``keys.WEBHOOKS``, a sorted set scored by when the next attempt is due. Every worker
polls that set once a second; the claim script leases what is due (its score moves a
lease ahead, so a worker that dies mid-delivery leaves it to another after
``LEASE_S``). A delivery is a ``POST`` of::

    {"id": "evt_<batch id>", "object": "event", "type": "batch.completed",
     "created_at": 1767225600, "data": {"id": "<batch id>"}}

with ``webhook-id`` (the event id, the same on every retry, so receivers can drop
repeats), ``webhook-timestamp`` (unix seconds) and ``webhook-signature: v1,<base64
HMAC-SHA256 over "id.timestamp.body" keyed with the secret>``. A 2xx answer delivers it;
anything else, a timeout or a refused connection is tried again after
``PROMPTQ_WEBHOOK_BACKOFF_S`` (5 s, 30 s, 2 min, 5, 10, 20, 30, 60 min: about two hours
in all), then the event is marked ``failed``: never an endless loop. A URL whose host
``PROMPTQ_WEBHOOK_HOSTS`` does not name is marked ``failed`` at once, unrequested: the
token holders who name URLs cannot make workers call internal addresses. The secret
(``PROMPTQ_WEBHOOK_SECRET``, ``whsec_`` + base64) is read by workers from their
environment and never reaches Redis or a log.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any
from urllib.parse import urlsplit

import aiohttp
from arq.connections import ArqRedis
from pydantic import SecretStr

from promptq.shared import keys, scripts
from promptq.shared.webhooks import event_body, host_allowed, sign, signing_key

logger = logging.getLogger(__name__)

#: a claimed delivery comes back due this long after the claim (its worker died)
LEASE_S = 60.0
#: deliveries claimed per poll, and how often a worker polls
CLAIM_MAX = 20
POLL_S = 1.0
DEFAULT_BACKOFF_S = (5.0, 30.0, 120.0, 300.0, 600.0, 1200.0, 1800.0, 3600.0)
EVENT_TYPES = frozenset({"completed", "failed", "cancelled", "expired"})


class WebhookSender:
    """One worker's share of the deliveries (see the module docstring)."""

    def __init__(
        self,
        redis: ArqRedis,
        *,
        secret: SecretStr | None,
        backoff_s: tuple[float, ...] = DEFAULT_BACKOFF_S,
        timeout_s: float = 10.0,
        lease_s: float = LEASE_S,
        hosts: tuple[str, ...] = (),
    ) -> None:
        self.redis = redis
        #: PROMPTQ_WEBHOOK_HOSTS: the hosts deliveries may go to (none: any)
        self.hosts = hosts
        # an empty PROMPTQ_WEBHOOK_SECRET (compose's default) is no secret
        self._key = signing_key(secret) if secret and secret.get_secret_value() else None
        self.backoff_s = backoff_s
        self.lease_s = lease_s
        self.timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._claim = scripts.register(redis, "webhook_claim")
        self._session: aiohttp.ClientSession | None = None
        self._task: asyncio.Task[None] | None = None
        self._poked = asyncio.Event()
        self.delivered = 0

    def poke(self) -> None:
        """A batch this worker finished has an event: look now, not at the next poll."""
        self._poked.set()

    async def start(self) -> None:
        if self._key is None:
            logger.info("PROMPTQ_WEBHOOK_SECRET is not set: webhooks go out unsigned")
        self._session = aiohttp.ClientSession(
            timeout=self.timeout, headers={"User-Agent": "promptq-webhooks"}
        )
        self._task = asyncio.create_task(self._loop(), name="webhooks")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self._session is not None:
            await self._session.close()

    async def _loop(self) -> None:
        while True:
            try:
                due = await self.claim()
                if due:
                    await asyncio.gather(*(self.deliver(batch_id) for batch_id in due))
                    continue  # more may be due
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # Redis trouble: the next poll tries again
                logger.debug("webhook poll failed: %s", exc)
            # (not asyncio.wait_for: on 3.11 it can swallow a cancel that comes as the
            # event is set, and stop() would wait forever)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(POLL_S):
                    await self._poked.wait()
            self._poked.clear()

    async def claim(self, limit: int = CLAIM_MAX) -> list[str]:
        """Lease the deliveries that are due (for ``lease_s``); their batch ids."""
        due = await self._claim(keys=[keys.WEBHOOKS], args=[limit, int(self.lease_s * 1000)])
        return [raw.decode() for raw in due]

    async def deliver(self, batch_id: str) -> bool:
        """One attempt at one event; True when the receiver took it."""
        assert self._session is not None
        key = keys.webhook(batch_id)
        raw = await self.redis.hgetall(key)  # type: ignore[misc]
        fields = {k.decode(): v.decode() for k, v in raw.items()}
        if not fields.get("url") or fields.get("status") != "pending":
            await self.redis.zrem(keys.WEBHOOKS, batch_id)
            return False
        kind = fields.get("type", "completed")
        body = event_body(batch_id, kind, float(fields.get("created_at") or time.time()))
        event_id = f"evt_{batch_id}"
        timestamp = int(time.time())
        headers = {"Content-Type": "application/json", "webhook-id": event_id,
                   "webhook-timestamp": str(timestamp)}  # fmt: skip
        if self._key is not None:
            headers["webhook-signature"] = sign(self._key, event_id, timestamp, body)
        attempts = int(fields.get("attempts") or 0) + 1
        host = urlsplit(fields["url"]).hostname or ""
        if not host_allowed(host, self.hosts):  # whoever named it: no request, no retry
            error = f"host {host!r} is not one PROMPTQ_WEBHOOK_HOSTS allows"
            await self._failed(batch_id, attempts, error, fields["url"], final=True)
            return False
        error = ""
        try:
            async with self._session.post(fields["url"], data=body, headers=headers) as resp:
                await resp.read()
                if 200 <= resp.status < 300:
                    await self._done(batch_id, attempts)
                    return True
                error = f"HTTP {resp.status}"
        except TimeoutError:
            error = f"no answer within {self.timeout.total:g} s"
        except (aiohttp.ClientError, OSError) as exc:
            error = f"{type(exc).__name__}: {exc}"
        await self._failed(batch_id, attempts, error, fields["url"])
        return False

    async def _done(self, batch_id: str, attempts: int) -> None:
        async with self.redis.pipeline(transaction=True) as pipe:
            done = {"status": "delivered", "attempts": attempts, "delivered_at": time.time()}
            pipe.hset(keys.webhook(batch_id), mapping=done)
            pipe.zrem(keys.WEBHOOKS, batch_id)
            await pipe.execute()
        self.delivered += 1

    async def _failed(
        self, batch_id: str, attempts: int, error: str, url: str, *, final: bool = False
    ) -> None:
        host = urlsplit(url).hostname
        fields: dict[str, Any] = {"attempts": attempts, "last_error": error,
                                  "last_attempt_at": time.time()}  # fmt: skip
        async with self.redis.pipeline(transaction=True) as pipe:
            if final or attempts > len(self.backoff_s):
                fields["status"] = "failed"
                pipe.zrem(keys.WEBHOOKS, batch_id)
                logger.error(
                    "webhook for batch %s to %s failed after %d attempts (%s): given up",
                    batch_id, host, attempts, error,
                )  # fmt: skip
            else:
                wait_s = self.backoff_s[attempts - 1]
                seconds, micros = await self.redis.time()  # the index is on Redis' clock
                due_ms = int((seconds + micros / 1e6 + wait_s) * 1000)
                pipe.zadd(keys.WEBHOOKS, {batch_id: due_ms})
                logger.warning(
                    "webhook for batch %s to %s: attempt %d failed (%s); next in %g s",
                    batch_id, host, attempts, error, wait_s,
                )  # fmt: skip
            pipe.hset(keys.webhook(batch_id), mapping=fields)
            await pipe.execute()
