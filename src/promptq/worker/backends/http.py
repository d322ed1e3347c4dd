"""The ``openai`` backend: one HTTP attempt against an OpenAI-compatible upstream.

One aiohttp session per worker process, its connection pool sized to the concurrency,
and one ``asyncio.Semaphore`` that bounds the attempts on the wire across every request
the process runs (backoff waits do not hold a slot). Answers are classified once, in
``worker.retry.classify``.

Keep-alive (PROMPTQ_UPSTREAM_KEEPALIVE). Connections are reused, until the upstream
announces ``Keep-Alive: timeout=N``: servers that do (llama.cpp's ``llama-server``, which
is cpp-httplib; Apache) give every open connection a thread of a small pool
(``--threads-http``) for as long as it stays open, idle or not, so a client holding more
idle connections than there are threads makes the requests on the others wait out the
keep-alive timeout (5 s each time; a 40-prompt batch took 20 s instead of 0.2 s). Once
known (a ``GET /models`` at start, which the first attempts wait for; or any later
answer), every request asks ``Connection: close``, so the server closes each connection
after its answer: nothing idle ever holds a server thread. (Connections already idle in
the pool when a later answer first announces it stay until the server drops them.)
At start the backend also asks a local upstream ``GET /props`` (llama.cpp's slot
count, ``total_slots``) so the worker can stop holding more requests than the server
runs (``server_slots``).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import re
import uuid
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import orjson
from pydantic import SecretStr

from promptq.shared.errors import FatalUpstreamError, RetryableUpstreamError
from promptq.shared.models import MODELS_ENDPOINT
from promptq.shared.sse import DONE, event_data, is_comment, upstream_error
from promptq.worker.backends import NO_HEADERS, Attempt, Relay
from promptq.worker.retry import classify

logger = logging.getLogger(__name__)

#: the startup check's GET /models waits this long
CHECK_TIMEOUT_S = 3.0
#: a Keep-Alive header that announces an idle timeout ("timeout=5, max=100")
_KEEPALIVE_TIMEOUT_RE = re.compile(r"\btimeout\s*=\s*\d", re.IGNORECASE)
_CLOSE = {"Connection": "close"}


class HttpBackend:
    """Sends attempts to ``base_url`` (ending in /v1) with the upstream key."""

    parallelism: int | None = None

    def __init__(
        self,
        *,
        base_url: str,
        api_key: SecretStr | None,
        concurrency: int,
        timeout_s: float,
        keepalive: str = "auto",
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.keepalive = keepalive
        #: one connection per request (see the module docstring)
        self.close_connections = keepalive == "off"
        self.label = self.base_url
        self._api_key = api_key
        self.concurrency = concurrency
        self.timeout = aiohttp.ClientTimeout(total=timeout_s)
        self.semaphore = asyncio.Semaphore(concurrency)
        self._session: aiohttp.ClientSession | None = None
        self._probe: asyncio.Task[None] | None = None
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
        if self.keepalive == "auto":
            # first attempts wait for this (a millisecond on a local server): once
            # connections are open and idle in the pool it is too late to drop them
            self._probe = asyncio.create_task(self._probe_keepalive())

    async def _probe_keepalive(self) -> None:
        """Read the upstream's Keep-Alive announcement from one ``GET /models``."""
        assert self._session is not None
        try:
            async with self._session.get(
                f"{self.base_url}/models",
                headers=_CLOSE,  # this probe must not hold a server thread either
                timeout=aiohttp.ClientTimeout(total=CHECK_TIMEOUT_S),
            ) as resp:
                self._notice_keepalive(resp.headers.get("Keep-Alive"))
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            logger.debug("keep-alive probe: %s", exc)

    async def close(self) -> None:
        if self._probe is not None:
            self._probe.cancel()
            await asyncio.gather(self._probe, return_exceptions=True)
            self._probe = None
        if self._session is not None:
            await self._session.close()
            self._session = None

    def url_for(self, endpoint: str) -> str:
        """``/v1/chat/completions`` -> ``{base_url}/chat/completions`` (base ends in /v1)."""
        return f"{self.base_url}{endpoint.removeprefix('/v1')}"

    async def attempt(
        self, endpoint: str, body: dict[str, Any], *, relay: Relay | None = None
    ) -> Attempt:
        assert self._session is not None, "start() the backend first"
        payload = orjson.dumps(body)
        if self._probe is not None and not self._probe.done():
            await asyncio.wait([self._probe])
        if relay is not None and body.get("stream") is True:
            return await self._stream(endpoint, payload, relay)
        if endpoint == MODELS_ENDPOINT:
            return await self._get(endpoint)
        async with self.semaphore:
            self._in_flight += 1
            try:
                async with self._session.post(
                    self.url_for(endpoint),
                    data=payload,
                    headers=_CLOSE if self.close_connections else None,
                ) as resp:
                    raw = await resp.read()
                    status = resp.status
                    headers = resp.headers
                    if not self.close_connections and self.keepalive == "auto":
                        self._notice_keepalive(headers.get("Keep-Alive"))
                    if self.close_connections:
                        resp.close()  # not back into the pool: it would sit there idle
            except (TimeoutError, aiohttp.ClientError, OSError) as exc:
                return self._unanswered(exc)
            finally:
                self._in_flight -= 1
        answer, classified = classify(status, headers, raw)
        request_id = headers.get("x-request-id") or f"req_{uuid.uuid4().hex}"
        return Attempt(status, answer, request_id, classified, headers)

    def _unanswered(self, exc: BaseException) -> Attempt:
        """An attempt that got no answer: a timeout or a connection failure (retryable)."""
        if isinstance(exc, TimeoutError):
            error = _retryable(f"no answer within {self.timeout.total:g}s", "timeout")
        else:  # str(exc) names host and reason, never our headers (the key stays secret)
            error = _retryable(
                f"connection failed: {type(exc).__name__}: {exc}", "connection_error"
            )
        return Attempt(None, None, None, error, NO_HEADERS)

    async def _get(self, endpoint: str) -> Attempt:
        assert self._session is not None
        try:
            async with self._session.get(self.url_for(endpoint)) as resp:
                raw, status, headers = await resp.read(), resp.status, resp.headers
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            return self._unanswered(exc)
        answer, classified = classify(status, headers, raw)
        return Attempt(status, answer, headers.get("x-request-id"), classified, headers)

    async def _stream(self, endpoint: str, payload: bytes, relay: Relay) -> Attempt:
        """A streamed attempt: its events go to ``relay`` as they come; a client that
        leaves stops the upstream request (``relay.watching`` cancels the reader)."""
        async with self.semaphore:
            self._in_flight += 1
            reader = asyncio.create_task(self._read_stream(endpoint, payload, relay))
            try:
                async with relay.watching(reader):
                    await asyncio.wait([reader])
            finally:
                self._in_flight -= 1
                if not reader.done():  # we were cancelled (shutdown): so is the request
                    reader.cancel()
                    await asyncio.gather(reader, return_exceptions=True)
        if reader.cancelled() or relay.cancelled:
            gone = FatalUpstreamError(
                "the client disconnected; the upstream request was stopped",
                code="client_disconnected",
            )
            return Attempt(None, None, None, gone, NO_HEADERS)
        return reader.result()

    async def _read_stream(self, endpoint: str, payload: bytes, relay: Relay) -> Attempt:
        assert self._session is not None
        # a stream may run longer than one attempt's timeout: it bounds each read instead
        per_read = aiohttp.ClientTimeout(
            total=None, sock_connect=self.timeout.total, sock_read=self.timeout.total
        )
        status: int | None = None
        headers: Any = NO_HEADERS
        done = endpoint != "/v1/chat/completions"  # only chat ends in [DONE]
        try:
            async with self._session.post(
                self.url_for(endpoint),
                data=payload,
                headers=_CLOSE if self.close_connections else None,
                timeout=per_read,
            ) as resp:
                status, headers = resp.status, resp.headers
                if status != 200 or not resp.content_type.startswith("text/event-stream"):
                    # an error before the first event, or a server that answers whole:
                    # retried (or made into events by the API) as any answer
                    answer, classified = classify(status, headers, await resp.read())
                    return Attempt(status, answer, headers.get("x-request-id"), classified, headers)
                # events end at a blank line; read what has arrived, not line by line
                pending = b""
                stop = False  # the client has gone, or the stream has failed

                def relay_one(raw: bytes) -> bool:
                    """Relay one event; False when reading should stop."""
                    nonlocal done
                    event = raw.strip(b"\n").decode("utf-8", "replace")
                    if not event or is_comment(event):  # keep-alive pings: no data
                        return True
                    if event.endswith(DONE) and event_data(event) == DONE:
                        done = True
                    failed = upstream_error(event)
                    if failed is not None:  # in OpenAI's shape, whatever the server's
                        event = "data: " + orjson.dumps({"error": failed}).decode()
                    return relay.send(event) and failed is None

                async for chunk in resp.content.iter_any():
                    pending += chunk
                    if b"\r" in pending:  # CRLF line ends (a lone CR waits for its LF)
                        pending = pending.replace(b"\r\n", b"\n")
                    *events, pending = pending.split(b"\n\n")
                    for raw in events:
                        if not relay_one(raw):
                            stop = True
                            break
                    if stop:
                        break
                if not stop:
                    relay_one(pending)  # what came after the last blank line
        except TimeoutError:
            error = f"the stream stalled: nothing within {self.timeout.total:g}s"
            return Attempt(status, None, None, _retryable(error, "timeout"), headers)
        except (aiohttp.ClientError, OSError) as exc:
            error = f"the stream broke: {type(exc).__name__}: {exc}"
            return Attempt(status, None, None, _retryable(error, "connection_error"), headers)
        summary = getattr(relay, "summary", None)
        body = summary.body() if summary is not None else {"streamed": True}
        request_id = headers.get("x-request-id") if headers else None
        reported = summary.error if summary is not None else None
        if reported is not None:
            body["error_relayed"] = True
            message = str(reported.get("message") or "the upstream reported an error")
            code = reported.get("code")  # a string code, else the type (not vLLM's 500)
            if not isinstance(code, str) or not code:
                code = str(reported.get("type") or "stream_error")
            return Attempt(
                status, body, request_id, FatalUpstreamError(message, code=code), headers
            )
        if not done and not relay.cancelled:
            incomplete = _retryable("the stream ended before [DONE]", "stream_incomplete")
            return Attempt(status, body, request_id, incomplete, headers)
        return Attempt(status, body, request_id, None, headers)

    def _notice_keepalive(self, announced: str | None) -> None:
        if announced is None or not _KEEPALIVE_TIMEOUT_RE.search(announced):
            return
        self.close_connections = True
        logger.info(
            "upstream %s announces Keep-Alive: %s, as servers with a thread per open "
            "connection do (llama.cpp's llama-server): one connection per request from now "
            "on, so that no idle connection holds one of its threads "
            "(PROMPTQ_UPSTREAM_KEEPALIVE=on keeps them open)",
            self.base_url,
            announced,
        )

    async def server_slots(self) -> int | None:
        """How many requests a local llama.cpp server runs at once (its ``--parallel``,
        ``total_slots`` of ``GET /props``); None for anything else or no answer. Public
        hosts are not asked."""
        if needs_key(self.base_url):
            return None
        assert self._session is not None, "start() the backend first"
        root = self.base_url.removesuffix("/v1")
        try:
            async with self._session.get(
                f"{root}/props",
                headers=_CLOSE,
                timeout=aiohttp.ClientTimeout(total=CHECK_TIMEOUT_S),
            ) as resp:
                if resp.status != 200:
                    return None
                props = orjson.loads(await resp.read())
        except (TimeoutError, aiohttp.ClientError, OSError, orjson.JSONDecodeError):
            return None
        slots = props.get("total_slots") if isinstance(props, dict) else None
        return (
            slots if isinstance(slots, int) and not isinstance(slots, bool) and slots > 0 else None
        )

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
                f"{self.base_url}/models",
                headers=_CLOSE,
                timeout=aiohttp.ClientTimeout(total=CHECK_TIMEOUT_S),
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
