"""JSON in, JSON out: every payload promptq puts in Redis, arq jobs included.

arq pickles job payloads by default, which hands code execution to anyone who can
write to Redis. promptq gives arq these functions instead; a payload that is not JSON
(for example a planted pickle, which starts with byte 0x80) is refused, never loaded.
"""

from __future__ import annotations

import logging
from typing import Any

import orjson

from promptq.shared.errors import UnsafePayload

logger = logging.getLogger(__name__)


def dumps(obj: Any) -> bytes:
    """Serialize to compact JSON bytes (orjson: fast, rejects non-JSON types)."""
    return orjson.dumps(obj)


def loads(data: bytes | bytearray | memoryview | str) -> Any:
    """Parse JSON bytes or text."""
    return orjson.loads(data)


def job_serializer(obj: dict[str, Any]) -> bytes:
    """arq ``job_serializer``: JSON instead of pickle."""
    return orjson.dumps(obj)


def job_deserializer(data: bytes) -> dict[str, Any]:
    """arq ``job_deserializer``: accept JSON objects only.

    arq reports the raised error as a failed deserialization and drops the job, so a
    planted payload is logged and never executed.
    """
    head = bytes(data[:1])
    if head != b"{":
        logger.error(
            "refused a queued job payload that is not JSON (first byte %r): "
            "something other than promptq wrote to the queue",
            head,
        )
        raise UnsafePayload("job payload is not a JSON object; refusing to load it")
    try:
        obj = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise UnsafePayload(f"job payload is not valid JSON: {exc}") from exc
    if not isinstance(obj, dict):
        raise UnsafePayload("job payload is not a JSON object")
    return obj
