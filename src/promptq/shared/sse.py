"""Server-Sent Events as promptq relays them: parsing, summing up, and making a stream out
of a whole answer.

An upstream's stream is relayed event by event (the text between blank lines, ``event:``
and ``data:`` lines as they came) from the worker through Redis to the API, which writes
each one out unchanged. What promptq needs to know of them is here: the ``data`` of an
event, whether it says the stream failed, and the usage that ends it
(``stream_options.include_usage`` for chat, ``response.completed`` for responses). A
backend that answers whole (a ``python:`` function, a server that ignores ``stream``)
is turned into the events the client asked for (:func:`events_from_answer`).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import orjson

__all__ = [
    "DONE",
    "STREAMING_ENDPOINTS",
    "StreamSummary",
    "error_event",
    "event_data",
    "events_from_answer",
    "is_comment",
    "upstream_error",
]

#: chat completions end their stream with this data
DONE = "[DONE]"


def _may_matter(event: str) -> bool:
    """Whether an event may carry usage, an error or a response's final state (the
    others are not parsed). ``"usage": null``, in every chunk with ``include_usage``,
    does not count. Substring tests: a regular expression costs more than the rest of
    relaying an event."""
    if '"usage"' in event and '"usage":null' not in event and '"usage": null' not in event:
        return True
    return (
        '"error"' in event
        or "response.completed" in event
        or "response.failed" in event
        or "response.incomplete" in event
    )


#: the endpoints that stream (``"stream": true``)
STREAMING_ENDPOINTS = frozenset({"/v1/chat/completions", "/v1/responses"})


def event_data(event: str) -> str | None:
    """The ``data`` of one event (multi-line data joined by newlines); None without."""
    lines = [line[5:].removeprefix(" ") for line in event.split("\n") if line.startswith("data:")]
    return "\n".join(lines) if lines else None


def is_comment(event: str) -> bool:
    """An event of comment lines only (``:``), such as ``llama-server``'s keep-alive
    pings: no data, nothing to relay."""
    return event.startswith(":") and all(line.startswith(":") for line in event.split("\n"))


def upstream_error(event: str) -> dict[str, Any] | None:
    """The error an upstream reports in one event of its stream, in OpenAI's shape
    (``message``, ``type``, ``param``, ``code``); None when the event is no error.

    The servers' own shapes: ``{"error": {...}}`` (OpenAI, vLLM since 0.10.1, Ollama,
    llama.cpp), vLLM's older ``{"object": "error", "message", "type", "code"}``, TGI's
    ``{"error": "message", "error_type": "generation"}``, and an ``error:`` line instead
    of ``data:`` (older ``llama-server``s, which SSE readers skip)."""
    if "error" not in event:  # most events: no parse
        return None
    data = event_data(event)
    if data is None:  # an ``error:`` line: the error object itself, or text
        lines = [line[6:].strip() for line in event.split("\n") if line.startswith("error:")]
        if not lines:
            return None
        data = "\n".join(lines)
        try:
            payload = orjson.loads(data)
        except orjson.JSONDecodeError:
            payload = {"message": data}
        payload = {"error": payload} if isinstance(payload, dict) else {"error": data}
    else:
        try:
            payload = orjson.loads(data)
        except orjson.JSONDecodeError:
            return None
    if not isinstance(payload, dict):
        return None
    found = payload.get("error")
    if isinstance(found, dict):
        error = found
    elif isinstance(found, str) and found:  # TGI
        kind = payload.get("error_type")
        error = {"message": found, "type": "server_error", "code": kind}
    elif payload.get("object") == "error" and isinstance(payload.get("message"), str):
        error = payload  # vLLM before 0.10.1
    else:
        return None
    return {
        "message": str(error.get("message") or "the upstream reported an error"),
        "type": str(error.get("type") or "server_error"),
        "param": error.get("param"),
        "code": error.get("code"),
    }


def error_event(message: str, *, code: str, type_: str = "server_error") -> str:
    """An event that ends a stream that failed midway, as OpenAI sends one: the SDKs
    raise ``APIError`` with its message when they read it."""
    payload = {"error": {"message": message, "type": type_, "param": None, "code": code}}
    return "data: " + orjson.dumps(payload).decode()


class StreamSummary:
    """What one relayed stream amounts to: its id, model, usage, and any error in it."""

    def __init__(self) -> None:
        self.events = 0
        self.id: str | None = None
        self.model: str | None = None
        self.usage: dict[str, Any] | None = None
        self.error: dict[str, Any] | None = None
        self.object = "chat.completion"

    def add(self, event: str) -> None:
        self.events += 1
        if self.events > 1 and not _may_matter(event):
            return  # a content delta: nothing to sum up (most events; skip the parse)
        data = event_data(event)
        if data is None or data == DONE:
            return
        try:
            payload = orjson.loads(data)
        except orjson.JSONDecodeError:
            return
        if not isinstance(payload, dict):
            return
        if isinstance(payload.get("error"), dict):
            self.error = payload["error"]
        kind = payload.get("type")
        if kind == "error" and isinstance(payload.get("message"), str):  # Responses API
            self.error = {"message": payload["message"], "type": "server_error",
                          "code": payload.get("code")}  # fmt: skip
            return
        if isinstance(kind, str) and kind.startswith("response."):
            self.object = "response"
            response = payload.get("response")
            if isinstance(response, dict):
                self._take(response)
                if kind == "response.failed" and isinstance(response.get("error"), dict):
                    self.error = response["error"]
            return
        self._take(payload)

    def _take(self, payload: Mapping[str, Any]) -> None:
        if isinstance(payload.get("id"), str):
            self.id = payload["id"]
        if isinstance(payload.get("model"), str):
            self.model = payload["model"]
        if isinstance(payload.get("usage"), dict):
            self.usage = payload["usage"]

    def body(self) -> dict[str, Any]:
        """The result line's body for a streamed answer (the content went to the client)."""
        body: dict[str, Any] = {"object": self.object, "streamed": True, "events": self.events}
        if self.id is not None:
            body["id"] = self.id
        if self.model is not None:
            body["model"] = self.model
        if self.usage is not None:
            body["usage"] = self.usage
        return body


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _event(kind: str, payload: dict[str, Any]) -> str:
    return f"event: {kind}\ndata: " + orjson.dumps(payload).decode()


def events_from_answer(endpoint: str, request: Mapping[str, Any], answer: Any) -> list[str]:
    """A whole answer as the stream the client asked for: chat chunks (with a usage
    chunk when ``stream_options.include_usage``) and ``[DONE]``, or the Responses API's
    ``response.created`` ... ``response.completed`` events."""
    if not isinstance(answer, dict):
        answer = {}
    if endpoint == "/v1/responses":
        return _response_events(answer)
    options = request.get("stream_options")
    usage_wanted = isinstance(options, Mapping) and options.get("include_usage") is True
    base = {
        "id": answer.get("id", "chatcmpl-promptq"),
        "object": "chat.completion.chunk",
        "created": answer.get("created", int(time.time())),
        "model": answer.get("model", request.get("model", "")),
    }
    extra: dict[str, Any] = {"usage": None} if usage_wanted else {}
    events = []
    for choice in _list(answer.get("choices")):
        if not isinstance(choice, dict):
            continue
        message = _dict(choice.get("message"))
        delta = {"role": message.get("role", "assistant"), "content": message.get("content")}
        if message.get("tool_calls"):
            delta["tool_calls"] = [
                {"index": i, **call} for i, call in enumerate(message["tool_calls"])
            ]
        index = choice.get("index", 0)
        first = {"index": index, "delta": delta, "logprobs": None, "finish_reason": None}
        last = {"index": index, "delta": {}, "logprobs": None,
                "finish_reason": choice.get("finish_reason", "stop")}  # fmt: skip
        events.append("data: " + orjson.dumps({**base, "choices": [first], **extra}).decode())
        events.append("data: " + orjson.dumps({**base, "choices": [last], **extra}).decode())
    if usage_wanted and isinstance(answer.get("usage"), dict):
        payload = {**base, "choices": [], "usage": answer["usage"]}
        events.append("data: " + orjson.dumps(payload).decode())
    events.append(f"data: {DONE}")
    return events


def _response_events(answer: dict[str, Any]) -> list[str]:
    sequence = 0

    def event(kind: str, **fields: Any) -> str:
        nonlocal sequence
        payload = {"type": kind, "sequence_number": sequence, **fields}
        sequence += 1
        return _event(kind, payload)

    started = {**answer, "status": "in_progress", "output": [], "usage": None}
    events = [event("response.created", response=started)]
    for index, item in enumerate(_list(answer.get("output"))):
        if not isinstance(item, dict):
            continue
        events.append(event("response.output_item.added", output_index=index, item=item))
        for part_index, part in enumerate(_list(item.get("content"))):
            if isinstance(part, dict) and part.get("type") == "output_text":
                where = {"item_id": item.get("id", ""), "output_index": index,
                         "content_index": part_index}  # fmt: skip
                text = str(part.get("text", ""))
                events.append(event("response.output_text.delta", **where, delta=text, logprobs=[]))
                events.append(event("response.output_text.done", **where, text=text, logprobs=[]))
        events.append(event("response.output_item.done", output_index=index, item=item))
    events.append(event("response.completed", response=answer))
    return events
