"""Operating promptq: webhooks (Standard Webhooks signatures, at-least-once delivery,
retries with the same id, giving up, a dead worker's delivery taken over) and
``promptq doctor`` with the same checks as warnings at worker start."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from arq.connections import ArqRedis
from pydantic import SecretStr

from promptq.doctor import Check, redis_checks
from promptq.producer import Producer
from promptq.shared import keys
from promptq.shared.errors import InputError
from promptq.shared.settings import Settings
from promptq.worker.webhooks import WebhookSender

from .conftest import in_process_worker, redis_server, wait_until, worker_env
from .test_cli import cli

SECRET = "whsec_" + base64.b64encode(b"0123456789abcdef0123456789").decode()


class Receiver:
    """A webhook endpoint that fails the first ``fail`` deliveries with a 500."""

    def __init__(self, fail: int = 0) -> None:
        self.fail = fail
        self.seen: list[tuple[dict[str, str], bytes]] = []
        self.url = ""

    async def handle(self, request: web.Request) -> web.Response:
        self.seen.append((dict(request.headers), await request.read()))
        if len(self.seen) <= self.fail:
            return web.Response(status=500, text="not now")
        return web.Response(status=204)


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    found = Receiver(fail=2)
    app = web.Application()
    app.router.add_post("/hook", found.handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    found.url = f"http://{host}:{port}/hook"
    try:
        yield found
    finally:
        await runner.cleanup()


def verify(headers: dict[str, str], body: bytes) -> bool:
    """The receiver's side of Standard Webhooks."""
    key = base64.b64decode(SECRET.removeprefix("whsec_"))
    signed = f"{headers['webhook-id']}.{headers['webhook-timestamp']}.".encode() + body
    expected = base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()
    return headers["webhook-signature"] == f"v1,{expected}"


def hook_settings(settings: Settings, **update: Any) -> Settings:
    return settings.model_copy(
        update={"webhook_secret": SecretStr(SECRET), "webhook_backoff_s": "0.1,0.1,0.1",
                **update}
    )  # fmt: skip


async def all_redis_bytes(redis: ArqRedis) -> bytes:
    out = []
    async for key in redis.scan_iter(match="promptq:*"):
        kind = (await redis.type(key)).decode()
        if kind == "hash":
            out += [k + v for k, v in (await redis.hgetall(key)).items()]
        elif kind == "string":
            out.append(await redis.get(key) or b"")
    return b"".join(out)


async def test_a_finished_batch_is_told_signed_retried_with_one_id(
    redis: ArqRedis, settings: Settings, receiver: Receiver, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    local = hook_settings(settings)
    async with in_process_worker(local), Producer(redis, settings=local) as producer:
        batch = await producer.submit(["a", "b"], webhook_url=receiver.url)
        await batch.wait(timeout_s=20)

        async def delivered() -> bool:
            info = await batch.info()
            return info.webhook is not None and info.webhook.status == "delivered"

        await wait_until(delivered, what="the webhook to be delivered")
        info = await batch.info()
    assert len(receiver.seen) == 3  # two 500s, then taken
    ids = {headers["webhook-id"] for headers, _ in receiver.seen}
    assert ids == {f"evt_{batch.id}"}  # the same id on every retry
    for headers, body in receiver.seen:
        assert verify(headers, body)
        event = json.loads(body)
        assert event["type"] == "batch.completed"
        assert event["object"] == "event"
        assert event["data"] == {"id": batch.id}
    assert info.webhook is not None
    assert info.webhook.attempts == 3
    as_json = info.to_json_dict()["webhook"]
    assert as_json["attempts"] == 3
    assert as_json["type"] == "batch.completed"
    # the secret is in no Redis value and no log line
    secret_part = SECRET.removeprefix("whsec_").encode()
    assert secret_part not in await all_redis_bytes(redis)
    assert SECRET not in caplog.text
    assert secret_part.decode() not in caplog.text


async def test_the_workers_default_url_and_giving_up(
    redis: ArqRedis, settings: Settings, receiver: Receiver
) -> None:
    receiver.fail = 100  # never takes it
    local = hook_settings(settings, webhook_url=receiver.url, webhook_backoff_s="0.05,0.05")
    async with in_process_worker(local), Producer(redis, settings=local) as producer:
        batch = await producer.submit(["x [[mock status=400]]"], max_failure_rate=0.0)
        await batch.wait(timeout_s=20)

        async def given_up() -> bool:
            info = await batch.info()
            return info.webhook is not None and info.webhook.status == "failed"

        await wait_until(given_up, what="the webhook to be given up")
        info = await batch.info()
    assert info.webhook is not None
    assert info.webhook.attempts == 3  # the first try and one per backoff step
    assert info.webhook.last_error == "HTTP 500"
    assert await redis.zscore(keys.WEBHOOKS, batch.id) is None  # nothing left to retry
    assert json.loads(receiver.seen[0][1])["type"] == f"batch.{info.status.value}"


async def test_a_dead_workers_delivery_is_taken_over_after_its_lease(
    redis: ArqRedis, settings: Settings, receiver: Receiver
) -> None:
    receiver.fail = 0
    batch_id = "batch_leased"
    # a pending event as the finish script writes it (no worker running yet)
    await redis.hset(keys.webhook(batch_id), mapping={
        "url": receiver.url, "type": "completed", "created_at": 1, "attempts": 0,
        "status": "pending"})  # fmt: skip
    await redis.zadd(keys.WEBHOOKS, {batch_id: 0})
    dying = WebhookSender(redis, secret=None, lease_s=0.3)
    assert await dying.claim() == [batch_id]  # then it dies without delivering
    assert await dying.claim() == []  # leased: nobody else takes it meanwhile
    async with in_process_worker(settings):  # another worker, after the lease

        async def delivered() -> bool:
            return len(receiver.seen) == 1

        await wait_until(delivered, what="another worker to deliver it")
        fields = await redis.hgetall(keys.webhook(batch_id))
    assert fields[b"status"] == b"delivered"
    assert fields[b"attempts"] == b"1"
    assert json.loads(receiver.seen[0][1])["data"] == {"id": batch_id}
    assert "webhook-signature" not in receiver.seen[0][0]  # no secret here: unsigned
    await redis.delete(keys.webhook(batch_id))


async def test_webhook_urls_are_checked_before_anything_is_queued(
    redis: ArqRedis, settings: Settings, tmp_path: Path
) -> None:
    async with Producer(redis, settings=settings) as producer:
        with pytest.raises(InputError, match="http:// or https://"):
            await producer.submit(["a"], webhook_url="ftp://example.com/hook")
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "a"}\n')
    code, _out, err = await cli(
        "submit", str(prompts), "--webhook-url", "not a url", env=worker_env(settings)
    )
    assert code == 2
    assert "webhook" in err.lower()
    assert await redis.zcard(keys.BATCHES) == 0


class FakeRedis:
    def __init__(self, info: dict[str, Any]) -> None:
        self._info = info

    async def info(self) -> dict[str, Any]:
        return self._info

    async def time(self) -> tuple[int, int]:
        import time

        now = time.time()
        return int(now), int((now % 1) * 1e6)


async def test_doctor_names_each_redis_problem_and_its_fix() -> None:
    bad = FakeRedis({"redis_version": "6.0.9", "maxmemory_policy": "allkeys-lru",
                     "aof_enabled": 0})  # fmt: skip
    checks = {c.name: c for c in await redis_checks(bad)}  # type: ignore[arg-type]
    assert checks["redis version"].verdict == "fail"
    assert "6.2" in checks["redis version"].fix
    assert checks["maxmemory-policy"].verdict == "fail"
    assert "allkeys-lru" in checks["maxmemory-policy"].detail
    assert "noeviction" in checks["maxmemory-policy"].fix
    assert checks["persistence"].verdict == "warn"
    assert "appendonly yes" in checks["persistence"].fix
    good = FakeRedis({"redis_version": "7.2.4", "maxmemory_policy": "noeviction",
                      "aof_enabled": 1})  # fmt: skip
    assert all(c.verdict == "ok" for c in await redis_checks(good))  # type: ignore[arg-type]


async def test_doctor_against_the_real_redis_and_worker_start_warnings(
    redis: ArqRedis, settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    info = await redis.info()
    aof_on = bool(int(info.get("aof_enabled", 0)))
    evicting = info.get("maxmemory_policy") != "noeviction"
    caplog.set_level(logging.WARNING, logger="promptq.doctor")
    async with in_process_worker(settings):

        async def warned_or_clean() -> bool:
            return aof_on or "persistence" in caplog.text

        await wait_until(warned_or_clean, what="the worker's persistence warning")
        code, out, _err = await cli("doctor", "--json", env=worker_env(settings))
    checks = {c["check"]: c for c in map(json.loads, out.splitlines())}
    assert set(checks) == {"redis", "redis version", "maxmemory-policy", "persistence",
                           "clock", "workers", "upstream"}  # fmt: skip
    assert checks["workers"]["verdict"] == "ok"  # the worker above beats
    assert checks["upstream"]["verdict"] == "ok"  # the mock answers GET /models
    assert checks["persistence"]["verdict"] == ("ok" if aof_on else "warn")
    assert checks["maxmemory-policy"]["verdict"] == ("fail" if evicting else "ok")
    assert code == (0 if aof_on and not evicting else 1)
    assert Check("x", "ok", "y").as_dict()["verdict"] == "ok"
    code, _out, _err = await cli(
        "doctor", env={**worker_env(settings), "PROMPTQ_REDIS_URL": "redis://127.0.0.1:1/0"}
    )
    assert code == 1


async def test_top_shows_batches_workers_queue_and_cooldowns(
    redis: ArqRedis, settings: Settings
) -> None:
    async with in_process_worker(settings), Producer(redis, settings=settings) as producer:
        batch = await producer.submit(["a", "b", "c"])
        await batch.wait(timeout_s=20)
        seconds, _ = await redis.time()
        await redis.hset(
            "promptq:ratelimit:{http://up.example/v1}", "cooldown_until", (seconds + 60) * 1000
        )
        env = {**worker_env(settings), "COLUMNS": "200"}
        code, out, err = await cli("top", "--once", env=env)
    assert code == 0, err
    assert batch.id in out
    assert "completed" in out
    assert "3/3" in out
    assert "1 live worker(s)" in out
    assert "cooling down" in out
    assert "queued 0" in out


async def test_doctor_against_an_evicting_redis_without_aof(settings: Settings) -> None:
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.fail("this test starts a redis-server: apt-get install redis-server")
    with redis_server(binary, "--maxmemory-policy", "allkeys-lru") as url:
        env = {**worker_env(settings), "PROMPTQ_REDIS_URL": url, "COLUMNS": "250"}
        code, out, _err = await cli("doctor", env=env)
    assert code == 1
    assert "allkeys-lru" in out
    assert "maxmemory-policy noeviction" in out  # the fix, named
    assert "AOF off" in out
    assert "appendonly yes" in out
    assert "no worker beat" in out


@pytest.mark.parametrize(
    ("variable", "value", "says"),
    [
        ("PROMPTQ_WEBHOOK_SECRET", "not-base64!!", "whsec_"),
        ("PROMPTQ_WEBHOOK_BACKOFF_S", "5,soon", "PROMPTQ_WEBHOOK_BACKOFF_S"),
        ("PROMPTQ_WEBHOOK_HOSTS", "https://hooks.example.com", "PROMPTQ_WEBHOOK_HOSTS"),
    ],
)
async def test_a_worker_with_bad_webhook_settings_says_what_to_fix(
    settings: Settings, variable: str, value: str, says: str
) -> None:
    code, _out, err = await cli("worker", "--burst", env={**worker_env(settings), variable: value})
    assert code == 2
    assert says in err
    assert "Traceback" not in err


def test_webhook_hosts_name_exact_hosts_and_subdomains() -> None:
    from promptq.shared.errors import ConfigError
    from promptq.shared.webhooks import check_url, host_allowed, parse_hosts

    hosts = parse_hosts(" Hooks.Example.com, *.internal.example ,")
    assert hosts == ("hooks.example.com", "*.internal.example")
    assert host_allowed("hooks.example.com", hosts)
    assert host_allowed("HOOKS.example.com.", hosts)
    assert host_allowed("a.b.internal.example", hosts)
    assert not host_allowed("internal.example", hosts)  # the wildcard is for names under it
    assert not host_allowed("evilhooks.example.com", hosts)
    assert not host_allowed("169.254.169.254", hosts)
    assert host_allowed("169.254.169.254", ())  # no list: any host
    assert check_url("https://hooks.example.com/x", hosts) == "https://hooks.example.com/x"
    with pytest.raises(ConfigError, match="PROMPTQ_WEBHOOK_HOSTS"):
        check_url("http://127.0.0.1:8080/admin", hosts)
    for bad in ("http://x.example", "*", "a.example:8080"):
        with pytest.raises(ConfigError, match="not a host name"):
            parse_hosts(bad)


async def test_webhook_urls_outside_the_allowed_hosts_are_refused_and_never_called(
    redis: ArqRedis, settings: Settings, receiver: Receiver
) -> None:
    """With PROMPTQ_WEBHOOK_HOSTS, a producer refuses another host before queueing; a
    worker marks an event for another host failed at once (from an older producer, or
    written straight to Redis) without a request."""
    local = settings.model_copy(update={"webhook_hosts": "hooks.example.com"})
    async with Producer(redis, settings=local) as producer:
        with pytest.raises(InputError, match="PROMPTQ_WEBHOOK_HOSTS"):
            await producer.submit(["a"], webhook_url=receiver.url)
    assert await redis.zcard(keys.BATCHES) == 0
    batch_id = "batch_elsewhere"
    await redis.hset(keys.webhook(batch_id), mapping={
        "url": receiver.url, "type": "completed", "created_at": 1, "attempts": 0,
        "status": "pending"})  # fmt: skip
    await redis.zadd(keys.WEBHOOKS, {batch_id: 0})
    sender = WebhookSender(redis, secret=None, hosts=("hooks.example.com",))
    await sender.start()
    try:
        assert await sender.claim() == [batch_id]
        assert await sender.deliver(batch_id) is False
    finally:
        await sender.stop()
    fields = await redis.hgetall(keys.webhook(batch_id))
    assert fields[b"status"] == b"failed"  # at once: no retries
    assert b"PROMPTQ_WEBHOOK_HOSTS" in fields[b"last_error"]
    assert await redis.zscore(keys.WEBHOOKS, batch_id) is None
    assert receiver.seen == []
    await redis.delete(keys.webhook(batch_id))
