"""Answers of the mock's other endpoints and of streamed requests.

* ``POST /v1/responses``: a ``response`` object echoing the last user input;
* ``POST /v1/moderations``: one result per input, nothing flagged;
* ``"stream": true`` on chat completions: ``chat.completion.chunk`` events, a usage
  chunk when ``stream_options.include_usage``, then ``data: [DONE]``;
* ``"stream": true`` on responses: the Responses API's typed events
  (``response.created`` ... ``response.output_text.delta`` ... ``response.completed``).

The streamed content is the same text as the answer without ``stream``, cut into
pieces, so a test can compare the two.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from typing import Any, Final

import orjson

from promptq.mock._directives import (
    ECHO_PREFIX,
    MAX_ECHO_CHARS,
    estimate_tokens,
    message_text,
    prompt_chars,
)
from promptq.mock._flavours import StreamStyle, stream_style

__all__ = [
    "MODERATION_CATEGORIES",
    "chat_stream",
    "input_messages",
    "moderation_bytes",
    "pieces",
    "response_bytes",
    "response_object",
    "responses_stream",
]

MODERATION_CATEGORIES = (
    "harassment",
    "harassment/threatening",
    "hate",
    "hate/threatening",
    "illicit",
    "illicit/violent",
    "self-harm",
    "self-harm/instructions",
    "self-harm/intent",
    "sexual",
    "sexual/minors",
    "violence",
    "violence/graphic",
)


def _id(prefix: str) -> str:
    return prefix + os.urandom(12).hex()


def input_messages(value: Any) -> list[dict[str, Any]] | None:
    """The Responses API's ``input`` as chat-like messages (None: not a valid input).

    A string is one user message; a list holds messages (``{"role", "content"}``, the
    content a string or ``input_text`` parts) or bare ``input_text`` parts."""
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    if not isinstance(value, list) or not value:
        return None
    messages: list[dict[str, Any]] = []
    for item in value:
        if not isinstance(item, Mapping):
            return None
        if "role" in item:
            content = item.get("content")
            if isinstance(content, list):
                content = "\n".join(
                    part.get("text", "")
                    for part in content
                    if isinstance(part, Mapping) and isinstance(part.get("text"), str)
                )
            messages.append({"role": str(item["role"]), "content": message_text(content)})
        elif isinstance(item.get("text"), str):
            messages.append({"role": "user", "content": item["text"]})
    return messages or None


def _echo(messages: list[dict[str, Any]]) -> str:
    chosen = next((m for m in reversed(messages) if m.get("role") == "user"), None)
    if chosen is None and messages:
        chosen = messages[-1]
    text = message_text(chosen.get("content")) if chosen is not None else ""
    return ECHO_PREFIX + text[:MAX_ECHO_CHARS]


def pieces(text: str, n: int) -> list[str]:
    """``text`` cut into ``n`` (at least 1) consecutive pieces that join back to it."""
    n = max(1, n)
    size, extra = divmod(len(text), n)
    out, start = [], 0
    for index in range(n):
        end = start + size + (1 if index < extra else 0)
        out.append(text[start:end])
        start = end
    return out


def _response_usage(messages: list[dict[str, Any]], text: str) -> dict[str, Any]:
    input_tokens = estimate_tokens(prompt_chars(messages))
    output_tokens = estimate_tokens(len(text))
    return {
        "input_tokens": input_tokens,
        "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
        "output_tokens": output_tokens,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": input_tokens + output_tokens,
    }


def response_object(
    body: Mapping[str, Any],
    messages: list[dict[str, Any]],
    model: str,
    *,
    status: str = "completed",
    text: str | None = None,
    ids: tuple[str, str] | None = None,
) -> dict[str, Any]:
    """A ``response`` object as the Responses API returns it."""
    response_id, message_id = ids or (_id("resp_"), _id("msg_"))
    text = _echo(messages) if text is None else text
    done = status == "completed"
    output = [
        {
            "id": message_id,
            "type": "message",
            "status": "completed",
            "role": "assistant",
            "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}],
        }
    ]
    return {
        "id": response_id,
        "object": "response",
        "created_at": int(time.time()),
        "status": status,
        "error": None,
        "incomplete_details": None,
        "instructions": body.get("instructions"),
        "max_output_tokens": body.get("max_output_tokens"),
        "model": model,
        "output": output if done else [],
        "parallel_tool_calls": True,
        "previous_response_id": None,
        "reasoning": {"effort": None, "summary": None},
        "store": False,
        "temperature": 1.0,
        "text": {"format": {"type": "text"}},
        "tool_choice": "auto",
        "tools": [],
        "top_p": 1.0,
        "truncation": "disabled",
        "usage": _response_usage(messages, text) if done else None,
        "user": None,
        "metadata": {},
    }


def response_bytes(body: Mapping[str, Any], messages: list[dict[str, Any]], model: str) -> bytes:
    return orjson.dumps(response_object(body, messages, model))


def moderation_bytes(texts: list[str], model: str) -> bytes:
    result = {
        "flagged": False,
        "categories": dict.fromkeys(MODERATION_CATEGORIES, False),
        "category_scores": dict.fromkeys(MODERATION_CATEGORIES, 0.0001),
        "category_applied_input_types": {name: ["text"] for name in MODERATION_CATEGORIES},
    }
    return orjson.dumps({"id": _id("modr-"), "model": model, "results": [result] * len(texts)})


#: OpenAI's own chunks
OPENAI_STYLE: Final = stream_style("openai")


def _data(payload: Any) -> bytes:
    return b"data: " + orjson.dumps(payload) + b"\n\n"


def chat_stream(
    body: Mapping[str, Any],
    messages: list[dict[str, Any]],
    model: str,
    content: str,
    n: int,
    style: StreamStyle = OPENAI_STYLE,
) -> list[bytes]:
    """The SSE events of a streamed chat completion (each ends in a blank line), with
    the chunk fields of the server ``style`` stands for."""
    options = body.get("stream_options")
    usage_wanted = isinstance(options, Mapping) and options.get("include_usage") is True
    base: dict[str, Any] = {"id": _id("chatcmpl-"), "object": "chat.completion.chunk",
                            "created": int(time.time()), "model": model}  # fmt: skip
    if style.fingerprint is not ...:
        base["system_fingerprint"] = style.fingerprint
    nulls = style.usage_null == "always" or (style.usage_null == "asked" and usage_wanted)
    extra: dict[str, Any] = {"usage": None} if nulls else {}
    timings = {"prompt_n": estimate_tokens(prompt_chars(messages)), "prompt_ms": 1.5,
               "predicted_n": estimate_tokens(len(content)), "predicted_ms": 9.5}  # fmt: skip

    def chunk(delta: dict[str, Any], finish: str | None, **more: Any) -> bytes:
        if style.role_every_delta:
            delta = {"role": "assistant", **delta}
        choice: dict[str, Any] = {"index": 0, "delta": delta, "finish_reason": finish}
        if style.logprobs:
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        return _data({**base, "choices": [choice], **extra, **more})

    events = [b":\n\n"] if style.ping else []
    events.append(chunk({"role": "assistant", "content": ""}, None))
    events += [chunk({"content": piece}, None) for piece in pieces(content, n)]
    events.append(chunk({}, "stop", **({"timings": timings} if style.timings else {})))
    if usage_wanted:
        prompt_tokens = estimate_tokens(prompt_chars(messages))
        completion_tokens = estimate_tokens(len(content))
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                 "total_tokens": prompt_tokens + completion_tokens}  # fmt: skip
        last: dict[str, Any] = {**base, "choices": [], "usage": usage}
        if style.timings:
            last["timings"] = timings
        events.append(_data(last))
    events.append(b"data: [DONE]\n\n")
    return events


def responses_stream(
    body: Mapping[str, Any], messages: list[dict[str, Any]], model: str, n: int
) -> list[bytes]:
    """The typed SSE events of a streamed response (``event:`` and ``data:`` lines)."""
    ids = (_id("resp_"), _id("msg_"))
    message_id = ids[1]
    text = _echo(messages)
    sequence = iter(range(1_000_000))

    def event(kind: str, **fields: Any) -> bytes:
        payload = {"type": kind, "sequence_number": next(sequence), **fields}
        return b"event: " + kind.encode() + b"\n" + _data(payload)

    started = response_object(body, messages, model, status="in_progress", ids=ids)
    item = {"id": message_id, "type": "message", "status": "in_progress", "role": "assistant",
            "content": []}  # fmt: skip
    part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
    where = {"item_id": message_id, "output_index": 0, "content_index": 0}
    events = [
        event("response.created", response=started),
        event("response.in_progress", response=started),
        event("response.output_item.added", output_index=0, item=item),
        event("response.content_part.added", **where, part=part),
    ]
    events += [
        event("response.output_text.delta", **where, delta=piece, logprobs=[])
        for piece in pieces(text, n)
    ]
    events.append(event("response.output_text.done", **where, text=text, logprobs=[]))
    done_part = {**part, "text": text}
    events.append(event("response.content_part.done", **where, part=done_part))
    done_item = {**item, "status": "completed", "content": [done_part]}
    events.append(event("response.output_item.done", output_index=0, item=done_item))
    final = response_object(body, messages, model, ids=ids, text=text)
    events.append(event("response.completed", response=final))
    return events
