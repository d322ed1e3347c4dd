"""No pickle in Redis; secrets stay out of Redis, results and logs."""

from __future__ import annotations

import logging
import pickle
from pathlib import Path

import pytest
from arq.connections import ArqRedis
from arq.constants import job_key_prefix
from pydantic import SecretStr

from promptq.embedded import local_cluster
from promptq.shared import keys
from promptq.shared.connection import connect
from promptq.shared.errors import UnsafePayload
from promptq.shared.serialization import job_deserializer
from promptq.shared.settings import Settings, redact_url
from promptq.worker.worker import JobRunner

from .conftest import wait_until


class Exploit:
    """Unpickling this runs `touch <path>`."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[object, tuple[str]]:
        import os

        return os.system, (f"touch {self.path}",)


def test_deserializer_refuses_pickle() -> None:
    with pytest.raises(UnsafePayload):
        job_deserializer(pickle.dumps({"f": "claim"}))
    with pytest.raises(UnsafePayload):
        job_deserializer(b"[1, 2]")
    assert job_deserializer(b'{"f": "claim", "a": []}')["f"] == "claim"


async def test_planted_pickle_job_is_logged_and_never_executed(
    redis: ArqRedis,
    redis_url: str,
    settings: Settings,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    marker = tmp_path / "pwned"
    payload = pickle.dumps({"t": 1, "f": "claim", "a": [Exploit(marker)], "k": {}, "et": 0})
    await redis.set(job_key_prefix + "evil", payload)
    await redis.zadd(keys.QUEUE, {"evil": 1})  # arq skips score 0
    client = await connect(redis_url)
    runner = JobRunner(client, ctx={}, poll_delay_s=0.05)

    async def queue_empty() -> bool:
        return int(await redis.zcard(keys.QUEUE)) == 0

    with caplog.at_level(logging.ERROR):
        runner.start()
        try:
            await wait_until(queue_empty, what="arq to take the planted job")
        finally:
            await runner.stop()
            await client.aclose()
    assert not marker.exists()
    assert "refused a queued job payload that is not JSON" in caplog.text
    assert await redis.zcard(keys.QUEUE) == 0  # dropped, not retried forever


async def test_api_key_never_reaches_redis_or_logs(
    redis: ArqRedis, settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    canary = "sk-canary-4f1d9c0e7b"
    keyed = settings.model_copy(update={"api_key": SecretStr(canary)})
    assert canary not in repr(keyed)
    with caplog.at_level(logging.DEBUG):
        async with local_cluster(keyed, workers=1) as producer:
            batch = await producer.submit(["a", "b [[mock status=401]]", "c [[mock status=500]]"])
            await batch.wait(timeout_s=30)

            async def dumped() -> list[bytes]:
                out = []
                async for key in redis.scan_iter(match="*"):
                    kind = (await redis.type(key)).decode()
                    if kind == "string":
                        out.append(await redis.get(key) or b"")
                    elif kind == "hash":
                        out.extend(v for kv in (await redis.hgetall(key)).items() for v in kv)
                    elif kind == "list":
                        out.extend(await redis.lrange(key, 0, -1))
                    elif kind == "stream":
                        out.extend(repr(e).encode() for e in await redis.xrange(key))
                return out

            values = await dumped()
            assert values  # the batch's keys are there to inspect
    assert all(canary.encode() not in v for v in values)
    assert canary not in caplog.text


def test_redis_password_is_redacted() -> None:
    assert redact_url("redis://user:s3cret@host:6380/2") == "redis://user:***@host:6380/2"
    assert redact_url("redis://host:6379") == "redis://host:6379"
