"""Configuration, read once at the edge (CLI, WorkerSettings, create_app).

Every field comes from a ``PROMPTQ_*`` environment variable (``.env`` is not read:
a deployment should say what it means); CLI flags override by passing keyword
arguments to ``Settings(...)``. Secrets are ``SecretStr`` so their repr hides them.
"""

from __future__ import annotations

from typing import Annotated, Literal
from urllib.parse import urlsplit, urlunsplit

from pydantic import AliasChoices, Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_REDIS_URL = "redis://localhost:6379"

PositiveInt = Annotated[int, Field(ge=1)]


class Settings(BaseSettings):
    """promptq settings. Units are in the names; defaults match the README's table."""

    model_config = SettingsConfigDict(env_prefix="PROMPTQ_", extra="ignore", frozen=True)

    redis_url: str | None = Field(
        default=None,
        description="redis:// or rediss:// URL; unset = embedded mode for run/demo, "
        f"{DEFAULT_REDIS_URL} for worker/submit/status",
    )
    upstream_url: str = Field(
        default="https://api.openai.com/v1",
        description="base URL of the OpenAI-compatible API, ending in /v1",
    )
    api_key: SecretStr | None = Field(
        default=None,
        validation_alias=AliasChoices("PROMPTQ_API_KEY", "OPENAI_API_KEY", "api_key"),
        description="upstream API key; read by workers only, never stored or logged",
    )
    model: str = Field(default="gpt-4o-mini", min_length=1)
    concurrency: PositiveInt = Field(default=64, le=10_000)
    max_attempts: PositiveInt = Field(default=5, le=100)
    timeout_s: float = Field(default=60.0, gt=0)
    rpm: PositiveInt | None = None
    tpm: PositiveInt | None = None
    api_token: SecretStr | None = None
    backend: str = Field(
        default="openai",
        min_length=1,
        description="what workers do with a request: 'openai' (HTTP to the upstream) or "
        "'python:MODULE:FUNCTION' (a local function)",
    )
    backend_threads: PositiveInt = Field(
        default=1, le=1024, description="python: backend, plain def: threads running it"
    )
    backend_processes: PositiveInt | None = Field(
        default=None,
        le=1024,
        description="python: backend, plain def: processes running it instead of threads",
    )

    # Not in the contract's table, for operators who need them:
    result_ttl_s: PositiveInt = Field(
        default=7 * 24 * 3600, description="how long a finished batch stays in Redis"
    )
    poll_delay_s: float = Field(
        default=0.5, gt=0, description="fallback queue poll; wake-ups make pickup immediate"
    )
    max_file_bytes: PositiveInt = Field(
        default=2 * 1024**3, description="run/submit: input files up to this size"
    )
    max_lines: PositiveInt = Field(
        default=1_000_000, description="run/submit/Python API: batches up to this many lines"
    )
    heartbeat_s: float = Field(default=2.0, gt=0)
    max_queued: PositiveInt | None = Field(
        default=None,
        description="backpressure: refuse a submit that would queue more requests than this",
    )
    limit_per_model: bool = Field(
        default=False, description="apply PROMPTQ_RPM/TPM per model instead of per upstream"
    )
    adaptive_concurrency: bool = Field(
        default=False,
        description="AIMD: shrink the concurrency on 429s and timeouts, grow it back on success",
    )
    prices: str | None = Field(
        default=None,
        description="a JSON file of prices that overrides the built-in table "
        '({"MODEL": {"input_per_1m": USD, "output_per_1m": USD, "batch_discount": 0.5}})',
    )
    cache_ttl_s: PositiveInt | None = Field(
        default=None,
        description="answer a request identical (endpoint + body) to one answered within "
        "this many seconds from Redis, without an upstream call; unset = off",
    )
    batch_api_max_lines: PositiveInt = Field(
        default=50_000, description="route batch-api: lines per provider batch (a shard)"
    )
    batch_api_max_bytes: PositiveInt = Field(
        default=200 * 1024 * 1024, description="route batch-api: bytes per shard's input file"
    )
    batch_api_poll_s: float = Field(
        default=30.0, gt=0, description="route batch-api: how often a provider batch is polled"
    )
    webhook_url: str | None = Field(
        default=None,
        description="workers: POST a signed batch.completed|failed|cancelled|expired event "
        "here for every batch without its own webhook URL",
    )
    webhook_secret: SecretStr | None = Field(
        default=None,
        description="workers: the Standard Webhooks secret (whsec_ + base64) that signs "
        "webhook deliveries; never stored in Redis",
    )
    webhook_hosts: str = Field(
        default="",
        description="the hosts webhooks may go to, comma-separated ('*.example.com' "
        "covers its subdomains); empty: any. Workers check it before every delivery, "
        "producers and serve when a batch names its URL",
    )
    webhook_backoff_s: str = Field(
        default="5,30,120,300,600,1200,1800,3600",
        description="waits between webhook delivery attempts, seconds, comma-separated; "
        "after the last the event is marked failed",
    )
    upstream_keepalive: Literal["auto", "on", "off"] = Field(
        default="auto",
        description="keep connections to the upstream open between requests: 'auto' "
        "until it announces a Keep-Alive timeout (a server with a thread per connection, "
        "such as llama.cpp's llama-server, which an idle connection would block), then "
        "one connection per request; 'on' always; 'off' never",
    )
    upstream_down_s: float = Field(
        default=60.0,
        gt=0,
        description="an upstream that refuses every connection this long fails the "
        "requests waiting for it (upstream_unreachable), which stops their batches",
    )
    shutdown_grace_s: float = Field(
        default=10.0, ge=0, description="on SIGTERM, how long in-flight requests may finish"
    )
    redis_connect_wait_s: float = Field(
        default=5.0, ge=0, description="how long to retry an unreachable Redis before giving up"
    )
    # `promptq serve` (the HTTP API):
    api_host: str = Field(default="127.0.0.1", description="interface `promptq serve` binds")
    api_port: int = Field(default=8000, ge=0, le=65535, description="port of `promptq serve`")
    api_max_file_bytes: PositiveInt = Field(
        default=200 * 1024 * 1024,
        description="POST /v1/files: uploads up to this size (OpenAI's Batch API limit)",
    )
    api_max_lines: PositiveInt = Field(
        default=50_000, description="POST /v1/files: files up to this many lines (OpenAI's)"
    )
    api_file_ttl_s: PositiveInt = Field(
        default=7 * 24 * 3600, description="how long a file uploaded over HTTP stays in Redis"
    )
    api_chat_timeout_s: float = Field(
        default=600.0, gt=0, description="how long POST /v1/chat/completions waits for a result"
    )
    api_validation_timeout_s: float = Field(
        default=600.0,
        gt=0,
        description="a batch still 'validating' after this long is marked failed "
        "(the API replica validating it stopped)",
    )
    api_redis_connections: PositiveInt = Field(
        default=1024,
        description="Redis connections per API process (each results follower holds one "
        "while it waits)",
    )

    @field_validator("redis_url")
    @classmethod
    def _check_redis_url(cls, value: str | None) -> str | None:
        if value is None or value == "":
            return None
        scheme = urlsplit(value).scheme
        if scheme not in ("redis", "rediss", "unix"):
            raise ValueError(
                f"must start with redis://, rediss:// or unix:// (got {scheme or 'no'} scheme)"
            )
        return value

    @field_validator("upstream_url")
    @classmethod
    def _check_upstream_url(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError("must be an http(s) URL such as https://api.openai.com/v1")
        return value.rstrip("/")

    @property
    def redis_url_or_default(self) -> str:
        return self.redis_url or DEFAULT_REDIS_URL


def redact_url(url: str) -> str:
    """The URL with any password replaced by ``***``: safe to print and log."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    netloc = f"{user}:***@{host}"
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))
