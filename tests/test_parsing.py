"""Input validation: both line forms, and every kind of bad input named by line and field."""

from __future__ import annotations

import orjson
import pytest

from promptq.producer import parse_items, parse_jsonl
from promptq.shared.errors import InputError


def jsonl(*lines: object) -> bytes:
    return b"\n".join(x if isinstance(x, bytes) else orjson.dumps(x) for x in lines) + b"\n"


def parse(data: bytes, **kw: int):  # type: ignore[no-untyped-def]
    return parse_jsonl(data, source="in.jsonl", default_model="m0", **kw)


def problems(data: bytes, **kw: int) -> list[tuple[int, str | None, str]]:
    with pytest.raises(InputError) as info:
        parse(data, **kw)
    return [(e.line, e.field, e.message) for e in info.value.errors]


def test_short_form_gets_default_ids_model_and_messages() -> None:
    parsed = parse(jsonl({"prompt": "hi"}, {"prompt": "yo", "custom_id": "q2", "system": "be"}))
    first, second = parsed.requests
    assert first.custom_id == "line-1"
    assert first.body == {"model": "m0", "messages": [{"role": "user", "content": "hi"}]}
    assert second.custom_id == "q2"
    assert second.body["messages"][0] == {"role": "system", "content": "be"}
    assert parsed.endpoint == "/v1/chat/completions"
    assert parsed.model == "m0"


def test_batch_form_is_kept_as_is() -> None:
    body = {"model": "gpt-x", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}
    line = {"custom_id": "a", "method": "POST", "url": "/v1/chat/completions", "body": body}
    parsed = parse(jsonl(line))
    assert parsed.requests[0].body == body
    assert parsed.model == "gpt-x"


def test_blank_lines_and_crlf_are_tolerated_and_line_numbers_stay_true() -> None:
    data = b'{"prompt": "a"}\r\n\n{"prompt": "b"}\r\n'
    parsed = parse(data)
    assert [r.custom_id for r in parsed.requests] == ["line-1", "line-3"]


def test_every_bad_line_is_listed_with_line_and_field() -> None:
    data = jsonl(
        {"prompt": "ok"},
        b"{not json",
        {"prompt": ""},
        {"prompt": "dup", "custom_id": "x"},
        {"prompt": "dup2", "custom_id": "x"},
        {"custom_id": "b", "method": "POST", "url": "/v1/chat/completions"},
        ["a list"],
        {"custom_id": "c", "method": "GET", "url": "/v1/nope", "body": {"messages": []}},
        {"promt": "typo"},
        {"prompt": "p", "custom_id": 7},
    )
    found = problems(data)
    by_line = {(line, field) for line, field, _ in found}
    assert (2, None) in by_line  # malformed JSON
    assert (3, "prompt") in by_line  # empty prompt
    assert (5, "custom_id") in by_line  # duplicate
    assert (6, "body") in by_line  # missing body
    assert (7, None) in by_line  # not an object
    assert {(8, "method"), (8, "url")} <= by_line
    assert (9, "prompt") in by_line  # missing prompt
    assert (10, "custom_id") in by_line
    dup = next(m for line, f, m in found if line == 5)
    assert "first on line 4" in dup


def test_invalid_utf8_is_reported_on_its_line() -> None:
    found = problems(b'{"prompt": "ok"}\n{"prompt": "\xff\xfe"}\n')
    assert found[0][0] == 2
    assert "UTF-8" in found[0][2]


def test_empty_file_is_rejected() -> None:
    assert "empty" in problems(b"")[0][2]
    assert "empty" in problems(b"\n\n")[0][2]


def test_limits_say_how_to_fix() -> None:
    data = jsonl(*({"prompt": str(i)} for i in range(5)))
    assert "split" in problems(data, max_lines=3)[0][2]
    assert "split" in problems(data, max_bytes=10)[0][2]


def test_mixed_endpoints_are_rejected() -> None:
    emb = {"custom_id": "e", "method": "POST", "url": "/v1/embeddings", "body": {"input": "x"}}
    found = problems(jsonl({"prompt": "a"}, emb))
    assert found[0][:2] == (2, "url")


def test_messages_are_checked() -> None:
    line = {
        "custom_id": "a",
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {"messages": [{"content": "x"}, "str", {"role": "user", "content": " "}]},
    }
    fields = {f for _, f, _ in problems(jsonl(line))}
    assert {"body.messages[0].role", "body.messages[1]", "body.messages[2].content"} <= fields


def test_unknown_short_form_field_is_named() -> None:
    found = problems(jsonl({"prompt": "a", "temprature": 1}))
    assert found[0][1] == "temprature"


def test_error_report_is_bounded_but_counts_everything() -> None:
    data = b"x\n" * 5000
    with pytest.raises(InputError) as info:
        parse(data)
    assert info.value.total == 5000
    assert len(info.value.errors) == 1000
    assert "and 4980 more" in info.value.render(limit=20)


def test_parse_items_accepts_strings_and_dicts() -> None:
    parsed = parse_items(["a", {"prompt": "b", "custom_id": "B"}], default_model="m")
    assert [r.custom_id for r in parsed.requests] == ["line-1", "B"]
    with pytest.raises(InputError):
        parse_items([], default_model="m")


@pytest.mark.parametrize(
    "item",
    [
        {"custom_id": "a", "method": "POST", "url": "/v1/chat/completions",
         "body": {"messages": [{"role": "user", "content": "hi"}], "temperature": 0}},
        {"custom_id": "a", "method": "POST", "url": "/v1/embeddings", "body": {"input": "x"}},
        {"custom_id": "a", "method": "POST", "url": "/v1/chat/completions", "body": {}},
        {"custom_id": "a", "method": "GET", "url": "/v1/nope", "body": {"model": ""}},
        {"custom_id": "a", "method": "POST", "url": "/v1/responses", "body": {"input": ""}},
    ],
)  # fmt: skip
def test_parse_one_validates_as_parse_items_does(item: dict[str, object]) -> None:
    """The chat lane's single-request path: the same request, or the same errors."""
    from promptq.producer.parsing import parse_one

    def outcome(parse: object) -> object:
        try:
            return parse()  # type: ignore[operator]
        except InputError as exc:
            return [(e.line, e.field, e.message) for e in exc.errors]

    batch = outcome(lambda: parse_items([item], default_model="m0").requests[0])
    one = outcome(lambda: parse_one(item, default_model="m0"))
    assert one == (batch, item["url"]) or one == batch
    assert isinstance(one, tuple) == (not isinstance(batch, list))
