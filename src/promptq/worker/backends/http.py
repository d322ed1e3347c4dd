"""The ``openai`` backend: one HTTP attempt against an OpenAI-compatible upstream.

One aiohttp session per worker process, its connection pool sized to the concurrency,
and one ``asyncio.Semaphore`` that bounds the attempts on the wire across every request
the process runs (backoff waits do not hold a slot). Answers are classified once, in
``worker.retry.classify``.
"""

from __future__ import annotations

import asyncio
import ipaddress
import uuid
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import orjson
from pydantic import SecretStr

from promptq.shared.errors import RetryableUpstreamError
from promptq.worker.backends import NO_HEADERS, Attempt
from promptq.worker.retry import classify

#: the startup check's GET /models waits this long
CHECK_TIMEOUT_S = 3.0


class HttpBackend:
    """Sends attempts to ``base_url`` (ending in /v1) with the upstream key."""

    parallelism: int | None = None

    def __init__(
        self, *, base_url: str, api_key: SecretStr | None, concurrency: int, timeout_s: float
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.label = self.base_url
        self._api_key = api_key
        self.concurrency = concurrency
        self.timeout = aiohttp.ClientTimeout(total=timeout_s)
        self.semaphore = asyncio.Semaphore(concurrency)
        self._session: aiohttp.ClientSession | None = None
        self._in_flight = 0

    def __repr__(self) -> str:  # the key stays out of every repr
        return f"HttpBackend({self.base_url!r}, concurrency={self.concurrency})"

    @property
    def in_flight(self) -> int:
        """Attempts on the wire now."""
        return self._in_flight

    async def start(self) -> None:
        headers = {"Content-Type": "application/json", "User-Agent": "promptq"}
        if self._api_key is not None:
            headers["Authorization"] = f"Bearer {self._api_key.get_secret_value()}"
        connector = aiohttp.TCPConnector(limit=self.concurrency, ttl_dns_cache=300)
        self._session = aiohttp.ClientSession(
            headers=headers, connector=connector, timeout=self.timeout, raise_for_status=False
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def url_for(self, endpoint: str) -> str:
        """``/v1/chat/completions`` -> ``{base_url}/chat/completions`` (base ends in /v1)."""
        return f"{self.base_url}{endpoint.removeprefix('/v1')}"

    async def attempt(self, endpoint: str, body: dict[str, Any]) -> Attempt:
        assert self._session is not None, "start() the backend first"
        payload = orjson.dumps(body)
        async with self.semaphore:
            self._in_flight += 1
            try:
                async with self._session.post(self.url_for(endpoint), data=payload) as resp:
                    raw = await resp.read()
                    status = resp.status
                    headers = resp.headers
            except TimeoutError:
                error = f"no answer within {self.timeout.total:g}s"
                return Attempt(None, None, None, _retryable(error, "timeout"), NO_HEADERS)
            except (aiohttp.ClientError, OSError) as exc:
                # str(exc) names host and reason, never our headers (the key stays secret)
                error = f"connection failed: {type(exc).__name__}: {exc}"
                return Attempt(None, None, None, _retryable(error, "connection_error"), NO_HEADERS)
            finally:
                self._in_flight -= 1
        answer, classified = classify(status, headers, raw)
        request_id = headers.get("x-request-id") or f"req_{uuid.uuid4().hex}"
        return Attempt(status, answer, request_id, classified, headers)

    async def check(self) -> str | None:
        """A warning about the upstream as a worker starts (None: nothing to say): no key
        for a public host, a refused key, or no answer at all (GET /models, 3 s)."""
        if self._api_key is None and needs_key(self.base_url):
            return (
                f"no API key is set for {self.base_url} (PROMPTQ_API_KEY or "
                "OPENAI_API_KEY): it will likely refuse every request"
            )
        assert self._session is not None, "start() the backend first"
        try:
            async with self._session.get(
                f"{self.base_url}/models", timeout=aiohttp.ClientTimeout(total=CHECK_TIMEOUT_S)
            ) as resp:
                status = resp.status
        except TimeoutError:
            return (
                f"upstream {self.base_url} did not answer GET /models within {CHECK_TIMEOUT_S:g}s"
            )
        except (aiohttp.ClientError, OSError) as exc:
            return (
                f"upstream {self.base_url} does not answer ({type(exc).__name__}: {exc}): is it "
                "running, and is PROMPTQ_UPSTREAM_URL right?"
            )
        if status in (401, 403):
            return (
                f"upstream {self.base_url} refused the API key (GET /models: HTTP {status}): "
                "set PROMPTQ_API_KEY (or OPENAI_API_KEY) for the workers"
            )
        return None


def needs_key(base_url: str) -> bool:
    """A public host name (api.openai.com): not loopback, not a private address, not a
    single-label name such as a compose service (``vllm``, ``localhost``)."""
    host = urlsplit(base_url).hostname or ""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return "." in host and not host.endswith((".local", ".internal", ".localhost"))
    return not (address.is_loopback or address.is_private or address.is_link_local)


def _retryable(message: str, code: str) -> RetryableUpstreamError:
    return RetryableUpstreamError(message, code=code)
