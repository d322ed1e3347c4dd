"""Data shapes shared by producer, worker, API and CLI.

Pydantic at the edges (what users read); the worker's hot loop builds plain dicts.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from promptq.shared import serialization
from promptq.shared.status import Status

__all__ = [
    "CHAT_ENDPOINT",
    "ENDPOINTS",
    "BatchInfo",
    "BatchStats",
    "Priority",
    "QueuedRequest",
    "Result",
    "ResultError",
    "ResultResponse",
    "Status",
]


class Priority(StrEnum):
    URGENT = "urgent"
    BULK = "bulk"


#: Endpoints a batch may target (OpenAI Batch API ``url``), and the HTTP API's lane.
ENDPOINTS = (
    "/v1/chat/completions",
    "/v1/responses",
    "/v1/completions",
    "/v1/embeddings",
    "/v1/moderations",
)
CHAT_ENDPOINT = "/v1/chat/completions"
#: ``GET /v1/models``: through the lane only (workers hold the upstream key)
MODELS_ENDPOINT = "/v1/models"
#: what a chat-lane entry may ask a worker for
LANE_ENDPOINTS = (*ENDPOINTS, MODELS_ENDPOINT)


@dataclass(frozen=True, slots=True)
class QueuedRequest:
    """One validated request as stored in Redis: the body is sent to the upstream as is."""

    custom_id: str
    body: dict[str, Any]
    line: int  # 1-based line in the input (or index+1 for the Python API)

    def to_json(self) -> bytes:
        return serialization.dumps({"custom_id": self.custom_id, "body": self.body, "l": self.line})

    @classmethod
    def from_json(cls, data: bytes | str) -> QueuedRequest:
        obj = serialization.loads(data)
        return cls(custom_id=obj["custom_id"], body=obj["body"], line=obj.get("l", 0))


class ResultError(BaseModel):
    code: str
    message: str


class ResultResponse(BaseModel):
    status_code: int
    request_id: str | None = None
    body: Any = None


class Result(BaseModel):
    """One output line (``shared.results``): the OpenAI Batch API output shape plus
    ``latency_ms``, ``attempts`` and ``route``.

    ``latency_ms`` runs from the first attempt to the final answer (retries and backoff
    included, queue wait excluded); ``attempts`` is 0 for requests never sent.
    """

    model_config = ConfigDict(extra="allow")

    id: str
    custom_id: str
    response: ResultResponse | None = None
    error: ResultError | None = None
    latency_ms: float | None = None
    attempts: int = 0
    route: str = "realtime"
    #: answered from the cache (an identical request's answer), not by the upstream
    cached: bool = False

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def content(self) -> str | None:
        """The assistant's text for a successful chat completion, else None."""
        if self.response is None or not isinstance(self.response.body, dict):
            return None
        try:
            content = self.response.body["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError):
            return None
        return content if isinstance(content, str) else None


class BatchStats(BaseModel):
    """What the aggregator job writes to ``promptq:batch:{ID}:stats``. Latencies in ms."""

    succeeded: int = 0
    failed: int = 0
    success_rate: float = 0.0
    p50_ms: float = 0.0
    p90_ms: float = 0.0
    p95_ms: float = 0.0
    p99_ms: float = 0.0
    mean_ms: float = 0.0
    max_ms: float = 0.0
    wall_s: float = 0.0
    throughput_rps: float = 0.0
    input_tokens: int = 0
    output_tokens: int = 0
    errors_by_code: dict[str, int] = Field(default_factory=dict)
    #: what the batch cost in USD (None: a model with no price was used)
    cost_usd: float | None = None
    #: route batch-api: the same tokens at realtime prices minus what was paid
    saved_usd: float | None = None
    #: requests answered from the cache
    cached: int = 0

    def to_redis(self) -> dict[str, str]:
        out = {
            k: str(v)
            for k, v in self.model_dump().items()
            if k != "errors_by_code" and v is not None
        }
        out["errors_by_code"] = serialization.dumps(self.errors_by_code).decode()
        return out

    @classmethod
    def from_redis(cls, raw: dict[str, str]) -> BatchStats:
        data: dict[str, Any] = dict(raw)
        if "errors_by_code" in data:
            data["errors_by_code"] = serialization.loads(data["errors_by_code"])
        return cls.model_validate(data)


class WebhookState(BaseModel):
    """A finished batch's webhook event and its delivery (``promptq:webhook:{ID}``)."""

    url: str
    type: str
    status: str  # pending | delivered | failed
    attempts: int = 0
    created_at: float | None = None
    last_attempt_at: float | None = None
    delivered_at: float | None = None
    last_error: str | None = None

    @classmethod
    def from_redis(cls, raw: dict[str, str]) -> WebhookState:
        data = {k: v for k, v in raw.items() if v != ""}
        data["type"] = "batch." + data.get("type", "completed")
        return cls.model_validate(data)


class BatchInfo(BaseModel):
    """The batch hash ``promptq:batch:{ID}``, typed. Timestamps are unix seconds."""

    id: str
    status: Status
    total: int = 0
    succeeded: int = 0
    failed: int = 0
    retries: int = 0
    created_at: float | None = None
    in_progress_at: float | None = None
    finalizing_at: float | None = None
    cancelling_at: float | None = None
    completed_at: float | None = None
    last_result_at: float | None = None
    model: str | None = None
    endpoint: str = CHAT_ENDPOINT
    priority: Priority = Priority.BULK
    route: str = "realtime"
    deadline_at: float | None = None
    max_cost_usd: float | None = None
    reason: str | None = None
    max_failure_rate: float | None = None
    retry_of: str | None = None
    retried_by: str | None = None
    shards: int = 0
    stats: BatchStats | None = None
    #: spend so far (the running tally): USD paid (None: a model with no price was
    #: used), USD saved by the batch-api route, requests answered from the cache
    cost_usd: float | None = None
    saved_usd: float = 0.0
    cached: int = 0
    #: the batch's own webhook URL (else the workers' PROMPTQ_WEBHOOK_URL), and once the
    #: batch has ended, its event's delivery
    webhook_url: str | None = None
    webhook: WebhookState | None = None

    @property
    def done(self) -> int:
        return self.succeeded + self.failed

    @classmethod
    def from_redis(
        cls,
        batch_id: str,
        raw: dict[str, str],
        stats: dict[str, str] | None = None,
        spend: Sequence[str | None] | None = None,
    ) -> BatchInfo:
        """From the batch hash, its stats hash, and its tally's (cost, saved, unpriced,
        cached)."""
        data: dict[str, Any] = {
            k: v for k, v in raw.items() if v != "" and k not in ("cost_usd", "saved_usd")
        }
        data["id"] = batch_id
        info = cls.model_validate(data)
        if stats:
            info.stats = BatchStats.from_redis(stats)
        if spend is not None:
            cost, saved, unpriced, cached = spend
            info.cost_usd = None if int(unpriced or 0) else float(cost or 0.0)
            info.saved_usd = float(saved or 0.0)
            info.cached = int(cached or 0)
        return info

    def to_json_dict(self) -> dict[str, Any]:
        """The ``promptq status --json`` object."""
        out = self.model_dump(mode="json", exclude={"stats", "webhook"})
        out["stats"] = self.stats.model_dump(mode="json") if self.stats else None
        out["webhook"] = self.webhook.model_dump(mode="json") if self.webhook else None
        return out
