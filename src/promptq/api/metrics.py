"""``GET /metrics``: Prometheus text, computed from Redis at scrape time.

Every replica reports the same cluster-wide numbers (nothing is counted in the API
process): live workers' heartbeats (``promptq:worker:<id>``: in flight, succeeded,
failed, retries; counters carry a ``worker`` label so a restart reads as a counter
reset), queued requests (``LLEN`` of the chat queue and of the pending lists of the
latest ``SCANNED_BATCHES`` batches that are still running), batches by status, and the
request latency histogram the workers keep in ``promptq:metrics:latency_ms``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field

from arq.connections import ArqRedis
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from promptq.shared import keys
from promptq.shared.registry import WorkerRegistry
from promptq.shared.scripts import decode
from promptq.shared.settings import Settings
from promptq.shared.status import RUNNING, Status, parse

#: the latest batches whose pending lists are counted (bounds the scrape's cost)
SCANNED_BATCHES = 1000


@dataclass
class Snapshot:
    """What one scrape read from Redis."""

    workers: dict[str, dict[str, str]] = field(default_factory=dict)
    queued: int = 0
    batches: dict[str, int] = field(default_factory=dict)
    latency: dict[str, str] = field(default_factory=dict)


async def read_snapshot(redis: ArqRedis, *, heartbeat_s: float) -> Snapshot:
    snap = Snapshot()
    worker_ids = await WorkerRegistry(redis, heartbeat_s=heartbeat_s).live_ids()
    async with redis.pipeline(transaction=False) as pipe:
        pipe.zrevrange(keys.BATCHES, 0, SCANNED_BATCHES - 1)
        pipe.hgetall(keys.METRICS_LATENCY)
        pipe.llen(keys.CHAT_QUEUE)
        batch_ids, latency, chat_queued = await pipe.execute()
    snap.queued = int(chat_queued)
    snap.latency = {decode(k): decode(v) for k, v in latency.items()}
    async with redis.pipeline(transaction=False) as pipe:
        for worker_id in worker_ids:
            pipe.hgetall(keys.worker(worker_id))
        for batch_id in batch_ids:
            pipe.hget(keys.batch(decode(batch_id)), "status")
        replies = await pipe.execute()
    for worker_id, beat in zip(worker_ids, replies, strict=False):
        if beat:  # the hash expires with the heartbeat
            snap.workers[worker_id] = {decode(k): decode(v) for k, v in beat.items()}
    running = []
    for batch_id, status in zip(batch_ids, replies[len(worker_ids) :], strict=True):
        state = parse(status)
        if state is None:
            continue
        snap.batches[state.value] = snap.batches.get(state.value, 0) + 1
        if state in RUNNING:
            running.append(decode(batch_id))
    if running:
        async with redis.pipeline(transaction=False) as pipe:
            for batch_id in running:
                pipe.llen(keys.pending(batch_id))
            snap.queued += sum(int(n) for n in await pipe.execute())
    return snap


def _num(value: str | None) -> float:
    try:
        return float(value or 0)
    except ValueError:
        return 0.0


class SnapshotCollector(Collector):
    """Renders the snapshot set just before ``generate_latest`` (collect() is sync)."""

    def __init__(self) -> None:
        self.snapshot = Snapshot()

    def collect(self) -> Iterator[Metric]:
        snap = self.snapshot
        yield GaugeMetricFamily("promptq_workers", "Live worker processes.", len(snap.workers))
        yield GaugeMetricFamily(
            "promptq_requests_queued",
            "Requests waiting for a worker (the chat queue, and running batches among the "
            f"latest {SCANNED_BATCHES}).",
            snap.queued,
        )
        yield GaugeMetricFamily(
            "promptq_requests_in_flight",
            "Requests being sent to the upstream now, all workers.",
            sum(_num(b.get("in_flight")) for b in snap.workers.values()),
        )
        for name, source, doc in (
            ("promptq_requests_completed", "done", "Requests that succeeded, per live worker."),
            (
                "promptq_requests_failed",
                "failed",
                "Requests that failed for good, per live worker.",
            ),
            ("promptq_request_retries", "retries", "Upstream attempts retried, per live worker."),
            (
                "promptq_cost_usd",
                "cost_usd",
                "USD spent on answers (their usage at the price table's prices; answers of "
                "models with no price are not counted), per live worker.",
            ),
            (
                "promptq_saved_usd",
                "saved_usd",
                "USD saved by the batch-api route (the same tokens at realtime prices, minus "
                "what was paid), per live worker.",
            ),
            (
                "promptq_requests_cached",
                "cached",
                "Requests answered from the cache, without an upstream call, per live worker.",
            ),
            (
                "promptq_tokens",
                "tokens",
                "Tokens the upstream answered with (input + output, from the answers' usage), "
                "per live worker.",
            ),
        ):
            counter = CounterMetricFamily(name, doc, labels=["worker"])
            for worker_id, beat in sorted(snap.workers.items()):
                counter.add_metric([worker_id], _num(beat.get(source)))
            yield counter
        batches = GaugeMetricFamily(
            "promptq_batches",
            f"Batches by status, among the latest {SCANNED_BATCHES}.",
            labels=["status"],
        )
        for status in Status:
            batches.add_metric([status.value], snap.batches.get(status.value, 0))
        yield batches
        yield self._latency(snap.latency)

    @staticmethod
    def _latency(raw: dict[str, str]) -> HistogramMetricFamily:
        # The workers keep non-cumulative counts per bucket, in ms; Prometheus wants
        # cumulative counts and seconds.
        bounds: set[float] = set(keys.LATENCY_BUCKETS_MS)
        for name in raw:
            bound = _num(name) if name not in ("sum", "count", "+Inf") else math.nan
            if not math.isnan(bound) and bound > 0:
                bounds.add(bound)
        buckets: list[tuple[str, float]] = []
        running = 0.0
        for bound in sorted(bounds):
            running += _num(raw.get(_bound_name(bound)))
            buckets.append((f"{bound / 1000:g}", running))
        running += _num(raw.get("+Inf"))
        buckets.append(("+Inf", running))
        return HistogramMetricFamily(
            "promptq_request_latency_seconds",
            "Request latency, first attempt to final answer (retries included), all workers.",
            buckets=buckets,
            sum_value=_num(raw.get("sum")) / 1000,
        )


def _bound_name(bound: float) -> str:
    return str(int(bound)) if bound == int(bound) else f"{bound:g}"


@dataclass
class Metrics:
    """Per-app registry (never the global one: several apps may live in one process)."""

    registry: CollectorRegistry = field(
        default_factory=lambda: CollectorRegistry(auto_describe=False)
    )
    collector: SnapshotCollector = field(default_factory=SnapshotCollector)

    def __post_init__(self) -> None:
        self.registry.register(self.collector)

    async def render(self, redis: ArqRedis, settings: Settings) -> bytes:
        snapshot = await read_snapshot(redis, heartbeat_s=settings.heartbeat_s)
        # No await between setting the snapshot and rendering it: scrapes cannot mix.
        self.collector.snapshot = snapshot
        return generate_latest(self.registry)
