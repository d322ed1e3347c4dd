"""OpenAI object shapes (Batch, File) built from what promptq keeps in Redis.

promptq's batch lifecycle has two states OpenAI's lacks; they are reported as the
OpenAI state a client expects:

* ``queued`` (validated, waiting for a worker) -> ``in_progress``;
* ``finalizing`` on the way to ``cancelled`` -> ``cancelling``.

Output and error files of a batch are virtual: ``file-out-<batch id>`` and
``file-err-<batch id>`` are generated from the batch's results when read.
"""

from __future__ import annotations

from typing import Any

import orjson

from promptq.shared.models import CHAT_ENDPOINT
from promptq.shared.status import Status, parse

#: OpenAI's only completion window; promptq does not expire batches before it ends.
COMPLETION_WINDOW = "24h"
COMPLETION_WINDOW_S = 24 * 3600

OUTPUT_PREFIX = "file-out-"
ERROR_PREFIX = "file-err-"

#: promptq's statuses that OpenAI spells otherwise (every other one reads the same)
_OPENAI_STATUS = {Status.QUEUED: Status.IN_PROGRESS}


def output_file_id(batch_id: str) -> str:
    return OUTPUT_PREFIX + batch_id


def error_file_id(batch_id: str) -> str:
    return ERROR_PREFIX + batch_id


def _ts(raw: dict[str, str], field: str) -> int | None:
    value = raw.get(field)
    if not value:
        return None
    try:
        return int(float(value))
    except ValueError:
        return None


def _int(raw: dict[str, str], field: str) -> int:
    try:
        return int(raw.get(field) or 0)
    except ValueError:
        return 0


def openai_status(raw: dict[str, str]) -> str:
    status = parse(raw.get("status")) or Status.VALIDATING
    if status is Status.FINALIZING and raw.get("finalizing_from") == Status.CANCELLING:
        return Status.CANCELLING.value
    return _OPENAI_STATUS.get(status, status).value


def batch_object(
    batch_id: str, raw: dict[str, str], stats: dict[str, str], api: dict[str, str]
) -> dict[str, Any]:
    """The OpenAI Batch object for one batch (its hash, stats hash and ``:api`` hash)."""
    status = openai_status(raw)
    created_at = _ts(api, "created_at") or _ts(raw, "created_at") or 0
    succeeded, failed = _int(raw, "succeeded"), _int(raw, "failed")
    stored = parse(raw.get("status"))
    in_progress_at = _ts(raw, "in_progress_at")
    if in_progress_at is None and stored not in (Status.VALIDATING, Status.FAILED):
        in_progress_at = _ts(raw, "created_at")  # queued: validated, waiting for a worker
    ended = _ts(raw, "completed_at")
    cancelled = stored is Status.CANCELLED
    finished = stored in (Status.COMPLETED, Status.CANCELLED)
    input_tokens, output_tokens = _int(stats, "input_tokens"), _int(stats, "output_tokens")
    errors = orjson.loads(raw["errors"]) if raw.get("errors") else None
    metadata = orjson.loads(api["metadata"]) if api.get("metadata") else None
    return {
        "id": batch_id,
        "object": "batch",
        "endpoint": api.get("endpoint") or raw.get("endpoint") or CHAT_ENDPOINT,
        "model": raw.get("model") or None,
        "errors": errors,
        "input_file_id": api.get("input_file_id", ""),
        "completion_window": api.get("completion_window", COMPLETION_WINDOW),
        "status": status,
        "output_file_id": output_file_id(batch_id) if finished and succeeded else None,
        "error_file_id": error_file_id(batch_id) if finished and failed else None,
        "created_at": created_at,
        "in_progress_at": in_progress_at,
        "expires_at": created_at + COMPLETION_WINDOW_S,
        "finalizing_at": _ts(raw, "finalizing_at"),
        "completed_at": ended if not cancelled else None,
        "failed_at": _ts(raw, "failed_at"),
        "expired_at": None,
        "cancelling_at": _ts(raw, "cancelling_at"),
        "cancelled_at": ended if cancelled else None,
        "request_counts": {
            "total": _int(raw, "total"),
            "completed": succeeded,
            "failed": failed,
        },
        "usage": {
            "input_tokens": input_tokens,
            "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": output_tokens,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": input_tokens + output_tokens,
        },
        "metadata": metadata,
    }


def file_object(
    file_id: str,
    *,
    size: int,
    created_at: int,
    filename: str,
    purpose: str,
    expires_at: int | None = None,
) -> dict[str, Any]:
    """The OpenAI File object."""
    return {
        "id": file_id,
        "object": "file",
        "bytes": size,
        "created_at": created_at,
        "expires_at": expires_at,
        "filename": filename,
        "purpose": purpose,
        "status": "processed",
        "status_details": None,
    }
