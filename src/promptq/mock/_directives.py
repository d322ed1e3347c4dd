"""Request text helpers for the mock upstream: message text, expected content, directives.

A request scripts its own fate by embedding ``[[mock key=value ...]]`` anywhere in the
text of any message, e.g. ``"hello [[mock status=500 fail=2]]"``. See :class:`Directives`
for the keys. Everything here is pure (no I/O) so the server and tests share it.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from promptq.mock._flavours import KINDS

__all__ = [
    "DIRECTIVE_MARKER",
    "ECHO_PREFIX",
    "MAX_ECHO_CHARS",
    "DirectiveError",
    "Directives",
    "expected_content",
    "message_text",
    "parse_directives",
]

DIRECTIVE_MARKER = "[[mock"
"""Substring that must occur for directives to be parsed at all (cheap pre-check)."""

ECHO_PREFIX = "echo: "
"""Prefix of every successful assistant content."""

MAX_ECHO_CHARS = 200
"""How many characters (not tokens) of the last user message are echoed back."""

# Compiled once at import: the hot path must not build regexes per request.
# Values cannot contain "]" which keeps the pattern simple and linear.
_DIRECTIVE_RE = re.compile(r"\[\[mock(?P<args>(?:\s[^\]]*)?)\]\]")

#: what ``batch=`` may ask of the mock's Batch API
BATCH_FATES = ("fail", "expire", "hold")

_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})


class DirectiveError(ValueError):
    """A ``[[mock ...]]`` directive is malformed (unknown key, bad value, bad combination)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Directives:
    """The per-request script parsed from ``[[mock ...]]`` markers.

    Every field defaults to "not set". Keys (``key=value``, space separated):

    * ``status=N`` (int, 400..599): answer with that HTTP status and an OpenAI error body.
    * ``quota=1``: answer 429 ``insufficient_quota`` (implies ``status=429``).
    * ``fail=K`` (int >= 0): only the first K attempts of the same body get the fault.
    * ``retry_after=S`` (seconds, float): ``retry-after: S`` header on the error response.
    * ``retry_after_ms=M`` (milliseconds, float): ``retry-after-ms: M`` header.
    * ``hang=1``: never answer; ``malformed=1``: 200 with truncated JSON;
      ``drop=1``: close the connection without a response.
    * ``latency_ms=L`` (milliseconds, float): replaces the configured latency and jitter.
    * ``error=KIND``: the failure ``KIND`` (``context``, ``parse``, ``busy``, ``loading``,
      ...; :data:`promptq.mock._flavours.KINDS`) in the body the mock's flavour's server
      gives it (``--flavour``; e.g. llama.cpp's 503 ``Loading model`` for ``loading``).
    * ``chunks=N``, ``interval_ms=M`` (a streamed answer): N pieces of content, M ms
      apart; ``cut=K``: the connection drops after K events (a failure mid-stream);
      ``error_at=K``: after K events the server reports a failure in the stream, in the
      shape the mock's flavour's server uses (``mock._flavours.stream_failure``).
    * ``batch=fail|expire|hold`` (the mock's Batch API only; a realtime request with it
      is answered as usual): the provider batch holding the line fails validation, the
      line expires (the batch ends ``expired``), or the line is never run (the batch
      stays ``in_progress`` until cancelled).

    When several faults are set the first of drop, hang, malformed, error, status/quota
    wins.
    """

    status: int | None = None
    quota: bool = False
    fail: int | None = None
    retry_after: float | None = None
    retry_after_ms: float | None = None
    hang: bool = False
    malformed: bool = False
    drop: bool = False
    latency_ms: float | None = None
    batch: str | None = None
    error: str | None = None
    cut: int | None = None
    error_at: int | None = None
    chunks: int | None = None
    interval_ms: float | None = None

    @property
    def has_fault(self) -> bool:
        """True if the directives ask for any non-success outcome."""
        return (
            self.status is not None
            or self.quota
            or self.hang
            or self.malformed
            or self.drop
            or self.error is not None
        )


def message_text(content: Any) -> str:
    """Text of one message ``content``: a string, or the ``text`` parts of a parts list.

    Parts are joined with ``"\\n"``; non-text parts (images, audio) and anything that is
    neither a string nor a list yield ``""`` so odd input never raises.
    """
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts: list[str] = []
        for part in content:
            if isinstance(part, str):
                texts.append(part)
            elif isinstance(part, Mapping):
                text = part.get("text")
                if isinstance(text, str) and part.get("type", "text") == "text":
                    texts.append(text)
        return "\n".join(texts)
    return ""


def _messages(body: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    messages = body.get("messages")
    if not isinstance(messages, list):
        return []
    return [m for m in messages if isinstance(m, Mapping)]


def expected_content(body: Mapping[str, Any]) -> str:
    """The exact assistant content the mock returns for a successful request ``body``.

    ``"echo: "`` + the first 200 characters of the text of the last ``user`` message
    (the last message of any role if there is no user message; ``""`` if none). The text
    includes any ``[[mock ...]]`` directive verbatim. This is the single definition: the
    server calls it, so tests can match every result to the request that produced it.
    """
    messages = _messages(body)
    chosen: Mapping[str, Any] | None = None
    for message in reversed(messages):
        if message.get("role") == "user":
            chosen = message
            break
    if chosen is None and messages:
        chosen = messages[-1]
    text = message_text(chosen.get("content")) if chosen is not None else ""
    return ECHO_PREFIX + text[:MAX_ECHO_CHARS]


def estimate_tokens(chars: int) -> int:
    """Deterministic token estimate: ``ceil(chars / 4)``, at least 1."""
    return max(1, math.ceil(chars / 4))


def prompt_chars(messages: Iterable[Mapping[str, Any]]) -> int:
    """Total characters of message text over ``messages`` (basis of ``prompt_tokens``)."""
    return sum(len(message_text(m.get("content"))) for m in messages)


def _flag(key: str, value: str) -> bool:
    lowered = value.lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise DirectiveError(f"mock directive {key}={value!r}: expected 1/0/true/false")


def _number(key: str, value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise DirectiveError(f"mock directive {key}={value!r}: expected a number") from None
    if not math.isfinite(number) or number < 0:
        raise DirectiveError(f"mock directive {key}={value!r}: expected a finite number >= 0")
    return number


def _integer(key: str, value: str, low: int, high: int) -> int:
    try:
        number = int(value)
    except ValueError:
        raise DirectiveError(f"mock directive {key}={value!r}: expected an integer") from None
    if not low <= number <= high:
        raise DirectiveError(f"mock directive {key}={value}: expected {low}..{high}")
    return number


def _apply(fields: dict[str, Any], key: str, value: str) -> None:
    if key == "status":
        fields[key] = _integer(key, value, 400, 599)
    elif key == "fail":
        fields[key] = _integer(key, value, 0, 1_000_000)
    elif key in ("quota", "hang", "malformed", "drop"):
        fields[key] = _flag(key, value)
    elif key in ("cut", "chunks", "error_at"):
        fields[key] = _integer(key, value, 1 if key == "chunks" else 0, 100_000)
    elif key in ("retry_after", "retry_after_ms", "latency_ms", "interval_ms"):
        fields[key] = _number(key, value)
    elif key == "error":
        if value not in KINDS:
            raise DirectiveError(
                f"mock directive error={value!r}: expected one of {', '.join(KINDS)}"
            )
        fields[key] = value
    elif key == "batch":
        if value not in BATCH_FATES:
            raise DirectiveError(
                f"mock directive batch={value!r}: expected one of {', '.join(BATCH_FATES)}"
            )
        fields[key] = value
    else:
        raise DirectiveError(f"unknown mock directive key {key!r}")


def parse_directives(messages: Iterable[Any]) -> Directives | None:
    """Parse every ``[[mock ...]]`` in the text of ``messages``; ``None`` if there is none.

    Markers are merged in message order, later keys overriding earlier ones. An empty
    ``[[mock]]`` yields an empty :class:`Directives`, which still opts the request out of
    the random fault rates. Raises :class:`DirectiveError` for malformed markers.
    """
    found = False
    fields: dict[str, Any] = {}
    for message in messages:
        if not isinstance(message, Mapping):
            continue
        text = message_text(message.get("content"))
        if DIRECTIVE_MARKER not in text:
            continue
        for match in _DIRECTIVE_RE.finditer(text):
            found = True
            for token in match.group("args").split():
                key, sep, value = token.partition("=")
                if not sep or not value:
                    raise DirectiveError(f"mock directive {token!r}: expected key=value")
                _apply(fields, key, value)
    if not found:
        return None
    directives = Directives(**fields)
    if directives.fail is not None and not directives.has_fault:
        raise DirectiveError(
            "mock directive fail=K needs a fault: status=, error=, quota=1, hang=1, malformed=1"
            " or drop=1"
        )
    return directives
