"""Parse and validate request files (JSONL) and Python-API items.

Two line forms (see the README):

* OpenAI Batch API: ``{"custom_id", "method": "POST", "url": "/v1/chat/completions", "body"}``
* short form: ``{"prompt": "...", "custom_id": "q1"}`` (custom_id defaults to ``line-<N>``)

A file with any bad line is rejected whole, before anything is enqueued, with every bad
line listed (line number, field, reason): ``InputError.errors``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import orjson

from promptq.shared.errors import InputError, LineError
from promptq.shared.models import CHAT_ENDPOINT, ENDPOINTS, QueuedRequest

MAX_CUSTOM_ID_CHARS = 512
UTF8_BOM = b"\xef\xbb\xbf"
# orjson reports "line 1 column 19 (char 18)": every line is parsed on its own, so its
# "line 1" is the file's line N; keep the column only
_JSON_WHERE = re.compile(r":? line \d+ column (\d+) \(char \d+\)")
#: At most this many problems are kept (all are counted): a broken 1 GB file must not
#: produce a 1 GB error report.
MAX_REPORTED_ERRORS = 1000

# Short-form keys copied into the chat completion body as they are.
_SHORT_FORM_PARAMS = frozenset(
    {
        "model",
        "max_tokens",
        "max_completion_tokens",
        "temperature",
        "top_p",
        "stop",
        "seed",
        "response_format",
        "presence_penalty",
        "frequency_penalty",
        "user",
    }
)
_SHORT_FORM_KEYS = _SHORT_FORM_PARAMS | {"prompt", "messages", "custom_id", "system"}
_BATCH_FORM_KEYS = frozenset({"custom_id", "method", "url", "body"})


@dataclass(frozen=True, slots=True)
class ParsedBatch:
    """A fully validated batch, ready to enqueue."""

    requests: list[QueuedRequest]
    endpoint: str
    model: str


class _Collector:
    def __init__(self) -> None:
        self.errors: list[LineError] = []
        self.count = 0

    def add(self, line: int, field: str | None, message: str) -> None:
        self.count += 1
        if len(self.errors) < MAX_REPORTED_ERRORS:
            self.errors.append(LineError(line, field, message))


def parse_jsonl(
    data: bytes,
    *,
    source: str,
    default_model: str,
    max_lines: int = 50_000,
    max_bytes: int = 200 * 1024 * 1024,
) -> ParsedBatch:
    """Validate a whole JSONL file; raise ``InputError`` listing every bad line."""
    if len(data) > max_bytes:
        raise InputError(
            source,
            [
                LineError(
                    0,
                    None,
                    f"file is {len(data):,} bytes, over the {max_bytes:,}-byte limit; "
                    "split it into several batches",
                )
            ],
        )
    if data.startswith(UTF8_BOM):  # Windows tools write one; it is not part of line 1
        data = data[len(UTF8_BOM) :]
    lines = data.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    if len(lines) > max_lines:
        raise InputError(
            source,
            [
                LineError(
                    0,
                    None,
                    f"file has {len(lines):,} lines, over the {max_lines:,}-line limit; "
                    "split it into several batches",
                )
            ],
        )
    items: list[tuple[int, Any]] = []
    errors = _Collector()
    for number, raw in enumerate(lines, start=1):
        if raw.endswith(b"\r"):
            raw = raw[:-1]
        if not raw.strip():
            continue  # blank lines carry nothing; tolerate them like most JSONL readers
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            errors.add(number, None, f"not valid UTF-8 (byte {exc.start + 1} of the line)")
            continue
        try:
            items.append((number, orjson.loads(raw)))
        except orjson.JSONDecodeError as exc:
            errors.add(number, None, f"not valid JSON: {json_problem(exc)}")
    if not items and not errors.count:
        errors.add(0, None, "no requests: the file is empty")
    return _validate(items, errors, source=source, default_model=default_model)


def json_problem(exc: orjson.JSONDecodeError) -> str:
    """orjson's message for one line, with the position as a column of that line."""
    return _JSON_WHERE.sub(lambda m: f" at column {m.group(1)}", str(exc))


def parse_items(
    items: Iterable[str | Mapping[str, Any]], *, default_model: str, source: str = "submit()"
) -> ParsedBatch:
    """Validate Python-API items: a string is a prompt, a mapping is either line form.

    Positions are reported as 1-based "line" numbers, the item's index + 1.
    """
    numbered: list[tuple[int, Any]] = []
    for number, item in enumerate(items, start=1):
        numbered.append((number, {"prompt": item} if isinstance(item, str) else item))
    errors = _Collector()
    if not numbered:
        errors.add(0, None, "no requests: nothing to submit")
    return _validate(numbered, errors, source=source, default_model=default_model)


def _validate(
    items: list[tuple[int, Any]], errors: _Collector, *, source: str, default_model: str
) -> ParsedBatch:
    requests: list[QueuedRequest] = []
    seen: dict[str, int] = {}
    endpoint: str | None = None
    endpoint_line = 0
    for number, obj in items:
        request = _one(number, obj, errors, default_model)
        if request is None:
            continue
        req, url = request
        if endpoint is None:
            endpoint, endpoint_line = url, number
        elif url != endpoint:
            errors.add(
                number,
                "url",
                f"'{url}' differs from '{endpoint}' on line {endpoint_line}; "
                "a batch targets one endpoint",
            )
            continue
        first = seen.get(req.custom_id)
        if first is not None:
            errors.add(
                number,
                "custom_id",
                f"duplicate custom_id '{req.custom_id}' (first on line {first}); "
                "custom_id must be unique within a batch",
            )
            continue
        seen[req.custom_id] = number
        requests.append(req)
    if errors.count:
        raise InputError(source, errors.errors, total=errors.count)
    models = {str(r.body.get("model", default_model)) for r in requests}
    return ParsedBatch(
        requests=requests,
        endpoint=endpoint or CHAT_ENDPOINT,
        model=models.pop() if len(models) == 1 else "mixed",
    )


def _custom_id(number: int, value: Any, errors: _Collector, *, required: bool) -> str | None:
    if value is None:
        if required:
            errors.add(number, "custom_id", "missing; the batch form requires a custom_id")
            return None
        return f"line-{number}"
    if not isinstance(value, str):
        errors.add(number, "custom_id", f"must be a string, got {_type(value)}")
        return None
    if not value or len(value) > MAX_CUSTOM_ID_CHARS:
        errors.add(number, "custom_id", f"must be 1 to {MAX_CUSTOM_ID_CHARS} characters long")
        return None
    if not value.isprintable():
        errors.add(number, "custom_id", "must not contain control characters")
        return None
    return value


def _one(
    number: int, obj: Any, errors: _Collector, default_model: str
) -> tuple[QueuedRequest, str] | None:
    if not isinstance(obj, dict):
        errors.add(number, None, f"must be a JSON object, got {_type(obj)}")
        return None
    if "prompt" in obj or ("messages" in obj and "body" not in obj and "url" not in obj):
        return _short_form(number, obj, errors, default_model)
    if "body" in obj or "url" in obj or "method" in obj:
        return _batch_form(number, obj, errors, default_model)
    errors.add(
        number,
        "prompt",
        'missing; a line is either {"prompt": "..."} (or {"messages": [...]}) or an OpenAI '
        'Batch API request {"custom_id", "method", "url", "body"}',
    )
    return None


def _short_form(
    number: int, obj: dict[str, Any], errors: _Collector, default_model: str
) -> tuple[QueuedRequest, str] | None:
    before = errors.count
    unknown = sorted(set(obj) - _SHORT_FORM_KEYS)
    for key in unknown:
        errors.add(number, key, f"unknown field; allowed: {', '.join(sorted(_SHORT_FORM_KEYS))}")
    prompt = obj.get("prompt")
    given_messages = obj.get("messages")
    if "prompt" in obj and "messages" in obj:
        errors.add(number, "messages", "give either prompt or messages, not both")
    elif "prompt" in obj:
        if not isinstance(prompt, str):
            errors.add(number, "prompt", f"must be a string, got {_type(prompt)}")
        elif not prompt.strip():
            errors.add(number, "prompt", "is empty")
    else:
        _check_messages(number, given_messages, errors, field="messages")
    system = obj.get("system")
    if system is not None and not isinstance(system, str):
        errors.add(number, "system", f"must be a string, got {_type(system)}")
    model = obj.get("model", default_model)
    if not isinstance(model, str) or not model:
        errors.add(number, "model", "must be a non-empty string")
    custom_id = _custom_id(number, obj.get("custom_id"), errors, required=False)
    if errors.count > before or custom_id is None:
        return None
    messages = (
        list(given_messages)
        if "prompt" not in obj and isinstance(given_messages, list)
        else [{"role": "user", "content": prompt}]
    )
    if system:
        messages.insert(0, {"role": "system", "content": system})
    body: dict[str, Any] = {"model": model, "messages": messages}
    body.update({k: v for k, v in obj.items() if k in _SHORT_FORM_PARAMS and k != "model"})
    return QueuedRequest(custom_id=custom_id, body=body, line=number), CHAT_ENDPOINT


def _batch_form(
    number: int, obj: dict[str, Any], errors: _Collector, default_model: str
) -> tuple[QueuedRequest, str] | None:
    before = errors.count
    for key in sorted(set(obj) - _BATCH_FORM_KEYS):
        errors.add(number, key, "unknown field; allowed: custom_id, method, url, body")
    custom_id = _custom_id(number, obj.get("custom_id"), errors, required=True)
    method = obj.get("method")
    if method != "POST":
        errors.add(number, "method", f'must be "POST", got {method!r}')
    url = obj.get("url")
    if url not in ENDPOINTS:
        errors.add(number, "url", f"must be one of {', '.join(ENDPOINTS)}, got {url!r}")
    body = obj.get("body")
    if not isinstance(body, dict):
        errors.add(number, "body", f"must be a JSON object, got {_type(body)}")
    else:
        model = body.get("model", default_model)
        if not isinstance(model, str) or not model:
            errors.add(number, "body.model", "must be a non-empty string")
        if url == CHAT_ENDPOINT:
            _check_messages(number, body.get("messages"), errors)
        elif url == "/v1/completions" and not body.get("prompt"):
            errors.add(number, "body.prompt", "missing or empty")
        elif url == "/v1/embeddings" and not body.get("input"):
            errors.add(number, "body.input", "missing or empty")
        if body.get("stream"):
            errors.add(number, "body.stream", "streaming is not supported in batches")
    if errors.count > before or custom_id is None or not isinstance(body, dict):
        return None
    if "model" not in body:
        body = {"model": default_model, **body}
    return QueuedRequest(custom_id=custom_id, body=body, line=number), str(url)


def _check_messages(
    number: int, messages: Any, errors: _Collector, *, field: str = "body.messages"
) -> None:
    if not isinstance(messages, list) or not messages:
        errors.add(number, field, "must be a non-empty list of messages")
        return
    base = field
    for i, message in enumerate(messages):
        field = f"{base}[{i}]"
        if not isinstance(message, dict):
            errors.add(number, field, f"must be an object, got {_type(message)}")
            continue
        if not isinstance(message.get("role"), str):
            errors.add(number, f"{field}.role", "missing or not a string")
        content = message.get("content")
        if content is None and not message.get("tool_calls"):
            errors.add(number, f"{field}.content", "missing")
        elif isinstance(content, str) and not content.strip() and message.get("role") == "user":
            errors.add(number, f"{field}.content", "is empty")


def _type(value: Any) -> str:
    return {
        dict: "an object",
        list: "a list",
        str: "a string",
        bool: "a boolean",
        int: "a number",
        float: "a number",
        type(None): "null",
    }.get(type(value), type(value).__name__)
