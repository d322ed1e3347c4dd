"""A client of a provider's Batch API (OpenAI's Files + Batches endpoints).

The worker's own upstream (``PROMPTQ_UPSTREAM_URL``, its key): ``POST /files``
(purpose ``batch``), ``POST /batches``, ``GET /batches/{id}``, ``GET /batches``
(newest first, to find a batch by its metadata), ``POST /batches/{id}/cancel``,
``GET /files/{id}/content`` (read line by line, never whole). Any OpenAI-compatible
server that has them works, ``promptq serve`` included.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from pydantic import SecretStr

from promptq.shared.errors import FatalUpstreamError, RetryableUpstreamError, UpstreamError
from promptq.worker.retry import classify

#: how many provider batches one page of a listing asks for
LIST_PAGE = 100


class ProviderError(Exception):
    """A Batch API call failed; ``error`` says how (retryable or not)."""

    def __init__(self, what: str, error: UpstreamError) -> None:
        super().__init__(f"{what}: {error.message}")
        self.error = error

    @property
    def retryable(self) -> bool:
        return self.error.retryable


class BatchApiClient:
    """Use as ``async with BatchApiClient(...) as client``."""

    def __init__(self, *, base_url: str, api_key: SecretStr | None, timeout_s: float) -> None:
        self.base_url = base_url.rstrip("/")
        self._api_key = api_key
        self.timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=timeout_s, sock_read=timeout_s
        )
        self._session: aiohttp.ClientSession | None = None

    def __repr__(self) -> str:  # the key stays out of every repr
        return f"BatchApiClient({self.base_url!r})"

    async def __aenter__(self) -> BatchApiClient:
        headers = {"User-Agent": "promptq"}
        if self._api_key is not None:
            headers["Authorization"] = f"Bearer {self._api_key.get_secret_value()}"
        self._session = aiohttp.ClientSession(headers=headers, timeout=self.timeout)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    @property
    def session(self) -> aiohttp.ClientSession:
        assert self._session is not None, "use BatchApiClient as an async context manager"
        return self._session

    async def _call(self, method: str, path: str, what: str, **kwargs: Any) -> dict[str, Any]:
        try:
            async with self.session.request(method, f"{self.base_url}{path}", **kwargs) as resp:
                raw = await resp.read()
                status, headers = resp.status, resp.headers
        except TimeoutError as exc:
            error = RetryableUpstreamError(f"no answer from {path}", code="timeout")
            raise ProviderError(what, error) from exc
        except (aiohttp.ClientError, OSError) as exc:
            error = RetryableUpstreamError(
                f"connection failed: {type(exc).__name__}: {exc}", code="connection_error"
            )
            raise ProviderError(what, error) from exc
        body, refused = classify(status, headers, raw)
        if refused is not None:
            raise ProviderError(what, refused)
        return dict(body)

    async def upload(self, path: Path, *, filename: str) -> dict[str, Any]:
        """POST /files (purpose batch): the File object."""
        with path.open("rb") as f:
            form = aiohttp.FormData()
            form.add_field("purpose", "batch")
            form.add_field("file", f, filename=filename, content_type="application/jsonl")
            return await self._call("POST", "/files", f"uploading {filename}", data=form)

    async def create(
        self, *, input_file_id: str, endpoint: str, metadata: Mapping[str, str]
    ) -> dict[str, Any]:
        """POST /batches: the Batch object."""
        payload = {
            "input_file_id": input_file_id,
            "endpoint": endpoint,
            "completion_window": "24h",
            "metadata": dict(metadata),
        }
        return await self._call(
            "POST", "/batches", "creating a provider batch", data=orjson.dumps(payload),
            headers={"Content-Type": "application/json"},
        )  # fmt: skip

    async def retrieve(self, batch_id: str) -> dict[str, Any]:
        return await self._call("GET", f"/batches/{batch_id}", f"reading batch {batch_id}")

    async def cancel(self, batch_id: str) -> dict[str, Any]:
        return await self._call("POST", f"/batches/{batch_id}/cancel", f"cancelling {batch_id}")

    async def find(
        self, metadata: Mapping[str, str], *, created_after: float
    ) -> dict[str, Any] | None:
        """The newest provider batch whose metadata holds ``metadata``, among those
        created after ``created_after`` (unix seconds): a batch created by a worker that
        died before it could record its id."""
        after: str | None = None
        while True:
            params = {"limit": str(LIST_PAGE)}
            if after:
                params["after"] = after
            page = await self._call("GET", "/batches", "listing provider batches", params=params)
            data = page.get("data") or []
            for batch in data:
                found = batch.get("metadata") or {}
                if all(found.get(k) == v for k, v in metadata.items()):
                    return dict(batch)
            older = [b for b in data if float(b.get("created_at") or 0) < created_after]
            if not page.get("has_more") or not data or older:
                return None
            after = str(data[-1]["id"])

    async def lines(self, file_id: str) -> AsyncIterator[bytes]:
        """The lines of a file's content, as they arrive (never the file whole)."""
        what = f"downloading {file_id}"
        try:
            async with self.session.get(f"{self.base_url}/files/{file_id}/content") as resp:
                if resp.status >= 400:
                    raw = await resp.read()
                    _, error = classify(resp.status, resp.headers, raw)
                    raise ProviderError(
                        what, error or FatalUpstreamError(f"HTTP {resp.status}", code="http_error")
                    )
                buffered = b""
                async for chunk in resp.content.iter_chunked(1 << 16):
                    buffered += chunk
                    *complete, buffered = buffered.split(b"\n")
                    for line in complete:
                        if line.strip():
                            yield line
                if buffered.strip():
                    yield buffered
        except TimeoutError as exc:
            raise ProviderError(what, RetryableUpstreamError("no answer", code="timeout")) from exc
        except (aiohttp.ClientError, OSError) as exc:
            error = RetryableUpstreamError(f"connection failed: {exc}", code="connection_error")
            raise ProviderError(what, error) from exc
