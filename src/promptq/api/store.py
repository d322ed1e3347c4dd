"""What the HTTP API keeps in Redis beyond the pipeline's own keys.

* uploaded files: ``promptq:file:{ID}`` (hash of metadata) and ``promptq:file:{ID}:content``
  (the bytes), both with a TTL: any replica serves any file, no local disk involved;
  ``promptq:files`` lists them for ``GET /v1/files``;
* batches created over HTTP: ``promptq:batch:{ID}:api`` (input file, completion window,
  metadata, creation time, validation deadline), next to the batch's own keys.
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import orjson
from arq.connections import ArqRedis

from promptq.api.objects import COMPLETION_WINDOW_S
from promptq.shared import keys
from promptq.shared.batches import BatchStore
from promptq.shared.scripts import decode
from promptq.shared.status import Status

T = TypeVar("T")


class UnknownCursor(Exception):
    """A list's ``after`` cursor names nothing in the list (a wrong id, or it expired)."""


@dataclass(frozen=True, slots=True)
class StoredFile:
    """Metadata of an uploaded file (sizes in bytes, times in unix seconds)."""

    id: str
    filename: str
    size: int
    lines: int
    purpose: str
    created_at: int
    expires_at: int


@dataclass(frozen=True, slots=True)
class StoredBatch:
    """The three hashes an OpenAI Batch object is built from (decoded)."""

    id: str
    raw: dict[str, str]
    stats: dict[str, str]
    api: dict[str, str]


def _decoded(raw: dict[Any, Any]) -> dict[str, str]:
    return {decode(k): decode(v) for k, v in raw.items()}


def new_file_id() -> str:
    return f"file-{uuid.uuid4().hex}"


class ApiStore:
    """Reads and writes of the HTTP API's own Redis data."""

    def __init__(self, redis: ArqRedis) -> None:
        self.redis = redis
        self.batch_store = BatchStore(redis)

    async def now(self) -> float:
        """Redis' clock (unix seconds): one clock for every replica and worker."""
        seconds, micros = await self.redis.time()
        return float(seconds) + float(micros) / 1_000_000

    # -- files ------------------------------------------------------------------------

    async def save_file(
        self, data: bytes | memoryview, *, filename: str, purpose: str, lines: int, ttl_s: int
    ) -> StoredFile:
        exact = await self.now()
        now = int(exact)
        stored = StoredFile(
            id=new_file_id(),
            filename=filename,
            size=len(data),
            lines=lines,
            purpose=purpose,
            created_at=now,
            expires_at=now + ttl_s,
        )
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.set(keys.file_content(stored.id), data, ex=ttl_s)
            pipe.hset(
                keys.file(stored.id),
                mapping={
                    "filename": filename,
                    "bytes": stored.size,
                    "lines": lines,
                    "purpose": purpose,
                    "created_at": now,
                    "expires_at": stored.expires_at,
                },
            )
            pipe.expire(keys.file(stored.id), ttl_s)
            pipe.zadd(keys.FILES, {stored.id: exact})  # ms apart: uploads stay in order
            pipe.zremrangebyscore(keys.FILES, "-inf", exact - ttl_s)  # expired by now
            await pipe.execute()
        return stored

    async def files(self, file_ids: list[str]) -> list[StoredFile | None]:
        """Metadata of each file, in one round trip (None: no such file, or expired)."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for file_id in file_ids:
                pipe.hgetall(keys.file(file_id))
            replies = await pipe.execute()
        found: list[StoredFile | None] = []
        for file_id, reply in zip(file_ids, replies, strict=True):
            raw = _decoded(reply)
            found.append(
                StoredFile(
                    id=file_id,
                    filename=raw.get("filename", ""),
                    size=int(raw.get("bytes", 0)),
                    lines=int(raw.get("lines", 0)),
                    purpose=raw.get("purpose", "batch"),
                    created_at=int(raw.get("created_at", 0)),
                    expires_at=int(raw.get("expires_at", 0)),
                )
                if raw
                else None
            )
        return found

    async def file(self, file_id: str) -> StoredFile | None:
        if not keys.FILE_ID_RE.match(file_id):
            return None
        return (await self.files([file_id]))[0]

    async def delete_file(self, file_id: str) -> bool:
        """Remove an upload and its bytes; False if there was no such file."""
        if not keys.FILE_ID_RE.match(file_id):
            return False
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.delete(keys.file(file_id), keys.file_content(file_id))
            pipe.zrem(keys.FILES, file_id)
            deleted, _ = await pipe.execute()
        return int(deleted) > 0

    async def file_content(self, file_id: str) -> bytes | None:
        if not keys.FILE_ID_RE.match(file_id):
            return None
        data: bytes | None = await self.redis.get(keys.file_content(file_id))
        return data

    # -- batches ----------------------------------------------------------------------

    async def create_validating(
        self,
        batch_id: str,
        *,
        endpoint: str,
        input_file_id: str,
        completion_window: str,
        metadata: dict[str, str] | None,
        ttl_s: int,
        validation_timeout_s: float,
    ) -> StoredBatch:
        """Write a new batch in status ``validating`` and its ``:api`` hash, and list it.

        The producer's CREATE script later starts this batch over when it enqueues it
        (it does so for any 'validating' batch); the ``:api`` hash is not touched.
        """
        now = await self.now()
        created = f"{now:.3f}"
        raw = {
            "status": Status.VALIDATING.value,
            "created_at": created,
            "endpoint": endpoint,
            "total": "0",
            "succeeded": "0",
            "failed": "0",
            "retries": "0",
        }
        api = {
            "endpoint": endpoint,
            "input_file_id": input_file_id,
            "completion_window": completion_window,
            "created_at": created,
            "validate_by": f"{now + validation_timeout_s:.3f}",
        }
        if metadata is not None:
            api["metadata"] = orjson.dumps(metadata).decode()
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(keys.batch(batch_id), mapping=raw)
            # Until the producer takes it over: a batch nobody validates does not linger.
            pipe.expire(keys.batch(batch_id), ttl_s)
            pipe.hset(keys.batch_api(batch_id), mapping=api)
            # Outlives the batch (whose TTL starts when it ends) by the completion window.
            pipe.expire(keys.batch_api(batch_id), ttl_s + COMPLETION_WINDOW_S)
            pipe.zadd(keys.BATCHES, {batch_id: now})
            await pipe.execute()
        return StoredBatch(batch_id, raw, {}, api)

    async def fail_validating(
        self, batch_id: str, *, reason: str, errors: list[dict[str, Any]], ttl_s: int
    ) -> str:
        """Mark a 'validating' batch failed with OpenAI-style ``errors``; return the status
        it has afterwards."""
        body = orjson.dumps({"object": "list", "data": errors}).decode()
        return await self.batch_store.fail_validating(
            batch_id, reason=reason, errors_json=body, ttl_s=ttl_s
        )

    async def batches(self, batch_ids: list[str]) -> list[StoredBatch | None]:
        """The stored hashes of each batch, in one round trip (None: no such batch)."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for batch_id in batch_ids:
                pipe.hgetall(keys.batch(batch_id))
                pipe.hgetall(keys.stats(batch_id))
                pipe.hgetall(keys.batch_api(batch_id))
            replies = await pipe.execute()
        found: list[StoredBatch | None] = []
        for i, batch_id in enumerate(batch_ids):
            raw, stats, api = replies[3 * i : 3 * i + 3]
            found.append(
                StoredBatch(batch_id, _decoded(raw), _decoded(stats), _decoded(api))
                if raw
                else None
            )
        return found

    async def batch(self, batch_id: str) -> StoredBatch | None:
        if not keys.BATCH_ID_RE.match(batch_id):
            return None
        return (await self.batches([batch_id]))[0]

    async def page(
        self,
        index: str,
        load: Callable[[list[str]], Awaitable[list[T | None]]],
        *,
        after: str | None,
        limit: int,
        newest_first: bool = True,
    ) -> tuple[list[T], bool]:
        """One page of a listing (``GET /v1/batches``, ``GET /v1/files``): up to ``limit``
        objects from the sorted set ``index`` after the id ``after``, loaded with
        ``load``, and whether there are more. Ids whose object expired are dropped from
        the index on the way. Raises ``UnknownCursor``."""
        found: list[T] = []
        start = 0
        if after is not None:
            rank_of = self.redis.zrevrank if newest_first else self.redis.zrank
            rank = await rank_of(index, after)
            if rank is None:
                raise UnknownCursor(after)
            start = int(rank) + 1
        while len(found) <= limit:  # one extra tells whether there is more
            end = start + limit  # limit + 1 ids
            raw = await (
                self.redis.zrevrange(index, start, end)
                if newest_first
                else self.redis.zrange(index, start, end)
            )
            ids = [decode(i) for i in raw]
            if not ids:
                break
            objects = await load(ids)
            gone = [i for i, o in zip(ids, objects, strict=True) if o is None]
            if gone:
                await self.redis.zrem(index, *gone)  # expired
            found += [o for o in objects if o is not None]
            start += len(ids) - len(gone)  # the dropped ids no longer take up ranks
        return found[:limit], len(found) > limit
