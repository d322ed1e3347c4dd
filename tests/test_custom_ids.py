"""Hostile custom_ids: a custom_id is only ever a hash field, a stream value and a JSON
string, never part of a Redis key, so no id can reach another key or break a result."""

from __future__ import annotations

import orjson
import pytest
from arq.connections import ArqRedis

from promptq import InputError
from promptq.embedded import local_cluster
from promptq.mock import expected_content
from promptq.producer import parse_items, parse_jsonl
from promptq.producer.parsing import MAX_CUSTOM_ID_CHARS
from promptq.shared import keys
from promptq.shared.settings import Settings

HOSTILE_IDS = [
    "{hostile}",  # a hash tag
    "}{hostile",
    "hostile:batch:{x}:results",  # looks like one of our keys
    "promptq:batch:{hostile}",
    "*",  # glob characters
    "hostile?[a-z]*",
    "hostile\\",
    '"hostile"',
    "%s %d %(hostile)s",
    "$(hostile) `hostile`",
    " hostile with spaces ",
    " ",
    "0",
    "null",
    "ünïcødé 日本語 🚀 hostile",
    "h" * MAX_CUSTOM_ID_CHARS,
    "end",  # the name of the events stream's final field
    "c",  # the name of its per-result field
]


async def test_hostile_custom_ids_flow_end_to_end_untouched(
    redis: ArqRedis, settings: Settings
) -> None:
    items = [{"custom_id": cid, "prompt": f"prompt {i}"} for i, cid in enumerate(HOSTILE_IDS)]
    async with local_cluster(settings, workers=1) as producer:
        batch = await producer.submit(items)
        streamed = [r async for r in batch.as_completed()]
        await batch.wait(timeout_s=30)
        stored = {r.custom_id: r async for r in batch.results()}
        info = await batch.info()
    assert sorted(r.custom_id for r in streamed) == sorted(HOSTILE_IDS)
    assert sorted(stored) == sorted(HOSTILE_IDS)
    for i, cid in enumerate(HOSTILE_IDS):
        body = {"messages": [{"role": "user", "content": f"prompt {i}"}]}
        assert stored[cid].content == expected_content(body), cid  # its own answer
    assert (info.succeeded, info.failed) == (len(HOSTILE_IDS), 0)
    # no key was built from a custom_id: every key of the batch is one of its own
    found = {k.decode() async for k in redis.scan_iter(match="*hostile*")}
    assert found == set(), found
    assert set(keys.batch_keys(batch.id)) >= {
        k.decode() async for k in redis.scan_iter(match=f"promptq:batch:{{{batch.id}}}*")
    }


def test_hostile_custom_ids_in_a_file_parse_as_given() -> None:
    data = b"\n".join(orjson.dumps({"custom_id": cid, "prompt": "hi"}) for cid in HOSTILE_IDS)
    parsed = parse_jsonl(data, source="ids.jsonl", default_model="m")
    assert [r.custom_id for r in parsed.requests] == HOSTILE_IDS


@pytest.mark.parametrize(
    ("custom_id", "problem"),
    [
        ("", "1 to 512 characters"),
        ("h" * (MAX_CUSTOM_ID_CHARS + 1), "1 to 512 characters"),
        ("new\nline", "control characters"),
        ("tab\there", "control characters"),
        ("nul\x00", "control characters"),
        ("zero\u200bwidth", "control characters"),
        ("right-to-left \u202e override", "control characters"),
        ("escape\x1b[31m", "control characters"),
        (42, "must be a string"),
        (["a"], "must be a string"),
    ],
)
def test_custom_ids_that_could_break_a_line_or_a_terminal_are_rejected(
    custom_id: object, problem: str
) -> None:
    with pytest.raises(InputError) as caught:
        parse_items([{"custom_id": custom_id, "prompt": "hi"}], default_model="m")
    [error] = caught.value.errors
    assert (error.line, error.field) == (1, "custom_id")
    assert problem in error.message
