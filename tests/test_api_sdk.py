"""The HTTP API with the official ``openai`` SDK as the client, against a real
``promptq serve`` process, real worker processes and the mock upstream."""

from __future__ import annotations

import json
from typing import Any

import openai
import pytest
from arq.connections import ArqRedis
from openai import AsyncOpenAI
from openai.types import Batch

from promptq.mock import MockServer, expected_content
from promptq.shared import keys

from .conftest import WorkerProcs, chat_keys, wait_until

pytestmark = pytest.mark.e2e

CHAT = "/v1/chat/completions"


def request_line(custom_id: str, content: str) -> dict[str, Any]:
    body = {"model": "mock-gpt", "messages": [{"role": "user", "content": content}]}
    return {"custom_id": custom_id, "method": "POST", "url": CHAT, "body": body}


def jsonl(lines: list[dict[str, Any]]) -> bytes:
    return b"".join(json.dumps(x).encode() + b"\n" for x in lines)


async def until_status(client: AsyncOpenAI, batch_id: str, *statuses: str) -> Batch:
    async def reached() -> Batch | None:
        batch = await client.batches.retrieve(batch_id)
        return batch if batch.status in statuses else None

    found: Batch = await wait_until(reached, timeout_s=30, what=f"batch in {statuses}")
    return found


async def test_sdk_batch_upload_create_poll_and_download(
    redis: ArqRedis, client: AsyncOpenAI, worker_procs: WorkerProcs
) -> None:
    worker_procs.start(1)
    lines = [
        request_line(f"q{i}", f"question {i}" + (" [[mock status=400]]" if i in (4, 17) else ""))
        for i in range(30)
    ]
    data = jsonl(lines)
    uploaded = await client.files.create(file=("prompts.jsonl", data), purpose="batch")
    assert (uploaded.bytes, uploaded.filename, uploaded.purpose) == (
        len(data),
        "prompts.jsonl",
        "batch",
    )
    assert await client.files.retrieve(uploaded.id) == uploaded
    assert (await client.files.content(uploaded.id)).content == data

    await worker_procs.wait_ready(redis, 1)
    created = await client.batches.create(
        input_file_id=uploaded.id,
        endpoint=CHAT,
        completion_window="24h",
        metadata={"job": "nightly"},
    )
    assert created.status == "validating"
    assert (created.input_file_id, created.metadata) == (uploaded.id, {"job": "nightly"})
    batch = await until_status(client, created.id, "completed", "failed")

    assert batch.status == "completed"
    assert batch.request_counts is not None
    counts = batch.request_counts
    assert (counts.total, counts.completed, counts.failed) == (30, 28, 2)
    assert batch.usage is not None
    assert batch.usage.input_tokens > 0
    assert batch.usage.total_tokens == batch.usage.input_tokens + batch.usage.output_tokens
    assert batch.in_progress_at is not None
    assert batch.completed_at is not None
    assert created.created_at <= batch.in_progress_at <= batch.completed_at
    assert batch.output_file_id is not None
    assert batch.error_file_id is not None

    output = (await client.files.content(batch.output_file_id)).text
    errors = (await client.files.content(batch.error_file_id)).text
    ok = [json.loads(x) for x in output.splitlines()]
    failed = [json.loads(x) for x in errors.splitlines()]
    by_id = {x["custom_id"]: x for x in lines}
    for result in ok:
        body = result["response"]["body"]
        assert body["choices"][0]["message"]["content"] == expected_content(
            by_id[result["custom_id"]]["body"]
        )
    assert sorted(r["custom_id"] for r in failed) == ["q17", "q4"]
    assert all(r["response"]["status_code"] == 400 for r in failed)
    # exactly one line per custom_id across the two files
    assert sorted(r["custom_id"] for r in ok + failed) == sorted(by_id)
    meta = await client.files.retrieve(batch.output_file_id)
    assert (meta.bytes, meta.purpose) == (len(output.encode()), "batch_output")


async def test_sdk_lists_batches_newest_first_page_by_page(client: AsyncOpenAI) -> None:
    uploaded = await client.files.create(
        file=("one.jsonl", jsonl([request_line("a", "hi")])), purpose="batch"
    )
    ids = []
    for _ in range(3):  # no workers: they stay in progress, which is all listing needs
        batch = await client.batches.create(
            input_file_id=uploaded.id, endpoint=CHAT, completion_window="24h"
        )
        ids.append(batch.id)
    for batch_id in ids:
        await until_status(client, batch_id, "in_progress")
    newest_first = ids[::-1]

    first = await client.batches.list(limit=2)
    assert [b.id for b in first.data] == newest_first[:2]
    assert first.has_more is True
    second = await client.batches.list(limit=2, after=first.data[-1].id)
    assert [b.id for b in second.data] == newest_first[2:]
    assert second.has_more is False
    assert [b.id async for b in client.batches.list(limit=2)] == newest_first  # auto-paging


async def test_sdk_lists_and_deletes_files(redis: ArqRedis, client: AsyncOpenAI) -> None:
    ids = []
    for name in ("a", "b", "c"):
        data = jsonl([request_line(name, "hi")])
        ids.append((await client.files.create(file=(f"{name}.jsonl", data), purpose="batch")).id)
    newest_first = ids[::-1]

    first = await client.files.list(limit=2)
    assert [f.id for f in first.data] == newest_first[:2]
    assert first.has_more is True
    assert [f.filename for f in first.data] == ["c.jsonl", "b.jsonl"]
    assert [f.id async for f in client.files.list(limit=2)] == newest_first  # auto-paging
    assert [f.id async for f in client.files.list(order="asc")] == ids
    assert [f.id async for f in client.files.list(purpose="fine-tune")] == []

    deleted = await client.files.delete(ids[1])
    assert (deleted.id, deleted.deleted) == (ids[1], True)
    assert await redis.exists(keys.file(ids[1]), keys.file_content(ids[1])) == 0
    with pytest.raises(openai.NotFoundError):
        await client.files.retrieve(ids[1])
    with pytest.raises(openai.NotFoundError):
        await client.files.delete(ids[1])
    assert [f.id async for f in client.files.list()] == [ids[2], ids[0]]


async def test_sdk_cancel_keeps_finished_results_and_reports_the_rest(
    redis: ArqRedis, client: AsyncOpenAI, worker_procs: WorkerProcs
) -> None:
    worker_procs.start(1)  # 16 slots, 100 ms a request: 200 requests take > 1 s
    lines = [request_line(f"r{i}", f"slow {i} [[mock latency_ms=100]]") for i in range(200)]
    uploaded = await client.files.create(file=("slow.jsonl", jsonl(lines)), purpose="batch")
    await worker_procs.wait_ready(redis, 1)
    batch = await client.batches.create(
        input_file_id=uploaded.id, endpoint=CHAT, completion_window="24h"
    )

    async def some_done() -> bool:
        counts = (await client.batches.retrieve(batch.id)).request_counts
        return counts is not None and counts.completed >= 16

    await wait_until(some_done, timeout_s=20, what="the first results")
    cancelling = await client.batches.cancel(batch.id)
    assert cancelling.status in ("cancelling", "cancelled")
    assert cancelling.cancelling_at is not None
    done = await until_status(client, batch.id, "cancelled")

    assert done.cancelled_at is not None
    assert done.completed_at is None
    assert done.request_counts is not None
    counts = done.request_counts
    assert counts.total == 200
    assert counts.completed >= 16
    assert counts.failed > 0  # never sent
    assert counts.completed + counts.failed == 200
    assert done.output_file_id is not None
    assert done.error_file_id is not None
    ok = (await client.files.content(done.output_file_id)).text.splitlines()
    cancelled = [
        json.loads(x) for x in (await client.files.content(done.error_file_id)).text.splitlines()
    ]
    assert len(ok) == counts.completed
    assert {r["error"]["code"] for r in cancelled} == {"batch_cancelled"}
    ids = [json.loads(x)["custom_id"] for x in ok] + [r["custom_id"] for r in cancelled]
    assert sorted(ids) == sorted(x["custom_id"] for x in lines)


async def test_sdk_invalid_input_file_ends_failed_naming_the_lines(client: AsyncOpenAI) -> None:
    data = jsonl([request_line("a", "fine")]) + b'{"custom_id": "b", "method": "POST"}\n{oops\n'
    uploaded = await client.files.create(file=("bad.jsonl", data), purpose="batch")
    created = await client.batches.create(
        input_file_id=uploaded.id, endpoint=CHAT, completion_window="24h"
    )
    assert created.status == "validating"
    batch = await until_status(client, created.id, "failed")
    assert batch.failed_at is not None
    assert batch.errors is not None
    assert batch.errors.data is not None
    problems = [(e.line, e.param) for e in batch.errors.data]
    assert (2, "url") in problems
    assert (2, "body") in problems
    assert (3, None) in problems
    assert all(e.message and e.message.startswith(f"line {e.line}") for e in batch.errors.data)
    assert batch.output_file_id is None


async def test_sdk_chat_completion_goes_through_the_queue(
    redis: ArqRedis,
    base_url: str,
    client: AsyncOpenAI,
    worker_procs: WorkerProcs,
    mock: MockServer,
) -> None:
    await worker_procs.launch(redis, 1)
    messages: Any = [{"role": "user", "content": "what is promptq?"}]
    raw = await client.chat.completions.with_raw_response.create(
        model="mock-gpt", messages=messages
    )
    answer = raw.parse()
    assert answer.choices[0].message.content == expected_content({"messages": messages})
    assert mock.stats.requests == 1  # sent by a worker, not by the API
    assert len(raw.headers["x-promptq-request-id"]) == 32
    # the chat lane makes no batch and leaves nothing behind once answered but the
    # serving replica's push counter (it goes when the replica stops)
    assert [k async for k in redis.scan_iter(match="promptq:batch:*")] == []
    assert await redis.zcard(keys.BATCHES) == 0

    async def only_the_counter() -> bool:
        left = await chat_keys(redis)
        return len(left) == 1 and left[0].startswith(b"promptq:{chat}:pushed:")

    await wait_until(only_the_counter, what="the chat lane's keys to go")

    # the upstream's own error comes back with its status
    bad: Any = [{"role": "user", "content": "x [[mock status=400]]"}]
    with pytest.raises(openai.BadRequestError) as refused:
        await client.chat.completions.create(model="mock-gpt", messages=bad)
    assert refused.value.status_code == 400
    async with AsyncOpenAI(base_url=base_url, api_key="wrong", max_retries=0) as intruder:
        with pytest.raises(openai.AuthenticationError):
            await intruder.chat.completions.create(model="mock-gpt", messages=messages)
        with pytest.raises(openai.AuthenticationError):
            await intruder.batches.list()
    assert mock.stats.requests == 2
