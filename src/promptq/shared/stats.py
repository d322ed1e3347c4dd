"""Batch statistics: counts, latency percentiles, throughput, tokens.

Workers keep a running tally per batch as they record results (``:tally``: tokens,
errors by code, and a latency histogram), so the aggregator reads a few thousand
numbers, not a million result lines: constant memory and time whatever the batch's
size, and live percentiles for a running batch.

The latency histogram's buckets are log-spaced, each ``BUCKET_RATIO`` (0.1 %) wider than
the one before, from ``MIN_LATENCY_MS``: a value is known to within 0.05 % of itself, so
a percentile read from the histogram (numpy's linear interpolation between the two
closest ranks, as ``percentile`` does on exact values) is within 0.1 % of the exact
one. Mean and max are exact.

``compute_stats`` gives the same statistics from result lines (exact percentiles): the
reference the tests compare against, and the way to recompute them from an export.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from promptq.shared.models import BatchStats

BUCKET_RATIO = 1.001
MIN_LATENCY_MS = 0.001
_LOG_RATIO = math.log(BUCKET_RATIO)
#: tally fields: histogram buckets and error codes carry these prefixes
BUCKET_PREFIX = "h:"
ERROR_PREFIX = "e:"


def latency_bucket(latency_ms: float) -> int:
    """The histogram bucket of a latency (0 for anything at or under MIN_LATENCY_MS)."""
    if latency_ms <= MIN_LATENCY_MS:
        return 0
    return int(math.log(latency_ms / MIN_LATENCY_MS) / _LOG_RATIO) + 1


def bucket_value(bucket: int) -> float:
    """The value a bucket stands for: the geometric middle of its bounds."""
    if bucket <= 0:
        return 0.0
    return float(MIN_LATENCY_MS * BUCKET_RATIO ** (bucket - 0.5))


def usage_tokens(body: Any) -> tuple[int, int]:
    """(input, output) tokens of a response body's ``usage``: chat and completions
    (``prompt_tokens`` / ``completion_tokens``), embeddings (``prompt_tokens``), the
    Responses API (``input_tokens`` / ``output_tokens``); (0, 0) when there is none."""
    usage = body.get("usage") if isinstance(body, dict) else None
    if not isinstance(usage, dict):
        return 0, 0
    tokens_in = _int(usage.get("prompt_tokens")) or _int(usage.get("input_tokens"))
    tokens_out = _int(usage.get("completion_tokens")) or _int(usage.get("output_tokens"))
    return tokens_in, tokens_out


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


class Histogram:
    """Latency counts per bucket, read as percentiles."""

    def __init__(self, counts: Mapping[int, int]) -> None:
        self._buckets = sorted((b, c) for b, c in counts.items() if c > 0)
        self.count = sum(c for _b, c in self._buckets)

    def _value_at_rank(self, rank: int) -> float:
        seen = 0
        for bucket, count in self._buckets:
            seen += count
            if rank < seen:
                return bucket_value(bucket)
        return bucket_value(self._buckets[-1][0])

    def percentile(self, q: float) -> float:
        if not self.count:
            return 0.0
        pos = (self.count - 1) * q / 100
        lo, hi = math.floor(pos), math.ceil(pos)
        low = self._value_at_rank(lo)
        if lo == hi:
            return low
        return low + (self._value_at_rank(hi) - low) * (pos - lo)


def stats_from_tally(
    tally: Mapping[str, str],
    *,
    succeeded: int,
    failed: int,
    wall_s: float,
    batch_api: bool = False,
) -> BatchStats:
    """A batch's statistics from its running tally (see the module docstring). The cost
    is None when any request used a model with no price; ``saved_usd`` is given for
    batches of the batch-api route."""
    buckets: dict[int, int] = {}
    errors: Counter[str] = Counter()
    for name, value in tally.items():
        if name.startswith(BUCKET_PREFIX):
            buckets[int(name[len(BUCKET_PREFIX) :])] = int(value)
        elif name.startswith(ERROR_PREFIX):
            errors[name[len(ERROR_PREFIX) :]] = int(value)
    histogram = Histogram(buckets)
    count = int(tally.get("lat_n") or 0)
    total_ms = float(tally.get("lat_sum") or 0.0)
    cost = float(tally.get("cost") or 0.0)
    finished = succeeded + failed
    return BatchStats(
        succeeded=succeeded,
        failed=failed,
        success_rate=round(succeeded / finished, 6) if finished else 0.0,
        p50_ms=round(histogram.percentile(50), 3),
        p90_ms=round(histogram.percentile(90), 3),
        p95_ms=round(histogram.percentile(95), 3),
        p99_ms=round(histogram.percentile(99), 3),
        mean_ms=round(total_ms / count, 3) if count else 0.0,
        max_ms=round(float(tally.get("lat_max") or 0.0), 3),
        wall_s=round(wall_s, 3),
        throughput_rps=round(finished / wall_s, 3) if wall_s > 0 else 0.0,
        input_tokens=int(tally.get("in") or 0),
        output_tokens=int(tally.get("out") or 0),
        errors_by_code=dict(errors.most_common()),
        cost_usd=None if int(tally.get("unpriced") or 0) else round(cost, 8),
        saved_usd=round(float(tally.get("saved") or 0.0), 8) if batch_api else None,
        cached=int(tally.get("cached") or 0),
    )


def compute_stats(results: Iterable[dict[str, Any]], *, wall_s: float) -> BatchStats:
    """Aggregate result dicts (the output line shape), exactly.

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
        if response:
            tokens_in, tokens_out = usage_tokens(response.get("body"))
            input_tokens += tokens_in
            output_tokens += tokens_out
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
