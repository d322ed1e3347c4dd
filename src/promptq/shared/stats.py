"""Batch statistics from result lines: counts, latency percentiles, throughput, tokens."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any

from promptq.shared.models import BatchStats


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) of already sorted values, linear interpolation
    between closest ranks (numpy's default). 0.0 for no values."""
    if not sorted_values:
        return 0.0
    if not 0 <= q <= 100:
        raise ValueError(f"percentile must be within 0..100, got {q}")
    pos = (len(sorted_values) - 1) * q / 100
    lo = math.floor(pos)
    hi = math.ceil(pos)
    if lo == hi:
        return float(sorted_values[lo])
    frac = pos - lo
    return float(sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * frac)


def compute_stats(results: Iterable[dict[str, Any]], *, wall_s: float) -> BatchStats:
    """Aggregate result dicts (the output line shape).

    Latency percentiles cover every request that was sent (``attempts`` > 0), failed ones
    included: a user's tail latency includes its failures. ``wall_s`` is batch creation to
    last result; throughput is finished requests per wall second.
    """
    latencies: list[float] = []
    succeeded = failed = input_tokens = output_tokens = 0
    errors: Counter[str] = Counter()
    for r in results:
        error = r.get("error")
        if error:
            failed += 1
            errors[str(error.get("code") or "unknown")] += 1
        else:
            succeeded += 1
        if r.get("attempts") and r.get("latency_ms") is not None:
            latencies.append(float(r["latency_ms"]))
        response = r.get("response")
        if response and isinstance(response.get("body"), dict):
            usage = response["body"].get("usage")
            if isinstance(usage, dict):
                input_tokens += _int(usage.get("prompt_tokens"))
                output_tokens += _int(usage.get("completion_tokens"))
    latencies.sort()
    finished = succeeded + failed
    return BatchStats(
        succeeded=succeeded,
        failed=failed,
        success_rate=round(succeeded / finished, 6) if finished else 0.0,
        p50_ms=round(percentile(latencies, 50), 3),
        p90_ms=round(percentile(latencies, 90), 3),
        p95_ms=round(percentile(latencies, 95), 3),
        p99_ms=round(percentile(latencies, 99), 3),
        mean_ms=round(sum(latencies) / len(latencies), 3) if latencies else 0.0,
        max_ms=round(latencies[-1], 3) if latencies else 0.0,
        wall_s=round(wall_s, 3),
        throughput_rps=round(finished / wall_s, 3) if wall_s > 0 else 0.0,
        input_tokens=input_tokens,
        output_tokens=output_tokens,
        errors_by_code=dict(errors.most_common()),
    )


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0
