"""Fuzzing the input parser: whatever it is fed, it returns a valid batch or an
``InputError`` that points at lines of the input, and never raises anything else."""

from __future__ import annotations

from typing import Any

import orjson
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from promptq import InputError
from promptq.producer import ParsedBatch, parse_items, parse_jsonl
from promptq.producer.parsing import MAX_CUSTOM_ID_CHARS
from promptq.shared.models import CHAT_ENDPOINT

FUZZ = settings(
    max_examples=250,
    deadline=None,  # shared CI machines are slow at times; this is not a timing test
    database=None,  # leave no .hypothesis/ behind
    suppress_health_check=[HealthCheck.too_slow],
)

#: keys the parser knows (so generated lines get past the first checks), and some noise
KNOWN_KEYS = [
    "custom_id", "prompt", "system", "model", "max_tokens", "temperature", "stop", "seed",
    "response_format", "method", "url", "body", "messages", "role", "content", "input",
    "stream", "tool_calls",
]  # fmt: skip

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20)
    | st.sampled_from(["POST", "GET", CHAT_ENDPOINT, "/v1/embeddings", "/v1/completions", ""])
    | st.sampled_from(["user", "system", "assistant", " ", "x" * (MAX_CUSTOM_ID_CHARS + 1)])
)
json_values = st.recursive(
    json_scalars,
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(st.sampled_from(KNOWN_KEYS) | st.text(max_size=8), children, max_size=5)
    ),
    max_leaves=12,
)
json_objects = st.dictionaries(
    st.sampled_from(KNOWN_KEYS) | st.text(max_size=8), json_values, max_size=6
)
# Lines shaped like the real thing, with random values, so that valid batches come up too.
short_lines = st.fixed_dictionaries(
    {"prompt": st.text(min_size=1, max_size=30)},
    optional={"custom_id": json_scalars, "system": json_values, "model": json_values},
)
batch_lines = st.fixed_dictionaries(
    {
        "custom_id": st.text(max_size=12) | json_scalars,
        "method": st.just("POST") | json_scalars,
        "url": st.just(CHAT_ENDPOINT) | json_scalars,
        "body": st.fixed_dictionaries(
            {
                "messages": st.lists(
                    st.fixed_dictionaries(
                        {"role": st.just("user") | json_scalars, "content": json_values}
                    ),
                    max_size=3,
                )
                | json_values
            },
            optional={"model": json_values, "stream": json_values},
        )
        | json_values,
    }
)
lines = json_objects | short_lines | batch_lines | json_values


def parse(data: bytes) -> ParsedBatch | InputError:
    try:
        return parse_jsonl(data, source="fuzz.jsonl", default_model="m", max_lines=50)
    except InputError as exc:  # the one exception it may raise
        return exc


def check(data: bytes) -> ParsedBatch | InputError:
    """Parse ``data``; check whichever outcome against the contract."""
    outcome = parse(data)
    if isinstance(outcome, ParsedBatch):
        check_valid(outcome)
        return outcome
    n_lines = len(data.split(b"\n"))
    assert outcome.errors
    assert outcome.total >= len(outcome.errors)
    for error in outcome.errors:
        assert 0 <= error.line <= n_lines, (error, n_lines)
        assert error.message
    assert outcome.render()  # renders without raising
    return outcome


def check_valid(parsed: ParsedBatch) -> None:
    assert parsed.requests
    ids = [r.custom_id for r in parsed.requests]
    assert len(set(ids)) == len(ids)
    for request in parsed.requests:
        assert 1 <= len(request.custom_id) <= MAX_CUSTOM_ID_CHARS
        assert request.custom_id.isprintable()
        assert isinstance(request.body, dict)
        assert isinstance(request.body.get("model"), str)
        assert request.body["model"]
        if parsed.endpoint == CHAT_ENDPOINT:
            messages = request.body.get("messages")
            assert isinstance(messages, list)
            assert messages
            assert all(isinstance(m, dict) for m in messages)
        assert orjson.loads(request.to_json())["body"] == request.body  # storable as is


@FUZZ
@given(st.binary(max_size=400))
def test_any_bytes_parse_or_fail_with_line_numbers(data: bytes) -> None:
    check(data)


@FUZZ
@given(st.lists(st.binary(max_size=60), max_size=8))
def test_any_bytes_in_lines_parse_or_fail_with_line_numbers(chunks: list[bytes]) -> None:
    check(b"\n".join(chunks))


@FUZZ
@given(st.lists(lines, min_size=0, max_size=8), st.sampled_from([b"\n", b"\r\n"]))
def test_generated_json_lines_parse_or_fail_with_line_numbers(
    objects: list[Any], newline: bytes
) -> None:
    data = newline.join(orjson.dumps(obj) for obj in objects)
    outcome = check(data)
    if isinstance(outcome, ParsedBatch):
        assert len(outcome.requests) == len(objects)  # nothing dropped silently


# Lines that are valid but for the odd detail (an empty prompt, a duplicate or
# unprintable custom_id): most files parse, and what parses must keep every prompt as is.
near_valid = st.fixed_dictionaries(
    {"prompt": st.text(min_size=1, max_size=40)},
    optional={"custom_id": st.text(min_size=1, max_size=3)},
)


@FUZZ
@given(st.lists(near_valid, min_size=1, max_size=8))
def test_near_valid_lines_keep_every_prompt_and_id(objects: list[dict[str, str]]) -> None:
    outcome = check(b"\n".join(orjson.dumps(obj) for obj in objects))
    if isinstance(outcome, InputError):
        return
    for number, (obj, request) in enumerate(zip(objects, outcome.requests, strict=True), 1):
        assert request.custom_id == obj.get("custom_id", f"line-{number}")
        assert request.body["messages"] == [{"role": "user", "content": obj["prompt"]}]
        assert request.line == number


@FUZZ
@given(st.lists(short_lines | batch_lines | st.text(max_size=20) | json_values, max_size=8))
def test_python_api_items_parse_or_fail_with_positions(items: list[Any]) -> None:
    outcome: ParsedBatch | InputError
    try:
        outcome = parse_items(items, default_model="m")
    except InputError as exc:
        outcome = exc
    if isinstance(outcome, ParsedBatch):
        check_valid(outcome)
        assert len(outcome.requests) == len(items)
    else:
        assert outcome.errors
        assert all(0 <= e.line <= len(items) for e in outcome.errors)
