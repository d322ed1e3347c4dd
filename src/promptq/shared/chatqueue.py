"""The chat lane's queue: entries written by ``promptq serve``, taken by workers.

``POST /v1/chat/completions`` does not make a batch: a batch costs keys, a claim and an
aggregator, which is noise next to bulk work but most of the cost of one interactive
request. A chat request is one entry in ``keys.CHAT_QUEUE``:

    <id: 32 hex digits>{"body": {...}, "replica": "<API replica id>", "deadline": 1.7e9}

Every step hands an entry from one list to another, so that Redis gives it to exactly
one party and no dropped connection loses it:

1. the API pushes entries (``push``: once, even when redis-py sends the push again:
   each push of a replica is numbered, and a number already seen queues nothing);
2. a worker with a free slot blocks on ``BLMOVE`` from the queue into its own list
   (``take``): Redis wakes one worker per entry, no other worker is bothered; the entry
   stays in the worker's list until answered, so a dead worker's entries go back
   (``requeue``) and a take whose reply was lost is found there (``owned``);
3. the worker pushes its answers to each replica's reply list, one element per replica
   and flush (the result lines joined by newlines), and drops the entries from its list,
   in one script (``reply``);
4. the replica moves an element into its delivery list (``BLMOVE``,
   ``wait_for_answers``) and hands its lines to the waiting handlers; it deletes that
   list now and then (``delivered``). Answers moved before a dropped connection are
   read again from it (``undelivered``), never lost; one handed out twice finds its
   handler gone and is ignored.

An entry whose ``deadline`` (unix seconds on Redis' clock) has passed is dropped unsent:
its handler has already answered 504.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import orjson
from arq.connections import ArqRedis

from promptq.shared import keys, scripts
from promptq.shared.keys import CHAT_ID_LEN, CHAT_ID_RE
from promptq.shared.models import CHAT_ENDPOINT, LANE_ENDPOINTS

#: a replica's push counter lives this long after its last push (redis-py's retries of
#: a push come within seconds; a replica that died leaves it to expire)
PUSH_COUNTER_TTL_S = 600
#: a chat reply list lives this long after its last answer (its replica reads it at once;
#: a replica that died leaves it to expire)
REPLY_TTL_S = 600
#: a streamed request's cancel mark lives this long (its worker deletes it on sight)
CANCEL_TTL_S = 30


class BadChatEntry(ValueError):
    """A queue entry that promptq did not write (or a newer version did)."""


def new_chat_id() -> str:
    return uuid.uuid4().hex


@dataclass(frozen=True, slots=True)
class ChatEntry:
    id: str
    body: dict[str, Any]
    replica: str
    deadline: float
    endpoint: str = CHAT_ENDPOINT

    def encode(self) -> bytes:
        payload: dict[str, Any] = {
            "body": self.body,
            "replica": self.replica,
            "deadline": self.deadline,
        }
        if self.endpoint != CHAT_ENDPOINT:
            payload["endpoint"] = self.endpoint
        return self.id.encode() + orjson.dumps(payload)

    @property
    def streamed(self) -> bool:
        return self.body.get("stream") is True

    @classmethod
    def decode(cls, raw: bytes) -> ChatEntry:
        chat_id = raw[:CHAT_ID_LEN].decode("ascii", "replace")
        try:
            payload = orjson.loads(raw[CHAT_ID_LEN:])
            body, replica, deadline = payload["body"], payload["replica"], payload["deadline"]
            endpoint = payload.get("endpoint", CHAT_ENDPOINT)
        except (orjson.JSONDecodeError, KeyError, TypeError, AttributeError) as exc:
            raise BadChatEntry(f"unreadable chat queue entry {chat_id!r}: {exc}") from exc
        if not (
            CHAT_ID_RE.match(chat_id)
            and isinstance(body, dict)
            and isinstance(replica, str)
            and CHAT_ID_RE.match(replica)
            and isinstance(deadline, int | float)
            and endpoint in LANE_ENDPOINTS
        ):
            raise BadChatEntry(f"malformed chat queue entry {chat_id!r}")
        return cls(
            id=chat_id, body=body, replica=replica, deadline=float(deadline), endpoint=endpoint
        )


@dataclass(frozen=True, slots=True)
class Answer:
    """A result line for the replica waiting for it (``replica`` '': nobody waits any
    more, only forget the entry)."""

    entry: bytes
    replica: str
    line: bytes


class ChatQueue:
    """The chat lane's keys and scripts (workers' side and the API's side)."""

    def __init__(self, redis: ArqRedis) -> None:
        self.redis = redis
        self._push = scripts.register(redis, "chat_push")
        self._take = scripts.register(redis, "chat_take")
        self._reply = scripts.register(redis, "chat_reply")
        self._requeue = scripts.register(redis, "chat_requeue")
        self._relay = scripts.register(redis, "chat_relay")
        self._take_answers = scripts.register(redis, "chat_take_answers")

    async def length(self) -> int:
        return int(await self.redis.llen(keys.CHAT_QUEUE))  # type: ignore[misc]

    # -- the API's side ------------------------------------------------------------------

    async def push(self, replica: str, number: int, entries: Sequence[ChatEntry]) -> int:
        """Queue entries, exactly once: ``number`` is this replica's push number (1, 2,
        ...), and a push with a number already seen queues nothing. Returns how many
        were queued."""
        return int(
            await self._push(
                keys=[keys.CHAT_QUEUE, keys.chat_pushed(replica)],
                args=[PUSH_COUNTER_TTL_S, number, *(e.encode() for e in entries)],
            )
        )

    async def wait_for_answers(self, replica: str, *, block_s: float) -> list[bytes]:
        """Block until answers for ``replica`` arrive (one worker's flush of them): they
        are moved to the delivery list and returned ([] after ``block_s`` without)."""
        element: bytes | None = await self.redis.blmove(
            keys.chat_replies(replica),
            keys.chat_delivering(replica),
            block_s,  # type: ignore[arg-type]  # Redis takes seconds with decimals
            "LEFT",
            "RIGHT",
        )
        return [] if element is None else element.split(b"\n")

    async def more_answers(self, replica: str, *, limit: int) -> list[bytes]:
        """After ``wait_for_answers``: every answer element already waiting (up to
        ``limit``), moved to the delivery list in one round trip, as lines."""
        elements: list[bytes] = await self._take_answers(
            keys=[keys.chat_replies(replica), keys.chat_delivering(replica)], args=[limit]
        )
        return [line for element in elements for line in element.split(b"\n")]

    async def undelivered(self, replica: str) -> list[bytes]:
        """Every answer in the delivery list (after a dropped connection: some may not
        have reached their handlers)."""
        elements: list[bytes] = await self.redis.lrange(keys.chat_delivering(replica), 0, -1)  # type: ignore[misc]
        return [line for element in elements for line in element.split(b"\n")]

    async def delivered(self, replica: str) -> None:
        """Forget the delivery list: every answer in it has been handed out."""
        await self.redis.delete(keys.chat_delivering(replica))

    async def cancel(self, chat_id: str) -> None:
        """The client of a streamed request has gone: tell its worker (``relay``)."""
        await self.redis.set(keys.chat_cancel(chat_id), b"1", ex=CANCEL_TTL_S)

    async def forget_replica(self, replica: str) -> None:
        """A replica shutting down: drop its push counter and delivery list."""
        await self.redis.delete(keys.chat_pushed(replica), keys.chat_delivering(replica))

    # -- the workers' side ---------------------------------------------------------------

    async def take(self, worker_id: str, *, block_s: float) -> bytes | None:
        """Block until a chat request is waiting, then move it into the worker's list;
        None after ``block_s`` without one."""
        entry: bytes | None = await self.redis.blmove(
            keys.CHAT_QUEUE,
            keys.worker_chat(worker_id),
            block_s,  # type: ignore[arg-type]  # Redis takes seconds with decimals
            "LEFT",
            "RIGHT",
        )
        return entry

    async def take_more(self, worker_id: str, n: int) -> list[bytes]:
        """Move up to ``n`` waiting chat requests into the worker's list (no blocking)."""
        if n <= 0:
            return []
        entries: list[bytes] = await self._take(
            keys=[keys.CHAT_QUEUE, keys.worker_chat(worker_id)], args=[n]
        )
        return entries

    async def owned(self, worker_id: str) -> list[bytes]:
        """The entries in the worker's list (taken and not answered)."""
        entries: list[bytes] = await self.redis.lrange(keys.worker_chat(worker_id), 0, -1)  # type: ignore[misc]
        return entries

    async def reply(self, worker_id: str, answers: Sequence[Answer]) -> int:
        """Push the answers to their replicas' reply lists (one element per replica, the
        lines joined by newlines: JSON lines hold none) and drop their entries from the
        worker's list, in one script; returns how many lines were pushed."""
        by_replica: dict[str, list[bytes]] = {}
        for answer in answers:
            if answer.replica:
                by_replica.setdefault(answer.replica, []).append(answer.line)
        await self._reply(
            keys=[keys.worker_chat(worker_id), *(keys.chat_replies(r) for r in by_replica)],
            args=[
                REPLY_TTL_S,
                len(answers),
                *(a.entry for a in answers),
                *(b"\n".join(lines) for lines in by_replica.values()),
            ],
        )
        return sum(len(lines) for lines in by_replica.values())

    async def relay(
        self, replica: str, chat_ids: Sequence[str], lines: Sequence[bytes]
    ) -> list[str]:
        """Push streamed answers' events (JSON lines) to the replica's reply list in one
        element, and return which of ``chat_ids`` (the streams with events in ``lines``,
        or the ones to ask about when ``lines`` is empty) have lost their client."""
        gone: list[int] = await self._relay(
            keys=[keys.chat_replies(replica), *(keys.chat_cancel(c) for c in chat_ids)],
            args=[REPLY_TTL_S, b"\n".join(lines)],
        )
        return [chat_ids[int(i) - 1] for i in gone]

    async def requeue(self, worker_id: str, entries: Sequence[bytes] | None = None) -> int:
        """Hand entries of the worker's list back to the front of the queue (``None``:
        all of them, e.g. for a dead worker); returns how many."""
        args: list[Any] = ["all"] if entries is None else ["entries", *entries]
        return int(
            await self._requeue(keys=[keys.CHAT_QUEUE, keys.worker_chat(worker_id)], args=args)
        )
