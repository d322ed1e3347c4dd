"""Retry policy with the clock controlled, classification, and fetch-with-retry on the mock."""

from __future__ import annotations

import asyncio
from random import Random

import pytest

from promptq.mock import MockConfig, MockServer
from promptq.worker.backends.http import HttpBackend
from promptq.worker.execute import Executor
from promptq.worker.retry import RetryPolicy, classify, parse_retry_after


def test_backoff_is_full_jitter_within_exponential_bounds() -> None:
    policy = RetryPolicy(base_delay_s=0.5, max_delay_s=8.0)
    rng = Random(1)
    for attempt, cap in [(1, 0.5), (2, 1.0), (3, 2.0), (4, 4.0), (5, 8.0), (9, 8.0)]:
        delays = [policy.delay_s(attempt, None, rng) for _ in range(500)]
        assert all(0 <= d <= cap for d in delays)
        # full jitter spreads over the whole range, not a narrow band around the cap
        assert min(delays) < cap * 0.1
        assert max(delays) > cap * 0.9


def test_retry_after_is_a_floor_with_a_little_spread() -> None:
    policy = RetryPolicy()
    rng = Random(2)
    delays = [policy.delay_s(1, 1.5, rng) for _ in range(200)]
    assert min(delays) >= 1.5
    assert max(delays) <= 1.5 * 1.1 + 1e-9
    assert len({round(d, 6) for d in delays}) > 100  # not all at the same instant
    assert policy.delay_s(1, 10_000, rng) <= policy.max_retry_after_s * 1.1


def test_parse_retry_after_forms() -> None:
    assert parse_retry_after({"retry-after-ms": "250", "retry-after": "9"}) == 0.25
    assert parse_retry_after({"retry-after": "1.5"}) == 1.5
    date = "Wed, 21 Oct 2015 07:28:10 GMT"
    assert parse_retry_after({"retry-after": date}, now_s=1445412480.0) == 10.0
    assert parse_retry_after({"retry-after": "soon"}) is None
    assert parse_retry_after({"retry-after": "-3"}) is None
    assert parse_retry_after({}) is None


@pytest.mark.parametrize(
    ("status", "body", "retryable", "code"),
    [
        (429, b'{"error": {"code": "rate_limit_exceeded", "message": "slow"}}', True,
         "rate_limit_exceeded"),
        (429, b'{"error": {"type": "insufficient_quota", "code": "insufficient_quota"}}', False,
         "insufficient_quota"),
        (500, b'{"error": {"message": "boom", "type": "server_error"}}', True, "server_error"),
        (503, b"upstream down", True, "server_unavailable"),
        (408, b"", True, "request_timeout"),
        (400, b'{"error": {"code": "context_length_exceeded"}}', False, "context_length_exceeded"),
        (401, b'{"error": {"code": "invalid_api_key"}}', False, "invalid_api_key"),
        (403, b"", False, "permission_denied"),
        (404, b"", False, "not_found"),
        (500, b'{"error": {"code": 500, "message": "vllm"}}', True, "server_error"),
        (200, b"{truncated", True, "invalid_response"),
        (200, b"[1]", True, "invalid_response"),
    ],
)  # fmt: skip
def test_classification(status: int, body: bytes, retryable: bool, code: str) -> None:
    _, error = classify(status, {}, body)
    assert error is not None
    assert error.retryable is retryable
    assert error.code == code
    assert error.status_code == status


def test_success_and_header_overrides() -> None:
    body, error = classify(200, {}, b'{"ok": 1}')
    assert error is None
    assert body == {"ok": 1}
    _, error = classify(500, {"x-should-retry": "false"}, b"")
    assert error is not None
    assert not error.retryable
    _, error = classify(400, {"x-should-retry": "true"}, b"")
    assert error is not None
    assert error.retryable


def test_retry_after_from_openai_message() -> None:
    body = b'{"error": {"code": "rate_limit_exceeded", "message": "Please try again in 18.642s."}}'
    _, error = classify(429, {}, body)
    assert error is not None
    assert error.retry_after_s == pytest.approx(18.642)
    _, error = classify(429, {}, body.replace(b"18.642s", b"20ms"))
    assert error is not None
    assert error.retry_after_s == pytest.approx(0.02)


class RecordingSleep:
    def __init__(self) -> None:
        self.delays: list[float] = []

    async def __call__(self, delay: float) -> None:
        self.delays.append(delay)


def fetcher(url: str, sleep: RecordingSleep, **kw: float) -> Executor:
    backend = HttpBackend(
        base_url=url,
        api_key=None,
        concurrency=int(kw.pop("concurrency", 8)),
        timeout_s=kw.pop("timeout_s", 5.0),
    )
    return Executor(
        backend,
        policy=RetryPolicy(max_attempts=int(kw.pop("max_attempts", 4))),
        sleep=sleep,
        rng=Random(0),
    )


def chat(text: str) -> dict[str, object]:
    return {"model": "m", "messages": [{"role": "user", "content": text}]}


async def test_fetch_recovers_from_500s_and_counts_attempts(mock: MockServer) -> None:
    sleep = RecordingSleep()
    async with fetcher(mock.url, sleep) as f:
        outcome = await f.execute("/v1/chat/completions", chat("a [[mock status=500 fail=2]]"))
    assert outcome.ok
    assert outcome.attempts == 3
    assert outcome.status_code == 200
    assert len(sleep.delays) == 2
    assert outcome.body["choices"][0]["message"]["content"].startswith("echo: a")


async def test_fetch_honours_retry_after(mock: MockServer) -> None:
    sleep = RecordingSleep()
    async with fetcher(mock.url, sleep) as f:
        outcome = await f.execute(
            "/v1/chat/completions", chat("b [[mock status=429 fail=1 retry_after=1.5]]")
        )
    assert outcome.ok
    assert outcome.attempts == 2
    assert sleep.delays[0] >= 1.5


async def test_fatal_errors_are_not_retried(mock: MockServer) -> None:
    sleep = RecordingSleep()
    async with fetcher(mock.url, sleep) as f:
        bad = await f.execute("/v1/chat/completions", chat("c [[mock status=400]]"))
        quota = await f.execute("/v1/chat/completions", chat("d [[mock quota=1]]"))
    assert (bad.attempts, bad.status_code) == (1, 400)
    assert bad.error is not None
    assert quota.error is not None
    assert (quota.attempts, quota.error.code) == (1, "insufficient_quota")
    assert sleep.delays == []


async def test_attempts_are_capped_and_last_error_reported(mock: MockServer) -> None:
    sleep = RecordingSleep()
    async with fetcher(mock.url, sleep, max_attempts=3) as f:
        outcome = await f.execute("/v1/chat/completions", chat("e [[mock status=503]]"))
    assert outcome.error is not None
    assert (outcome.attempts, outcome.status_code, outcome.error.code) == (3, 503, "server_error")


async def test_hang_drop_and_malformed_are_classified(mock: MockServer) -> None:
    sleep = RecordingSleep()
    async with fetcher(mock.url, sleep, max_attempts=1, timeout_s=0.3) as f:
        hang, drop, bad = await asyncio.gather(
            f.execute("/v1/chat/completions", chat("f [[mock hang=1]]")),
            f.execute("/v1/chat/completions", chat("g [[mock drop=1]]")),
            f.execute("/v1/chat/completions", chat("h [[mock malformed=1]]")),
        )
    assert hang.error is not None
    assert drop.error is not None
    assert bad.error is not None
    assert hang.error.code == "timeout"
    assert drop.error.code == "connection_error"
    assert bad.error.code == "invalid_response"


async def test_semaphore_bounds_in_flight_requests() -> None:
    async with MockServer(MockConfig(latency_ms=50)) as server:
        async with fetcher(server.url, RecordingSleep(), concurrency=5) as f:
            outcomes = await asyncio.gather(
                *(f.execute("/v1/chat/completions", chat(f"q{i}")) for i in range(40))
            )
        assert all(o.ok for o in outcomes)
        assert server.stats.max_in_flight == 5
