"""The HTTP API's edges with aiohttp's test client: bad uploads, unknown ids, missing
fields, auth, limits, metrics. Every error must come in the OpenAI shape, never as a 500.
(The happy paths run with the official SDK against a real server in test_api_sdk.py.)"""

from __future__ import annotations

import asyncio
import json
import sys
import threading
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestClient, TestServer
from arq.connections import ArqRedis
from prometheus_client.parser import text_string_to_metric_families
from pydantic import SecretStr
from redis.exceptions import ConnectionError as RedisConnectionError

import promptq.api.batches
import promptq.api.intake
from promptq import Producer, Status
from promptq.api import create_app
from promptq.api.auth import is_loopback
from promptq.api.state import STORE, TASKS
from promptq.embedded import local_cluster
from promptq.shared import keys
from promptq.shared.settings import Settings

from .conftest import wait_until, worker_env

TOKEN = "test-token"
CHAT = "/v1/chat/completions"


def line(custom_id: str, content: str = "hello", url: str = CHAT) -> str:
    body = {"model": "mock-gpt", "messages": [{"role": "user", "content": content}]}
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": url, "body": body})


def form(
    data: bytes, *, purpose: str | None = "batch", filename: str = "in.jsonl"
) -> aiohttp.FormData:
    fd = aiohttp.FormData()
    if purpose is not None:
        fd.add_field("purpose", purpose)
    fd.add_field("file", data, filename=filename, content_type="application/jsonl")
    return fd


def api_settings(settings: Settings, **update: Any) -> Settings:
    return settings.model_copy(update={"api_token": SecretStr(TOKEN), **update})


Client = TestClient  # of the API app


@pytest.fixture
async def api(redis: ArqRedis, settings: Settings) -> AsyncIterator[Client]:
    """The app on a test server (real Redis), limits shrunk to 4 KiB and 5 lines."""
    app = create_app(
        api_settings(
            settings, api_max_file_bytes=4096, api_max_lines=5, webhook_hosts="hooks.example.com"
        )
    )
    async with TestClient(TestServer(app), headers={"Authorization": f"Bearer {TOKEN}"}) as client:
        yield client


async def error_of(resp: aiohttp.ClientResponse, status: int) -> dict[str, Any]:
    """The OpenAI-shaped error of ``resp``, after checking its status."""
    text = await resp.text()
    assert resp.status == status, text
    assert "Traceback" not in text
    body = json.loads(text)
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["message"]
    return dict(body["error"])


async def upload(api: Client, data: bytes) -> str:
    resp = await api.post("/v1/files", data=form(data))
    assert resp.status == 200, await resp.text()
    return str((await resp.json())["id"])


async def create(api: Client, file_id: str, **extra: Any) -> dict[str, Any]:
    body = {"input_file_id": file_id, "endpoint": CHAT, "completion_window": "24h", **extra}
    resp = await api.post("/v1/batches", json=body)
    assert resp.status == 200, await resp.text()
    return dict(await resp.json())


async def settled(api: Client, batch_id: str) -> dict[str, Any]:
    async def done() -> dict[str, Any] | None:
        batch = await (await api.get(f"/v1/batches/{batch_id}")).json()
        return None if batch["status"] == "validating" else dict(batch)

    result: dict[str, Any] = await wait_until(done, what=f"batch {batch_id} validated")
    return result


# -- uploads -----------------------------------------------------------------------------


async def test_upload_stores_the_file_in_redis_whatever_the_field_order(api: Client) -> None:
    data = f"{line('a')}\n{line('b')}\n".encode()
    fd = aiohttp.FormData()
    fd.add_field("file", data, filename="x.jsonl")  # file before purpose
    fd.add_field("purpose", "batch")
    resp = await api.post("/v1/files", data=fd)
    assert resp.status == 200, await resp.text()
    obj = await resp.json()
    assert obj["object"] == "file"
    assert (obj["bytes"], obj["filename"], obj["purpose"]) == (len(data), "x.jsonl", "batch")
    assert obj["expires_at"] > obj["created_at"] > 0
    meta = await (await api.get(f"/v1/files/{obj['id']}")).json()
    assert meta == obj
    content = await api.get(f"/v1/files/{obj['id']}/content")
    assert await content.read() == data
    # stateless: the bytes live in Redis, under promptq: keys
    assert await api.app[STORE].redis.get(keys.file_content(obj["id"])) == data


@pytest.mark.parametrize(
    ("make", "param", "code"),
    [
        (lambda: form(b"x\n", purpose="fine-tune"), "purpose", "invalid_purpose"),
        (lambda: form(b"x\n", purpose=None), "purpose", None),
        (lambda: aiohttp.FormData({"purpose": "batch"}, default_to_multipart=True), "file", None),
        (lambda: form(b""), "file", "empty_file"),
        (lambda: form(b"a\nb\nc\nd\ne\nf\n"), "file", "too_many_lines"),
    ],
    ids=["wrong-purpose", "no-purpose", "no-file", "empty-file", "too-many-lines"],
)
async def test_upload_rejects_bad_forms_with_the_field_to_fix(
    api: Client, make: Any, param: str, code: str | None
) -> None:
    error = await error_of(await api.post("/v1/files", data=make()), 400)
    assert error["param"] == param
    if code:
        assert error["code"] == code


async def test_upload_rejects_malformed_multipart_and_non_multipart(api: Client) -> None:
    broken = await api.post(
        "/v1/files",
        data=b"this is not multipart at all",
        headers={"Content-Type": "multipart/form-data; boundary=XYZ"},
    )
    assert (await error_of(broken, 400))["code"] == "invalid_multipart"
    no_boundary = await api.post(
        "/v1/files", data=b"--\r\n", headers={"Content-Type": "multipart/form-data"}
    )
    assert (await error_of(no_boundary, 400))["code"] == "invalid_multipart"
    as_json = await api.post("/v1/files", json={"file": "x", "purpose": "batch"})
    error = await error_of(as_json, 400)
    assert "multipart/form-data" in error["message"]


async def test_oversize_upload_is_413(api: Client) -> None:
    big = (line("a", "x" * 3000) + "\n" + line("b", "y" * 3000) + "\n").encode()
    error = await error_of(await api.post("/v1/files", data=form(big)), 413)
    assert error["code"] == "file_too_large"
    assert "4,096-byte limit" in error["message"]
    assert not [k async for k in api.app[STORE].redis.scan_iter(match="promptq:file:*")]


# -- unknown ids, routes, methods, bodies ------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/v1/files/file-0123456789abcdef0123456789abcdef"),
        ("GET", "/v1/files/not-a-file-id"),
        ("GET", "/v1/files/file-0123456789abcdef0123456789abcdef/content"),
        ("GET", "/v1/files/file-out-batch_nope/content"),
        ("GET", "/v1/files/file-err-batch_nope"),
        ("GET", "/v1/batches/batch_nope"),
        ("GET", "/v1/batches/{bad id}"),
        ("POST", "/v1/batches/batch_nope/cancel"),
        ("GET", "/v1/batches/batch_nope/results"),
        ("GET", "/v1/nothing-here"),
    ],
)
async def test_unknown_ids_and_urls_are_404(api: Client, method: str, path: str) -> None:
    error = await error_of(await api.request(method, path), 404)
    assert error["type"] == "invalid_request_error"


async def test_wrong_method_is_405_in_the_openai_shape(api: Client) -> None:
    resp = await api.delete("/v1/batches")
    assert (await error_of(resp, 405))["code"] == "method_not_allowed"
    assert "GET" in resp.headers["Allow"]


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"endpoint": CHAT, "completion_window": "24h"}, "input_file_id"),
        ({"input_file_id": "F", "completion_window": "24h"}, "endpoint"),
        ({"input_file_id": "F", "endpoint": "/v1/images", "completion_window": "24h"}, "endpoint"),
        ({"input_file_id": "F", "endpoint": CHAT}, "completion_window"),
        ({"input_file_id": "F", "endpoint": CHAT, "completion_window": "48h"}, "completion_window"),
        ({"input_file_id": 7, "endpoint": CHAT, "completion_window": "24h"}, "input_file_id"),
        (
            {"input_file_id": "F", "endpoint": CHAT, "completion_window": "24h",
             "metadata": {f"k{i}": "v" for i in range(17)}},
            "metadata",
        ),
        (
            {"input_file_id": "F", "endpoint": CHAT, "completion_window": "24h",
             "metadata": {"k": 1}},
            "metadata.k",
        ),
        (  # the test settings allow webhooks to hooks.example.com only
            {"input_file_id": "F", "endpoint": CHAT, "completion_window": "24h",
             "metadata": {"promptq_webhook_url": "http://169.254.169.254/latest"}},
            "metadata",
        ),
    ],
)  # fmt: skip
async def test_create_batch_names_the_missing_or_bad_field(
    api: Client, body: dict[str, Any], param: str
) -> None:
    file_id = await upload(api, f"{line('a')}\n".encode())
    body = {k: (file_id if v == "F" else v) for k, v in body.items()}
    error = await error_of(await api.post("/v1/batches", json=body), 400)
    assert error["param"] == param


async def test_create_batch_from_an_unknown_file_is_404(api: Client) -> None:
    body = {"input_file_id": "file-" + "0" * 32, "endpoint": CHAT, "completion_window": "24h"}
    error = await error_of(await api.post("/v1/batches", json=body), 404)
    assert error["param"] == "input_file_id"


@pytest.mark.parametrize("path", ["/v1/batches", CHAT])
async def test_bodies_that_are_not_json_objects_are_400(api: Client, path: str) -> None:
    for data in (b"{not json", b"[1, 2]"):
        resp = await api.post(path, data=data, headers={"Content-Type": "application/json"})
        assert (await error_of(resp, 400))["code"] == "invalid_json"


async def test_list_validates_limit_and_after(api: Client) -> None:
    for bad in ("0", "101", "ten"):
        error = await error_of(await api.get("/v1/batches", params={"limit": bad}), 400)
        assert error["param"] == "limit"
    error = await error_of(await api.get("/v1/batches", params={"after": "batch_gone"}), 400)
    assert error["param"] == "after"


# -- auth --------------------------------------------------------------------------------


async def test_file_listing_and_deletion_name_what_is_wrong(api: Client) -> None:
    for query, param in (("limit=0", "limit"), ("order=up", "order"), ("after=file-x", "after")):
        error = await error_of(await api.get(f"/v1/files?{query}"), 400)
        assert error["param"] == param
    error = await error_of(await api.delete("/v1/files/file-out-batch_x"), 400)
    assert "expires with them" in error["message"]
    error = await error_of(await api.delete(f"/v1/files/file-{'0' * 32}"), 404)
    assert error["code"] == "file_not_found"


async def test_file_listing_skips_expired_files_without_ending_early(
    api: Client, redis: ArqRedis
) -> None:
    ids = []
    for i in range(6):
        resp = await api.post("/v1/files", data=form(line(f"q{i}").encode()))
        ids.append((await resp.json())["id"])
    for gone in ids[:3]:  # the three oldest expire (their keys go, the index entry stays)
        await redis.delete(keys.file(gone), keys.file_content(gone))

    async def listed(**params: str) -> list[str]:
        found: list[str] = []
        after = None
        while True:
            query = {**params, **({"after": after} if after else {})}
            page = await (await api.get("/v1/files", params=query)).json()
            found += [f["id"] for f in page["data"]]
            if not page["has_more"]:
                return found
            after = page["last_id"]

    # the first chunk read (limit + 1 ids) is all expired, its last id included
    assert await listed(order="asc", limit="2") == ids[3:]
    assert await listed(limit="1") == ids[3:][::-1]
    assert await redis.zcard(keys.FILES) == 3  # the expired ones left the index


async def test_deleting_the_input_file_of_a_validating_batch_fails_it_by_name(
    api: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    resp = await api.post("/v1/files", data=form(line("q1").encode()))
    file_id = (await resp.json())["id"]
    real = promptq.api.intake.validate_and_enqueue
    deleted = asyncio.Event()

    async def after_the_delete(*args: Any, **kwargs: Any) -> None:
        await deleted.wait()
        await real(*args, **kwargs)

    monkeypatch.setattr(promptq.api.batches, "validate_and_enqueue", after_the_delete)
    batch_id = (await create(api, file_id))["id"]
    assert (await api.delete(f"/v1/files/{file_id}")).status == 200
    deleted.set()
    batch = await settled(api, batch_id)
    assert batch["status"] == "failed"
    assert "was deleted or expired" in batch["errors"]["data"][0]["message"]


async def test_a_missing_or_wrong_token_is_401_but_healthz_is_open(api: Client) -> None:
    assert api.session is not None
    url = api.make_url("/v1/batches")
    async with aiohttp.ClientSession() as anonymous:
        missing = await anonymous.get(url)
        assert (await error_of(missing, 401))["code"] == "missing_api_key"
        assert missing.headers["WWW-Authenticate"].startswith("Bearer")
        wrong = await anonymous.get(url, headers={"Authorization": "Bearer nope"})
        assert (await error_of(wrong, 401))["code"] == "invalid_api_key"
        metrics = await anonymous.get(api.make_url("/metrics"))
        assert metrics.status == 401
        health = await anonymous.get(api.make_url("/healthz"))
        assert (health.status, await health.json()) == (200, {"status": "ok", "redis": "ok"})


# -- validation of a batch's input file --------------------------------------------------


async def test_an_invalid_input_file_gives_a_failed_batch_naming_the_lines(
    api: Client, redis: ArqRedis, settings: Settings
) -> None:
    data = f'{line("a")}\n{{"prompt": ""}}\nnot json\n{line("a")}\n'.encode()
    created = await create(api, await upload(api, data), metadata={"team": "x"})
    assert created["status"] == "validating"
    batch = await settled(api, created["id"])
    assert batch["status"] == "failed"
    assert batch["failed_at"] >= batch["created_at"]
    assert batch["metadata"] == {"team": "x"}
    errors = batch["errors"]["data"]
    assert [(e["line"], e["param"], e["code"]) for e in errors] == [
        (2, "prompt", "invalid_request"),
        (3, None, "invalid_json_line"),
        (4, "custom_id", "duplicate_custom_id"),
    ]
    assert all(e["message"].startswith(f"line {e['line']}") for e in errors)
    # the pipeline sees an ordinary failed batch (promptq status works on it)
    info = await Producer(redis, settings=settings).batch(created["id"]).info()
    assert (info.status, info.total) == (Status.FAILED, 0)
    assert info.reason is not None
    assert "3 problem(s)" in info.reason
    assert (await redis.hgetall(keys.batch(created["id"])))[b"endpoint"] == CHAT.encode()
    listed = await (await api.get("/v1/batches")).json()
    assert [b["id"] for b in listed["data"]] == [created["id"]]


async def test_lines_for_another_endpoint_fail_the_batch(api: Client) -> None:
    embedding = {"custom_id": "e", "method": "POST", "url": "/v1/embeddings",
                 "body": {"model": "m", "input": "x"}}  # fmt: skip
    file_id = await upload(api, json.dumps(embedding).encode() + b"\n")
    batch = await settled(api, (await create(api, file_id))["id"])
    assert batch["status"] == "failed"
    [error] = batch["errors"]["data"]
    assert (error["line"], error["param"]) == (1, "url")
    assert "/v1/embeddings" in error["message"]


@pytest.mark.parametrize("before_enqueue", [True, False])
async def test_a_batch_cancelled_while_validating_ends_cancelled(
    api: Client, settings: Settings, monkeypatch: pytest.MonkeyPatch, before_enqueue: bool
) -> None:
    parsing = threading.Event()
    if before_enqueue:  # hold the validation until the cancel is done
        parse = promptq.api.intake.parse_jsonl

        def held(*args: Any, **kwargs: Any) -> Any:
            parsing.wait(timeout=10)
            return parse(*args, **kwargs)

        monkeypatch.setattr(promptq.api.intake, "parse_jsonl", held)
    async with local_cluster(settings, workers=1):
        file_id = await upload(api, "".join(f"{line(f'q{i}')}\n" for i in range(5)).encode())
        created = await create(api, file_id)
        cancel = await api.post(f"/v1/batches/{created['id']}/cancel")
        parsing.set()
        assert cancel.status == 200
        assert (await cancel.json())["status"] in ("cancelling", "cancelled")

        async def validation_over() -> bool:
            return not api.app[TASKS]

        await wait_until(validation_over, what="the validation task to end")

        async def cancelled() -> dict[str, Any] | None:
            batch = await (await api.get(f"/v1/batches/{created['id']}")).json()
            return dict(batch) if batch["status"] == "cancelled" else None

        batch = await wait_until(cancelled, what="the batch to be cancelled")
    counts = batch["request_counts"]
    assert counts["total"] == (0 if before_enqueue else 5)
    assert counts["completed"] + counts["failed"] == counts["total"]


async def test_a_batch_whose_validation_died_is_failed_on_read(api: Client) -> None:
    store = api.app[STORE]
    file_id = await upload(api, f"{line('a')}\n".encode())
    await store.create_validating(
        "batch_orphan",
        endpoint=CHAT,
        input_file_id=file_id,
        completion_window="24h",
        metadata=None,
        ttl_s=60,
        validation_timeout_s=0.001,  # the replica that took it "died"
    )

    async def failed() -> dict[str, Any] | None:
        batch = await (await api.get("/v1/batches/batch_orphan")).json()
        return dict(batch) if batch["status"] == "failed" else None

    batch = await wait_until(failed, timeout_s=5, what="the orphaned batch to fail")
    assert "create the batch again" in batch["errors"]["data"][0]["message"]


# -- results, chat, health and metrics ---------------------------------------------------


async def test_results_follow_streams_every_line_until_the_batch_ends(
    api: Client, settings: Settings
) -> None:
    async with local_cluster(settings, workers=1) as producer:
        batch = await producer.submit([f"p{i}" for i in range(20)])
        resp = await api.get(f"/v1/batches/{batch.id}/results", params={"follow": "true"})
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("application/x-ndjson")
        lines = [json.loads(x) async for x in resp.content if x.strip()]
        info = await batch.info()
    assert info.status is Status.COMPLETED  # the stream ended with the batch
    assert sorted(r["custom_id"] for r in lines) == sorted(f"line-{i}" for i in range(1, 21))
    again = await api.get(f"/v1/batches/{batch.id}/results")
    assert len((await again.text()).splitlines()) == 20
    error = await error_of(await api.get(f"/v1/batches/{batch.id}/results?follow=maybe"), 400)
    assert error["param"] == "follow"


async def test_lane_refuses_bad_stream_and_invalid_bodies_before_queueing(
    api: Client, redis: ArqRedis
) -> None:
    streamed = {"model": "m", "stream": True, "input": "x"}
    error = await error_of(await api.post("/v1/embeddings", json=streamed), 400)
    assert (error["param"], error["code"]) == ("stream", "unsupported_parameter")
    odd = {"model": "m", "stream": "yes", "messages": [{"role": "user", "content": "x"}]}
    error = await error_of(await api.post(CHAT, json=odd), 400)
    assert error["param"] == "stream"
    error = await error_of(await api.post(CHAT, json={"model": "m", "messages": []}), 400)
    assert error["param"] == "messages"
    error = await error_of(await api.post("/v1/responses", json={"model": "m"}), 400)
    assert error["param"] == "input"
    assert await redis.zcard(keys.QUEUE) == 0
    assert await redis.llen(keys.CHAT_QUEUE) == 0


async def test_healthz_is_503_when_redis_does_not_answer(
    api: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def down() -> None:
        raise RedisConnectionError("connection refused")

    monkeypatch.setattr(api.app[STORE].redis, "ping", down)
    error = await error_of(await api.get("/healthz"), 503)
    assert error["code"] == "redis_unavailable"


async def test_unexpected_errors_are_500_with_a_generic_message(
    api: Client, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    async def broken(batch_ids: list[str]) -> None:
        raise RuntimeError("secret internals")

    monkeypatch.setattr(api.app[STORE], "batches", broken)
    error = await error_of(await api.get("/v1/batches/batch_x"), 500)
    assert error["type"] == "server_error"
    assert "secret" not in error["message"]
    assert "secret internals" in caplog.text  # logged server-side, with the traceback


async def test_metrics_report_workers_queue_batches_and_latency(
    api: Client, redis: ArqRedis, settings: Settings
) -> None:
    producer = Producer(redis, settings=settings)
    await producer.submit([f"p{i}" for i in range(7)])  # no worker: all 7 stay queued
    await redis.rpush(keys.CHAT_QUEUE, b"chat entry")  # and one chat request
    await redis.zadd(keys.WORKERS, {"w1": 9e9})
    await redis.hset(
        keys.worker("w1"),
        mapping={"in_flight": 3, "done": 10, "failed": 2, "retries": 4, "tokens": 1234},
    )
    await redis.hset(
        keys.METRICS_LATENCY, mapping={"50": 2, "250": 3, "+Inf": 1, "sum": 91000, "count": 6}
    )
    resp = await api.get("/metrics")
    assert resp.status == 200
    assert resp.headers["Content-Type"].startswith("text/plain")
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(await resp.text())
        for s in family.samples
    }
    assert samples[("promptq_workers", ())] == 1
    assert samples[("promptq_requests_queued", ())] == 8
    assert samples[("promptq_requests_in_flight", ())] == 3
    assert samples[("promptq_requests_completed_total", (("worker", "w1"),))] == 10
    assert samples[("promptq_requests_failed_total", (("worker", "w1"),))] == 2
    assert samples[("promptq_request_retries_total", (("worker", "w1"),))] == 4
    assert samples[("promptq_tokens_total", (("worker", "w1"),))] == 1234
    assert samples[("promptq_batches", (("status", "queued"),))] == 1
    bucket = "promptq_request_latency_seconds_bucket"
    assert samples[(bucket, (("le", "0.05"),))] == 2
    assert samples[(bucket, (("le", "0.1"),))] == 2
    assert samples[(bucket, (("le", "0.25"),))] == 5
    assert samples[(bucket, (("le", "+Inf"),))] == 6
    assert samples[("promptq_request_latency_seconds_count", ())] == 6
    assert samples[("promptq_request_latency_seconds_sum", ())] == 91


async def test_metrics_with_nothing_in_redis_is_an_empty_histogram(api: Client) -> None:
    text = await (await api.get("/metrics")).text()
    assert 'promptq_request_latency_seconds_bucket{le="+Inf"} 0.0' in text
    assert "promptq_workers 0.0" in text


async def test_virtual_result_files_split_successes_and_failures(
    api: Client, settings: Settings
) -> None:
    async with local_cluster(settings, workers=1) as producer:
        batch = await producer.submit(["fine", "broken [[mock status=400]]", "also fine"])
        await batch.wait(timeout_s=20)
    out = await api.get(f"/v1/files/file-out-{batch.id}/content")
    err = await api.get(f"/v1/files/file-err-{batch.id}/content")
    ok_lines = [json.loads(x) for x in (await out.text()).splitlines()]
    bad_lines = [json.loads(x) for x in (await err.text()).splitlines()]
    assert sorted(r["custom_id"] for r in ok_lines) == ["line-1", "line-3"]
    assert [r["custom_id"] for r in bad_lines] == ["line-2"]
    assert bad_lines[0]["response"]["status_code"] == 400
    meta = await (await api.get(f"/v1/files/file-out-{batch.id}")).json()
    assert meta["bytes"] == len(await out.read())
    assert meta["purpose"] == "batch_output"
    obj = await (await api.get(f"/v1/batches/{batch.id}")).json()
    assert (obj["output_file_id"], obj["error_file_id"]) == (
        f"file-out-{batch.id}",
        f"file-err-{batch.id}",
    )
    assert obj["input_file_id"] == ""  # created with the Python API, not from a file


# -- promptq serve -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("host", "loopback"),
    [("127.0.0.1", True), ("localhost", True), ("::1", True), ("0.0.0.0", False),
     ("10.0.0.5", False), ("api.example.com", False)],
)  # fmt: skip
def test_only_loopback_hosts_count_as_local(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


async def test_serve_refuses_a_public_address_without_a_token(settings: Settings) -> None:
    env = worker_env(settings)  # no PROMPTQ_API_TOKEN
    proc = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "promptq", "serve", "--host", "0.0.0.0", "--port", "1"),
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        stdin=asyncio.subprocess.DEVNULL,
    )
    _out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 2
    assert "PROMPTQ_API_TOKEN" in err.decode()
    assert "--insecure-no-auth" in err.decode()


async def test_a_full_queue_is_429_with_retry_after(redis: ArqRedis, settings: Settings) -> None:
    capped = api_settings(settings, max_queued=3)
    app = create_app(capped)
    headers = {"Authorization": f"Bearer {TOKEN}"}
    async with TestClient(TestServer(app), headers=headers) as api:
        data = "\n".join(line(f"q{i}") for i in range(4)).encode()
        resp = await api.post("/v1/files", data=form(data))
        file_id = (await resp.json())["id"]
        create = {"input_file_id": file_id, "endpoint": CHAT, "completion_window": "24h"}
        resp = await api.post("/v1/batches", json=create)
        error = await error_of(resp, 429)
        assert error["code"] == "queue_full"
        assert "PROMPTQ_MAX_QUEUED" in error["message"]
        assert int(resp.headers["retry-after"]) > 0
        assert await redis.zcard(keys.QUEUE) == 0  # nothing was enqueued
        # chat requests queue too: with no workers, 3 fill it and the 4th is refused
        await Producer(redis, settings=capped).submit(["a", "b", "c"])
        chat = {"model": "mock-gpt", "messages": [{"role": "user", "content": "hi"}]}
        resp = await api.post(CHAT, json=chat)
        assert (await error_of(resp, 429))["code"] == "queue_full"


async def test_models_without_a_live_worker_answer_the_default_model_at_once(
    api: Client, settings: Settings
) -> None:
    started = time.monotonic()
    resp = await api.get("/v1/models")
    body = await resp.json()
    assert resp.status == 200
    assert [m["id"] for m in body["data"]] == [settings.model]
    assert body["object"] == "list"
    assert time.monotonic() - started < 2  # no 10 s wait for a worker that is not there
