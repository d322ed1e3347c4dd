"""The chat lane's queue entries, written by ``promptq serve`` and read by workers.

``POST /v1/chat/completions`` does not make a batch: a batch costs a ticket job, an
aggregator job and a handful of keys, which is noise next to bulk work but most of the
cost of one interactive request. A chat request is one entry in ``keys.CHAT_QUEUE``:

    <id: 32 hex digits>{"body": {...}, "replica": "<API replica id>", "deadline": 1.7e9}

Workers take entries before any batch work (``Dispatcher.claim_chat``), keep them in
their ``keys.worker_chat`` hash while they run (so a dead worker's entries are handed
back), and push the result line to the replica's ``keys.chat_replies`` list, where the
waiting handler picks it up. An entry whose ``deadline`` (unix seconds on Redis' clock,
to which every process measures its offset) has passed is dropped unsent: its handler
has already answered 504.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

import orjson

from promptq.shared.keys import CHAT_ID_LEN, CHAT_ID_RE


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

    def encode(self) -> bytes:
        payload = {"body": self.body, "replica": self.replica, "deadline": self.deadline}
        return self.id.encode() + orjson.dumps(payload)

    @classmethod
    def decode(cls, raw: bytes) -> ChatEntry:
        chat_id = raw[:CHAT_ID_LEN].decode("ascii", "replace")
        try:
            payload = orjson.loads(raw[CHAT_ID_LEN:])
            body, replica, deadline = payload["body"], payload["replica"], payload["deadline"]
        except (orjson.JSONDecodeError, KeyError, TypeError) as exc:
            raise BadChatEntry(f"unreadable chat queue entry {chat_id!r}: {exc}") from exc
        if not (
            CHAT_ID_RE.match(chat_id)
            and isinstance(body, dict)
            and isinstance(replica, str)
            and CHAT_ID_RE.match(replica)
            and isinstance(deadline, int | float)
        ):
            raise BadChatEntry(f"malformed chat queue entry {chat_id!r}")
        return cls(id=chat_id, body=body, replica=replica, deadline=float(deadline))
