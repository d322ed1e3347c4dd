"""Statistics: percentiles and the aggregator's fields."""

from __future__ import annotations

import pytest

from promptq.shared.models import BatchStats
from promptq.shared.stats import compute_stats, percentile


def test_percentile_interpolates_like_numpy() -> None:
    values = [1.0, 2.0, 3.0, 4.0]
    assert percentile(values, 0) == 1.0
    assert percentile(values, 50) == 2.5
    assert percentile(values, 90) == pytest.approx(3.7)
    assert percentile(values, 100) == 4.0
    assert percentile([], 50) == 0.0
    with pytest.raises(ValueError, match=r"0\.\.100"):
        percentile(values, 101)


def result(latency: float, *, error: str | None = None, attempts: int = 1) -> dict[str, object]:
    body = {"usage": {"prompt_tokens": 3, "completion_tokens": 5}}
    return {
        "custom_id": "x",
        "response": None if error else {"status_code": 200, "body": body},
        "error": {"code": error, "message": "m"} if error else None,
        "latency_ms": latency,
        "attempts": attempts,
    }


def test_compute_stats_fields() -> None:
    results = [result(float(i)) for i in range(1, 101)]
    results += [result(1000.0, error="server_error"), result(0.0, error="x", attempts=0)]
    stats = compute_stats(results, wall_s=2.0)
    assert (stats.succeeded, stats.failed) == (100, 2)
    assert stats.success_rate == pytest.approx(100 / 102, abs=1e-6)
    # never-sent requests (attempts 0) do not count towards latency
    assert stats.max_ms == 1000.0
    assert stats.p50_ms == 51.0
    assert stats.throughput_rps == 51.0
    assert (stats.input_tokens, stats.output_tokens) == (300, 500)
    assert stats.errors_by_code == {"server_error": 1, "x": 1}


def test_stats_roundtrip_through_redis_strings() -> None:
    stats = compute_stats([result(5.0), result(7.0, error="e")], wall_s=1.0)
    assert BatchStats.from_redis(stats.to_redis()) == stats
