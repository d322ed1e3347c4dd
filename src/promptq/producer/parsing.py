"""Parse and validate request files (JSONL) and Python-API items, as streams.

Two line forms (see the README):

* OpenAI Batch API: ``{"custom_id", "method": "POST", "url": "/v1/chat/completions", "body"}``
* short form: ``{"prompt": "...", "custom_id": "q1"}`` (or ``"messages": [...]``;
  custom_id defaults to ``line-<N>``)

A file with any bad line is rejected whole, before anything is enqueued, with every bad
line listed (line number, field, reason): ``InputError.errors``.

Memory does not grow with the file: ``spool_jsonl`` reads it line by line, validates each
line, and writes the valid requests to a spool file on disk, which the producer then
streams into Redis (``SpooledBatch``). What is kept per line is 8 bytes of a hash of its
custom_id (for the uniqueness check; a hash seen twice is confirmed against the spool,
so two different ids never count as duplicates) and the running fingerprint of the
batch (an order-free sum of the hashes of its requests). ``parse_jsonl`` and
``parse_items`` give the same validation for inputs already in memory.
"""

from __future__ import annotations

import hashlib
import re
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import IO, Any

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
_MASK_256 = (1 << 256) - 1

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
    """A fully validated batch in memory, ready to enqueue."""

    requests: list[QueuedRequest]
    endpoint: str
    model: str
    fingerprint: str = ""

    @classmethod
    def of(cls, requests: list[QueuedRequest], *, endpoint: str, model: str) -> ParsedBatch:
        """Requests already valid (retry-failed), with their fingerprint."""
        total = 0
        for r in requests:
            total = (total + request_digest(r.custom_id, r.body)) & _MASK_256
        return cls(requests, endpoint, model, fingerprint_of(endpoint, total))

    @property
    def total(self) -> int:
        return len(self.requests)

    def ids(self) -> Iterator[str]:
        """The custom_ids, in input order."""
        return (r.custom_id for r in self.requests)

    def chunks(self, size: int, *, skip: int = 0) -> Iterator[list[QueuedRequest]]:
        """The requests in input order, ``size`` at a time, after the first ``skip``."""
        for start in range(skip, len(self.requests), size):
            yield self.requests[start : start + size]


class SpooledBatch:
    """A fully validated batch whose requests wait in a spool file on disk (input order);
    use it as a context manager (the spool is deleted on close)."""

    def __init__(self, spool: IO[bytes], *, total: int, endpoint: str, model: str,
                 fingerprint: str) -> None:  # fmt: skip
        self._spool = spool
        self.total = total
        self.endpoint = endpoint
        self.model = model
        self.fingerprint = fingerprint

    def __repr__(self) -> str:
        return f"SpooledBatch({self.total:,} requests, {self.endpoint})"

    def __enter__(self) -> SpooledBatch:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._spool.close()

    def __iter__(self) -> Iterator[QueuedRequest]:
        self._spool.seek(0)
        for raw in self._spool:
            yield QueuedRequest.from_json(raw)

    def chunks(self, size: int, *, skip: int = 0) -> Iterator[list[QueuedRequest]]:
        chunk: list[QueuedRequest] = []
        for index, request in enumerate(self):
            if index < skip:
                continue
            chunk.append(request)
            if len(chunk) == size:
                yield chunk
                chunk = []
        if chunk:
            yield chunk

    @property
    def requests(self) -> list[QueuedRequest]:
        """Every request, in memory (for small batches and tests)."""
        return list(self)

    def ids(self) -> Iterator[str]:
        """The custom_ids, in input order."""
        for request in self:
            yield request.custom_id

    def filtered(self, keep: Callable[[QueuedRequest], bool]) -> SpooledBatch:
        """A new spooled batch of the requests ``keep`` accepts (this one stays open)."""
        spool = tempfile.TemporaryFile(prefix="promptq-spool-")  # noqa: SIM115
        total = digest_sum = 0
        for request in self:
            if keep(request):
                spool.write(request.to_json() + b"\n")
                digest_sum = (digest_sum + request_digest(request.custom_id, request.body)) & (
                    _MASK_256
                )
                total += 1
        spool.flush()
        return SpooledBatch(spool, total=total, endpoint=self.endpoint, model=self.model,
                            fingerprint=fingerprint_of(self.endpoint, digest_sum))  # fmt: skip


#: what can be enqueued: in memory or spooled
Requests = ParsedBatch | SpooledBatch


class _Collector:
    def __init__(self) -> None:
        self.errors: list[LineError] = []
        self.count = 0

    def add(self, line: int, field: str | None, message: str) -> None:
        self.count += 1
        if len(self.errors) < MAX_REPORTED_ERRORS:
            self.errors.append(LineError(line, field, message))


def id_key(custom_id: str) -> int:
    """8 bytes of a hash of a custom_id: what the uniqueness check keeps of it."""
    return int.from_bytes(hashlib.blake2b(custom_id.encode(), digest_size=8).digest())


def request_digest(custom_id: str, body: Any) -> int:
    """A request's part of a batch fingerprint (its custom_id and canonical body)."""
    h = hashlib.blake2b(custom_id.encode() + b"\0", digest_size=32)
    h.update(orjson.dumps(body, option=orjson.OPT_SORT_KEYS))
    return int.from_bytes(h.digest(), "big")


def fingerprint_of(endpoint: str, digest_sum: int) -> str:
    """The batch fingerprint from the sum of its requests' digests: line order does not
    change it, a changed custom_id, body, endpoint or default model does."""
    h = hashlib.sha256(endpoint.encode() + b"\0" + digest_sum.to_bytes(32, "big"))
    return f"msum:{h.hexdigest()}"


@dataclass
class Validator:
    """Validates requests one at a time (see the module docstring)."""

    source: str
    default_model: str
    errors: _Collector = field(default_factory=_Collector)
    total: int = 0
    endpoint: str | None = None
    endpoint_line: int = 0
    models: set[str] = field(default_factory=set)
    _ids: set[int] = field(default_factory=set)
    _suspects: list[tuple[str, int]] = field(default_factory=list)  # (custom_id, line)
    _digest_sum: int = 0

    def add(self, number: int, obj: Any) -> QueuedRequest | None:
        """Validate one item (a parsed JSON line); the request, or None when invalid."""
        request = _one(number, obj, self.errors, self.default_model)
        if request is None:
            return None
        req, url = request
        if self.endpoint is None:
            self.endpoint, self.endpoint_line = url, number
        elif url != self.endpoint:
            self.errors.add(
                number,
                "url",
                f"'{url}' differs from '{self.endpoint}' on line {self.endpoint_line}; "
                "a batch targets one endpoint",
            )
            return None
        key = id_key(req.custom_id)
        if key in self._ids:  # a duplicate, or two ids with one hash: confirmed later
            self._suspects.append((req.custom_id, number))
        else:
            self._ids.add(key)
        if len(self.models) < 2:
            self.models.add(str(req.body.get("model", self.default_model)))
        self._digest_sum = (self._digest_sum + request_digest(req.custom_id, req.body)) & _MASK_256
        self.total += 1
        return req

    def finish(
        self, written: Iterable[QueuedRequest], *, empty: str = "nothing to submit"
    ) -> tuple[str, str, str]:
        """After the last item: raise ``InputError`` listing every problem, else return
        (endpoint, model, fingerprint). ``written``: the valid requests again, read only
        to confirm suspected duplicates (their first line)."""
        if self._suspects:
            suspected = {custom_id for custom_id, _line in self._suspects}
            first: dict[str, int] = {}
            for req in written:
                if req.custom_id in suspected and req.custom_id not in first:
                    first[req.custom_id] = req.line
            for custom_id, line in self._suspects:
                if first.get(custom_id, line) < line:  # seen on an earlier line: a duplicate
                    self.errors.add(
                        line,
                        "custom_id",
                        f"duplicate custom_id '{custom_id}' (first on line {first[custom_id]}); "
                        "custom_id must be unique within a batch",
                    )
        if self.total == 0 and not self.errors.count:
            self.errors.add(0, None, f"no requests: {empty}")
        if self.errors.count:
            self.errors.errors.sort(key=lambda e: e.line)
            raise InputError(self.source, self.errors.errors, total=self.errors.count)
        endpoint = self.endpoint or CHAT_ENDPOINT
        model = self.models.pop() if len(self.models) == 1 else "mixed"
        return endpoint, model, fingerprint_of(endpoint, self._digest_sum)


def _too_big(source: str, what: str, setting: str) -> InputError:
    return InputError(source, [LineError(0, None, f"{what}; split it into several batches or "
                                                  f"raise {setting}")])  # fmt: skip


def _lines(
    stream: IO[bytes],
    *,
    source: str,
    max_lines: int,
    max_bytes: int,
    lines_setting: str,
    bytes_setting: str,
) -> Iterator[tuple[int, bytes]]:
    """(line number, bytes) of each line of ``stream``; stops reading, with an
    ``InputError`` naming the setting to raise, as soon as a limit is passed."""
    size = 0
    number = 0
    for raw in stream:
        number += 1
        size += len(raw)
        if size > max_bytes:
            raise _too_big(source, f"more than {max_bytes:,} bytes", bytes_setting)
        if number > max_lines:
            if not raw.strip():  # a trailing blank line does not count
                continue
            raise _too_big(source, f"more than {max_lines:,} lines", lines_setting)
        if number == 1 and raw.startswith(UTF8_BOM):  # Windows tools write one
            raw = raw[len(UTF8_BOM) :]
        yield number, raw


def _scan(
    stream: IO[bytes],
    validator: Validator,
    *,
    max_lines: int,
    max_bytes: int,
    lines_setting: str,
    bytes_setting: str,
) -> Iterator[QueuedRequest]:
    for number, raw in _lines(
        stream,
        source=validator.source,
        max_lines=max_lines,
        max_bytes=max_bytes,
        lines_setting=lines_setting,
        bytes_setting=bytes_setting,
    ):
        raw = raw.rstrip(b"\r\n")
        if not raw.strip():
            continue  # blank lines carry nothing; tolerate them like most JSONL readers
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            validator.errors.add(
                number, None, f"not valid UTF-8 (byte {exc.start + 1} of the line)"
            )
            continue
        try:
            obj = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            validator.errors.add(number, None, f"not valid JSON: {json_problem(exc)}")
            continue
        request = validator.add(number, obj)
        if request is not None:
            yield request


def spool_jsonl(
    stream: IO[bytes],
    *,
    source: str,
    default_model: str,
    max_lines: int = 1_000_000,
    max_bytes: int = 4 * 1024**3,
    lines_setting: str = "PROMPTQ_MAX_LINES",
    bytes_setting: str = "PROMPTQ_MAX_FILE_BYTES",
) -> SpooledBatch:
    """Validate a JSONL stream line by line into a spool file; raise ``InputError``
    listing every bad line (nothing is kept then)."""
    validator = Validator(source=source, default_model=default_model)
    # the spool outlives this function: the SpooledBatch closes (and so deletes) it
    spool = tempfile.TemporaryFile(prefix="promptq-spool-")  # noqa: SIM115
    try:
        for request in _scan(
            stream,
            validator,
            max_lines=max_lines,
            max_bytes=max_bytes,
            lines_setting=lines_setting,
            bytes_setting=bytes_setting,
        ):
            spool.write(request.to_json() + b"\n")
        spool.flush()
        batch = SpooledBatch(spool, total=validator.total, endpoint="", model="",
                             fingerprint="")  # fmt: skip
        endpoint, model, digest = validator.finish(batch, empty="the file is empty")
    except BaseException:
        spool.close()
        raise
    batch.endpoint, batch.model, batch.fingerprint = endpoint, model, digest
    return batch


def parse_jsonl(
    data: bytes,
    *,
    source: str,
    default_model: str,
    max_lines: int = 50_000,
    max_bytes: int = 200 * 1024 * 1024,
    lines_setting: str = "PROMPTQ_MAX_LINES",
    bytes_setting: str = "PROMPTQ_MAX_FILE_BYTES",
) -> ParsedBatch:
    """Validate a whole JSONL file in memory; raise ``InputError`` listing every bad line."""
    import io

    if len(data) > max_bytes:
        raise _too_big(source, f"{len(data):,} bytes, over the {max_bytes:,}-byte limit",
                       bytes_setting)  # fmt: skip
    validator = Validator(source=source, default_model=default_model)
    requests = list(
        _scan(
            io.BytesIO(data),
            validator,
            max_lines=max_lines,
            max_bytes=max_bytes,
            lines_setting=lines_setting,
            bytes_setting=bytes_setting,
        )
    )
    endpoint, model, digest = validator.finish(requests, empty="the file is empty")
    return ParsedBatch(requests=requests, endpoint=endpoint, model=model, fingerprint=digest)


def json_problem(exc: orjson.JSONDecodeError) -> str:
    """orjson's message for one line, with the position as a column of that line."""
    return _JSON_WHERE.sub(lambda m: f" at column {m.group(1)}", str(exc))


def parse_items(
    items: Iterable[str | Mapping[str, Any]], *, default_model: str, source: str = "submit()"
) -> ParsedBatch:
    """Validate Python-API items: a string is a prompt, a mapping is either line form.

    Positions are reported as 1-based "line" numbers, the item's index + 1.
    """
    validator = Validator(source=source, default_model=default_model)
    requests: list[QueuedRequest] = []
    for number, item in enumerate(items, start=1):
        request = validator.add(number, {"prompt": item} if isinstance(item, str) else item)
        if request is not None:
            requests.append(request)
    endpoint, model, digest = validator.finish(requests)
    return ParsedBatch(requests=requests, endpoint=endpoint, model=model, fingerprint=digest)


def parse_one(
    item: Mapping[str, Any], *, default_model: str, source: str = "request"
) -> tuple[QueuedRequest, str]:
    """Validate one item on its own (an HTTP API request through the chat lane): the
    request and its endpoint, as ``parse_items`` would give them, without a batch's
    bookkeeping (uniqueness of custom_ids, fingerprint). Raises ``InputError``."""
    errors = _Collector()
    request = _one(1, dict(item), errors, default_model)
    if request is None:
        raise InputError(source, errors.errors, total=errors.count)
    return request


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
        elif url in ("/v1/embeddings", "/v1/responses", "/v1/moderations") and not body.get(
            "input"
        ):
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
