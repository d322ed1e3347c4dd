"""A CPU-bound local "model" for promptq's ``python:`` backend (runs in the tests).

It stands in for local inference: pure-Python arithmetic that holds the GIL, about
``max_tokens`` x 20,000 steps per request, then a deterministic answer. Run it with a
process pool so that several requests compute at once, one per core:

    PYTHONPATH=examples promptq worker --backend python:cpu_backend:complete \\
        --backend-processes 2

``complete(endpoint, body)`` answers ``/v1/chat/completions`` (the words of the last
user message, reversed) and ``/v1/embeddings`` (a small deterministic vector per
input); anything else raises ``promptq.BackendError``.
"""

from __future__ import annotations

import hashlib
import os
from typing import Any

from promptq import BackendError

STEPS_PER_TOKEN = 20_000


def _burn(steps: int, seed: int) -> int:
    """Deterministic CPU work that holds the GIL (no C call releases it)."""
    x = seed
    for i in range(steps):
        x = (x * 1103515245 + 12345 + i) & 0x7FFFFFFF
    return x


def _last_user_text(body: dict[str, Any]) -> str:
    for message in reversed(body.get("messages") or []):
        if isinstance(message, dict) and message.get("role") == "user":
            content = message.get("content")
            return content if isinstance(content, str) else ""
    return ""


def complete(endpoint: str, body: dict[str, Any]) -> dict[str, Any]:
    if endpoint == "/v1/embeddings":
        inputs = body.get("input")
        texts = [inputs] if isinstance(inputs, str) else list(inputs or [])
        data = []
        for index, text in enumerate(texts):
            digest = hashlib.sha256(str(text).encode()).digest()
            data.append(
                {"object": "embedding", "index": index,
                 "embedding": [round(b / 255, 4) for b in digest[:8]]}
            )  # fmt: skip
        tokens = sum(len(str(t).split()) for t in texts)
        return {
            "object": "list",
            "model": body.get("model", "cpu-local"),
            "data": data,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }
    if endpoint != "/v1/chat/completions":
        raise BackendError(f"cpu_backend does not serve {endpoint}", status_code=404,
                           code="not_found")  # fmt: skip
    text = _last_user_text(body)
    if not text.strip():
        raise BackendError("the last user message is empty", status_code=400,
                           code="invalid_request_error")  # fmt: skip
    max_tokens = int(body.get("max_tokens") or 16)
    _burn(max_tokens * STEPS_PER_TOKEN, seed=len(text))
    words = text.split()
    content = " ".join(reversed(words))
    return {
        "id": f"chatcmpl-local-{os.getpid()}",
        "object": "chat.completion",
        "created": 0,
        "model": body.get("model", "cpu-local"),
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": content},
             "finish_reason": "stop"}
        ],  # fmt: skip
        "usage": {
            "prompt_tokens": len(words),
            "completion_tokens": len(words),
            "total_tokens": 2 * len(words),
        },
    }
