"""A mock OpenAI-compatible upstream (aiohttp) for the demo, the tests and the benchmarks.

``POST /v1/chat/completions`` answers ``"echo: <last user text>"`` (see
:func:`expected_content`) after an optional latency, or a fault: random ones from
:class:`MockConfig` rates, or scripted ones from ``[[mock ...]]`` directives in the
prompt (see :class:`~promptq.mock._directives.Directives`). ``POST /v1/completions``
echoes the prompt the same way and ``POST /v1/embeddings`` answers a small deterministic
vector per input. ``GET /stats`` reports :class:`MockStats`, ``POST /stats/reset`` zeroes
it, ``GET /v1/models`` lists the model. The Files and Batches endpoints of a provider's
Batch API are in memory (:mod:`promptq.mock._batches`).

``MockConfig.flavour`` makes it answer failures as vLLM, Ollama, llama.cpp's
``llama-server`` or TGI do (:mod:`promptq.mock._flavours`); ``llamacpp`` also imitates
that server's HTTP thread pool and slots (:mod:`promptq.mock._http`).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import random
import weakref
from collections.abc import Mapping
from types import TracebackType
from typing import Any, Final

import orjson
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from promptq.mock._batches import MockBatchApi
from promptq.mock._directives import (
    DIRECTIVE_MARKER,
    DirectiveError,
    Directives,
    estimate_tokens,
    expected_content,
    parse_directives,
    prompt_chars,
)
from promptq.mock._endpoints import (
    chat_stream,
    input_messages,
    moderation_bytes,
    response_bytes,
    responses_stream,
)
from promptq.mock._flavours import Facts, failure, stream_failure, stream_style
from promptq.mock._http import ConnectionGate, GatedProtocol
from promptq.mock._limits import RequestBucket
from promptq.mock._models import MockConfig, MockStats
from promptq.mock._responses import (
    completion_bytes,
    embedding_bytes,
    error_response,
    failure_response,
    fmt_seconds,
    invalid_request,
    status_error,
    success,
    success_bytes,
    to_ms,
)

__all__ = [
    "MockConfig",
    "MockServer",
    "MockStats",
    "create_app",
    "expected_content",
    "serve_forever",
]

logger = logging.getLogger(__name__)

_MARKER_BYTES: Final = DIRECTIVE_MARKER.encode()
_JSON: Final = "application/json"
# Prompts in benchmarks can be large; aiohttp's default 1 MiB cap would answer 413.
_CLIENT_MAX_SIZE: Final = 256 * 1024 * 1024  # Batch API input files: up to 200 MB
# Bounds memory of the fail=K attempt counters in long runs (oldest entries go first).
_MAX_TRACKED_BODIES: Final = 100_000
# Grace for in-flight handlers at shutdown; hung ones are released explicitly before it.
_SHUTDOWN_TIMEOUT_S: Final = 0.5

_RANDOM_FAULTS: Final = ("error", "rate_limit", "hang", "malformed", "drop")

#: the request endpoints: what they are called here, and the field holding their input
_CHAT: Final = "chat"
_COMPLETIONS: Final = "completions"
_EMBEDDINGS: Final = "embeddings"
_RESPONSES: Final = "responses"
_MODERATIONS: Final = "moderations"
#: the endpoints that stream when asked
_STREAMING: Final = frozenset({_CHAT, _RESPONSES})


class _MockState:
    """Per-app state and handlers (bound methods avoid an app-dict lookup per request)."""

    def __init__(self, config: MockConfig) -> None:
        self.config = config
        self.stats = MockStats()
        self.attempts: dict[bytes, int] = {}
        self._fault_rng = random.Random(config.seed)
        # A separate stream keeps the fault sequence independent of whether jitter is on.
        self._jitter_rng = random.Random(None if config.seed is None else config.seed ^ 0x5EED)
        self._latency_s = config.latency_ms / 1000.0
        self._jitter_s = config.jitter_ms / 1000.0
        self._released = asyncio.Event()
        bands: list[tuple[float, str]] = []
        total = 0.0
        rates = (
            config.error_rate,
            config.rate_429,
            config.hang_rate,
            config.malformed_rate,
            config.drop_rate,
        )
        for rate, kind in zip(rates, _RANDOM_FAULTS, strict=True):
            if rate > 0:
                total += rate
                bands.append((total, kind))
        self._bands = tuple(bands)
        self._bucket = RequestBucket(config.rpm_limit) if config.rpm_limit else None
        self._slots = asyncio.Semaphore(config.slots) if config.slots else None
        self._auth = None if config.api_key is None else f"Bearer {config.api_key}"
        # requests served per connection, for keepalive_max
        self._served: weakref.WeakKeyDictionary[asyncio.BaseTransport, int] = (
            weakref.WeakKeyDictionary()
        )
        self._keepalive_header: dict[str, str] = {}
        if config.flavour == "llamacpp" and config.keepalive_s is not None:
            announced = f"timeout={fmt_seconds(config.keepalive_s)}"
            if config.keepalive_max is not None:
                announced += f", max={config.keepalive_max}"
            self._keepalive_header["Keep-Alive"] = announced
            self._keepalive_header["Server"] = "llama.cpp"

    def reset(self) -> None:
        self.stats.reset()
        self.attempts.clear()

    async def on_shutdown(self, _app: web.Application) -> None:
        # Hung handlers wait on this event; without it shutdown would wait for the timeout.
        self._released.set()

    # -- endpoints -------------------------------------------------------------------

    async def chat(self, request: web.Request) -> web.StreamResponse:
        return await self._counted(request, _CHAT)

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._counted(request, _COMPLETIONS)

    async def embeddings(self, request: web.Request) -> web.StreamResponse:
        return await self._counted(request, _EMBEDDINGS)

    async def responses(self, request: web.Request) -> web.StreamResponse:
        return await self._counted(request, _RESPONSES)

    async def moderations(self, request: web.Request) -> web.StreamResponse:
        return await self._counted(request, _MODERATIONS)

    async def _counted(self, request: web.Request, endpoint: str) -> web.StreamResponse:
        # (typed as StreamResponse: a streamed answer is written here and returned done)
        stats = self.stats
        stats.requests += 1
        stats.in_flight += 1
        if stats.in_flight > stats.max_in_flight:
            stats.max_in_flight = stats.in_flight
        try:
            if self._slots is None:
                response = await self._answer(request, endpoint)
            else:
                async with self._slots:  # a self-hosted server's slots: the rest queue
                    response = await self._answer(request, endpoint)
        finally:
            stats.in_flight -= 1
        if response is not None:
            by_status = stats.responses_by_status
            by_status[response.status] = by_status.get(response.status, 0) + 1
            return response
        # Drop/hang: answer nothing. aiohttp fails to write this response to the closed
        # transport and treats it as a premature client disconnect (debug log only).
        return web.Response(status=204)

    async def models(self, _request: web.Request) -> web.Response:
        model = {"id": self.config.model, "object": "model", "created": 0, "owned_by": "mock"}
        payload = {"object": "list", "data": [model]}
        return web.Response(body=orjson.dumps(payload), content_type=_JSON)

    async def props(self, _request: web.Request) -> web.Response:
        """llama-server's ``GET /props``: its slot count and context (llamacpp flavour)."""
        config = self.config
        payload = {
            "default_generation_settings": {"n_ctx": config.context_tokens},
            "total_slots": config.slots,
            "model_path": f"models/{config.model}.gguf",
            "build_info": "b0000-mock",
        }
        return web.Response(body=orjson.dumps(payload), content_type=_JSON)

    async def stats_view(self, _request: web.Request) -> web.Response:
        return web.Response(body=orjson.dumps(self.stats.as_dict()), content_type=_JSON)

    async def stats_reset(self, _request: web.Request) -> web.Response:
        self.reset()
        return web.Response(body=orjson.dumps(self.stats.as_dict()), content_type=_JSON)

    async def on_response_prepare(self, request: web.Request, response: web.StreamResponse) -> None:
        """llama-server's connection rules on every answer: the Keep-Alive announcement,
        and the connection closed after ``keepalive_max`` requests or any error."""
        if self.config.flavour == "llamacpp" and response.status >= 400:
            _close_after(response)  # llama-server answers every error Connection: close
            return
        if self._keepalive_header:
            response.headers.update(self._keepalive_header)
        limit = self.config.keepalive_max
        transport = request.transport
        if limit is None or transport is None:
            return
        served = self._served.get(transport, 0) + 1
        self._served[transport] = served
        if served >= limit:
            _close_after(response)

    def flavoured(
        self,
        kind: str,
        model: str | None = None,
        *,
        path: str = "/v1/chat/completions",
        **facts: Any,
    ) -> web.Response | None:
        """The flavour's answer for failure ``kind`` (None: that server would succeed)."""
        config = self.config
        context = config.context_tokens or 4096
        found = failure(
            config.flavour,
            kind,
            Facts(model=model or config.model, path=path, context_tokens=context, **facts),
        )
        return None if found is None else failure_response(found)

    # -- the request endpoints -------------------------------------------------------

    async def _answer(self, request: web.Request, endpoint: str) -> web.StreamResponse | None:
        raw = await request.read()
        if self._auth is not None and request.headers.get("Authorization") != self._auth:
            refused = self.flavoured("auth", path=request.path)
            if refused is not None:
                return refused
        if endpoint == _EMBEDDINGS and not self.config.embeddings:
            refused = self.flavoured("unsupported", path=request.path)
            if refused is not None:
                return refused
        parsed = self._parse(raw, endpoint, request.path)
        if isinstance(parsed, web.Response):
            return parsed
        body, messages, model = parsed
        limited = self._enforce(model)
        if limited is not None:
            return limited
        context = self.config.context_tokens
        if context is not None:
            tokens = estimate_tokens(prompt_chars(messages))
            if tokens > context:
                max_tokens = body.get("max_tokens")
                refused = self.flavoured(
                    "too_large" if endpoint == _EMBEDDINGS else "context",
                    model,
                    path=request.path,
                    prompt_tokens=tokens,
                    max_tokens=max_tokens if isinstance(max_tokens, int) else 16,
                )
                if refused is not None:
                    return refused
        if _MARKER_BYTES in raw:
            try:
                directives = parse_directives(messages)
            except DirectiveError as exc:
                return invalid_request(str(exc))
            if directives is not None:
                return await self._scripted(
                    request, raw, endpoint, body, messages, model, directives
                )
        latency = self._default_latency()
        if latency > 0:
            await asyncio.sleep(latency)
        if self._bands:
            roll = self._fault_rng.random()
            for threshold, kind in self._bands:
                if roll < threshold:
                    return await self._random_fault(request, kind, endpoint, body, messages, model)
        if body.get("stream"):
            return await self._stream(request, endpoint, body, messages, model, None)
        response = success(self._success_bytes(endpoint, body, messages, model))
        if self._bucket is not None:
            response.headers.update(self._bucket.headers())
        return response

    async def _stream(
        self,
        request: web.Request,
        endpoint: str,
        body: Mapping[str, Any],
        messages: list[dict[str, Any]],
        model: str,
        directives: Directives | None,
    ) -> web.StreamResponse | None:
        """Server-Sent Events, ``stream_interval_ms`` apart, shaped as the flavour's server
        shapes them; ``cut=K`` drops the connection after K events, ``error_at=K`` ends
        the stream after K events with the flavour's error events. A client that leaves
        is counted in ``streams_cancelled``."""
        config, stats = self.config, self.stats
        chunks = config.stream_chunks
        interval_s = config.stream_interval_ms / 1000.0
        cut = error_at = None
        if directives is not None:
            chunks = directives.chunks if directives.chunks is not None else chunks
            if directives.interval_ms is not None:
                interval_s = directives.interval_ms / 1000.0
            cut, error_at = directives.cut, directives.error_at
        if endpoint == _CHAT:
            style = stream_style(config.flavour)
            events = chat_stream(body, messages, model, expected_content(body), chunks, style)
        else:
            events = responses_stream(body, messages, model, chunks)
        stats.streams += 1
        response = web.StreamResponse(
            headers={
                "Content-Type": "text/event-stream",
                "Cache-Control": "no-cache",
                "x-request-id": "req_" + os.urandom(12).hex(),
            }
        )
        try:
            await response.prepare(request)
            for index, event in enumerate(events):
                if cut is not None and index >= cut:
                    stats.drops += 1
                    _close(request)
                    return None
                if error_at is not None and index >= error_at:
                    failed = "generation failed midway (mock error_at)"
                    for error in stream_failure(config.flavour, failed):
                        await response.write(error)
                    break
                if index and interval_s > 0:
                    await asyncio.sleep(interval_s)
                await response.write(event)
            await response.write_eof()
        except (asyncio.CancelledError, ConnectionResetError):
            stats.streams_cancelled += 1  # the client left mid-stream
            raise
        return response

    def _enforce(self, model: str) -> web.Response | None:
        """The enforcing modes: a 429 when over capacity or over the RPM limit."""
        capacity = self.config.max_concurrency
        if capacity is not None and self.stats.in_flight > capacity:
            self.stats.rate_limited += 1
            return status_error(429, model, retry_after=0.1, retry_after_ms=100)
        if self._bucket is not None:
            wait_s = self._bucket.take()
            if wait_s > 0:
                self.stats.rate_limited += 1
                response = status_error(
                    429, model, retry_after=wait_s, retry_after_ms=wait_s * 1000
                )
                response.headers.update(self._bucket.headers())
                return response
        return None

    def _success_bytes(
        self, endpoint: str, body: Mapping[str, Any], messages: list[dict[str, Any]], model: str
    ) -> bytes:
        if endpoint == _CHAT:
            return success_bytes(body, messages, model)
        if endpoint == _RESPONSES:
            return response_bytes(body, messages, model)
        texts = [str(message["content"]) for message in messages]
        if endpoint == _COMPLETIONS:
            return completion_bytes(texts[0], model)
        if endpoint == _MODERATIONS:
            return moderation_bytes(texts, model or "omni-moderation-latest")
        return embedding_bytes(texts, model)

    def _parse(
        self, raw: bytes, endpoint: str, path: str
    ) -> tuple[dict[str, Any], list[dict[str, Any]], str] | web.Response:
        """(body, its text as chat messages, model), or the answer to a bad request."""
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError:
            answer = self.flavoured("parse", path=path)
            return answer or invalid_request("We could not parse the JSON body of your request.")
        if not isinstance(body, dict):
            return invalid_request("The request body must be a JSON object.")
        if endpoint == _CHAT:
            messages = body.get("messages")
            if not isinstance(messages, list) or not messages:
                return invalid_request("'messages' is required and must be a non-empty array.")
            for index, message in enumerate(messages):
                if not isinstance(message, dict):
                    return invalid_request(
                        f"Invalid type for 'messages[{index}]': expected an object."
                    )
        elif endpoint == _RESPONSES:
            found = input_messages(body.get("input"))
            if found is None:
                return invalid_request(
                    "'input' is required: a string or an array of input items.", "input"
                )
            messages = found
        else:
            field = "prompt" if endpoint == _COMPLETIONS else "input"
            value = body.get(field)
            texts = [value] if isinstance(value, str) else value
            if (
                not isinstance(texts, list)
                or not texts
                or not all(isinstance(text, str) for text in texts)
                or (endpoint == _COMPLETIONS and len(texts) != 1)
            ):
                what = "a string" if endpoint == _COMPLETIONS else "a string or an array of strings"
                return invalid_request(f"'{field}' is required and must be {what}.", field)
            messages = [{"role": "user", "content": text} for text in texts]
        if body.get("stream") and endpoint not in _STREAMING:
            return invalid_request(
                "Streaming (stream=true) is served for chat completions and responses only.",
                "stream",
            )
        model = body.get("model")
        if model is None:
            model = self.config.model
        elif not isinstance(model, str) or not model:
            return invalid_request("'model' must be a non-empty string.", "model")
        return body, messages, model

    def _default_latency(self) -> float:
        if self._jitter_s > 0:
            return self._latency_s + self._jitter_rng.uniform(0.0, self._jitter_s)
        return self._latency_s

    def _malformed(
        self, endpoint: str, body: Mapping[str, Any], messages: list[dict[str, Any]], model: str
    ) -> web.Response:
        self.stats.malformed += 1
        full = self._success_bytes(endpoint, body, messages, model)
        # Half an object is never valid JSON: the closing brace is always cut off.
        return success(full[: len(full) // 2])

    def _drop(self, request: web.Request) -> None:
        self.stats.drops += 1
        _close(request)

    async def _hang(self, request: web.Request) -> None:
        self.stats.hangs += 1
        # Ends on server shutdown; a client disconnect cancels the handler instead
        # (MockServer runs with handler_cancellation=True).
        await self._released.wait()
        _close(request)

    async def _random_fault(
        self,
        request: web.Request,
        kind: str,
        endpoint: str,
        body: Mapping[str, Any],
        messages: list[dict[str, Any]],
        model: str,
    ) -> web.Response | None:
        if kind == "error":
            return status_error(500, model)
        if kind == "rate_limit":
            wait = self.config.retry_after_s
            return status_error(429, model, retry_after=wait, retry_after_ms=to_ms(wait))
        if kind == "hang":
            await self._hang(request)
            return None
        if kind == "malformed":
            return self._malformed(endpoint, body, messages, model)
        self._drop(request)
        return None

    async def _scripted(
        self,
        request: web.Request,
        raw: bytes,
        endpoint: str,
        body: dict[str, Any],
        messages: list[dict[str, Any]],
        model: str,
        directives: Directives,
    ) -> web.StreamResponse | None:
        faulty = directives.has_fault
        if faulty and directives.fail is not None:
            # Counted on arrival (before latency) so concurrent retries see distinct attempts.
            key = _body_key(body, raw)
            attempt = self.attempts.pop(key, 0) + 1
            if len(self.attempts) >= _MAX_TRACKED_BODIES:
                del self.attempts[next(iter(self.attempts))]
            self.attempts[key] = attempt
            faulty = attempt <= directives.fail
        if directives.latency_ms is not None:
            latency = directives.latency_ms / 1000.0
        else:
            latency = self._default_latency()
        if latency > 0:
            await asyncio.sleep(latency)
        if not faulty or directives.cut is not None or directives.error_at is not None:
            if body.get("stream"):
                return await self._stream(request, endpoint, body, messages, model, directives)
            return success(self._success_bytes(endpoint, body, messages, model))
        if directives.drop:
            self._drop(request)
            return None
        if directives.hang:
            await self._hang(request)
            return None
        if directives.malformed:
            return self._malformed(endpoint, body, messages, model)
        if directives.error is not None:
            answer = self.flavoured(directives.error, model, path=request.path)
            if answer is None:  # this server would have answered
                return success(self._success_bytes(endpoint, body, messages, model))
            return answer
        status = 429 if directives.quota else directives.status
        assert status is not None  # has_fault without drop/hang/malformed/quota
        retry_after, retry_after_ms = directives.retry_after, directives.retry_after_ms
        if (
            status == 429
            and not directives.quota
            and retry_after is None
            and retry_after_ms is None
        ):
            retry_after = self.config.retry_after_s
            retry_after_ms = to_ms(retry_after)
        return status_error(
            status,
            model,
            quota=directives.quota,
            retry_after=retry_after,
            retry_after_ms=retry_after_ms,
        )


def _body_key(body: dict[str, Any], raw: bytes) -> bytes:
    """Identity of "the same request" across retries: hash of the canonical JSON body."""
    try:
        canonical = orjson.dumps(body, option=orjson.OPT_SORT_KEYS)
    except orjson.JSONEncodeError:  # pragma: no cover - loads output always re-encodes
        canonical = raw
    return hashlib.blake2b(canonical, digest_size=16).digest()


def _close_after(response: web.StreamResponse) -> None:
    """Close the connection after ``response``, and say so (this runs in the prepare
    signal, after aiohttp chose its headers: ``force_close`` alone would not)."""
    response.force_close()
    response.headers["Connection"] = "close"
    response.headers.pop("Keep-Alive", None)


def _close(request: web.Request) -> None:
    transport = request.transport
    if transport is not None:
        transport.close()


class _HttpLogger(logging.LoggerAdapter[logging.Logger]):
    """aiohttp's protocol logger, minus tracebacks for malformed HTTP from clients.

    aiohttp logs garbage on the socket (no Host header, TLS on the HTTP port, ...) with a
    full traceback; here that is one WARNING line. Handler bugs keep their traceback.
    """

    def exception(self, msg: object, *args: object, **kwargs: Any) -> None:
        exc = kwargs.get("exc_info")
        if isinstance(exc, HttpProcessingError):
            self.warning("mock upstream: rejected malformed HTTP (%s: %s)", exc.code, exc.message)
        else:
            super().exception(msg, *args, **kwargs)


_HTTP_LOGGER: Final = _HttpLogger(logging.getLogger(__name__ + ".http"))

_STATE_KEY: Final = web.AppKey("promptq_mock_state", _MockState)


def _error_middleware(state: _MockState) -> Any:
    @web.middleware
    async def errors(request: web.Request, handler: Any) -> web.StreamResponse:
        """aiohttp's plain-text 404/405/413 as the flavour's (or OpenAI's) error bodies."""
        try:
            response: web.StreamResponse = await handler(request)
            return response
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            if exc.status == 404:
                answer = state.flavoured("path", path=request.path, method=request.method)
                if answer is not None:
                    return answer
            return error_response(exc.status, exc.reason, type_="invalid_request_error", code=None)

    return errors


def create_app(config: MockConfig | None = None) -> web.Application:
    """Build the mock upstream application for ``config`` (defaults: ``MockConfig()``).

    Hung requests are released (their connection closed) when the app shuts down. Run it
    with ``handler_cancellation=True`` (as :class:`MockServer` does) so a client giving up
    also ends its handler and ``in_flight`` stays accurate.
    """
    state = _MockState(config if config is not None else MockConfig())
    app = web.Application(middlewares=[_error_middleware(state)], client_max_size=_CLIENT_MAX_SIZE)
    app[_STATE_KEY] = state
    app.router.add_post("/v1/chat/completions", state.chat)
    app.router.add_post("/v1/completions", state.completions)
    app.router.add_post("/v1/embeddings", state.embeddings)
    app.router.add_post("/v1/responses", state.responses)
    app.router.add_post("/v1/moderations", state.moderations)
    app.router.add_get("/v1/models", state.models)
    if state.config.flavour == "llamacpp":
        app.router.add_get("/props", state.props)
    app.router.add_get("/stats", state.stats_view)
    app.router.add_post("/stats/reset", state.stats_reset)
    app.on_shutdown.append(state.on_shutdown)
    if state.config.keepalive_max is not None or state.config.flavour == "llamacpp":
        app.on_response_prepare.append(state.on_response_prepare)
    MockBatchApi(state.config, state.stats).routes(app)
    return app


class MockServer:
    """Async context manager running :func:`create_app` on ``host:port`` (0 = free port).

    ``url`` (base URL ending in ``/v1``) is valid inside the ``async with`` block; ``stats``
    is the live :class:`MockStats`. Exit closes hung connections and waits at most
    ~0.5 s for other in-flight handlers before cancelling them.
    """

    def __init__(
        self, config: MockConfig | None = None, *, host: str = "127.0.0.1", port: int = 0
    ) -> None:
        self.config = config if config is not None else MockConfig()
        self.app = create_app(self.config)
        self._state = self.app[_STATE_KEY]
        self.stats: MockStats = self._state.stats
        self._host = host
        self._port = port
        self._runner: web.AppRunner | None = None
        self._listener: asyncio.Server | None = None
        self._gate: ConnectionGate | None = None
        self._url: str | None = None

    @property
    def url(self) -> str:
        """Base URL ending in ``/v1``, e.g. ``http://127.0.0.1:43125/v1``."""
        if self._url is None:
            raise RuntimeError("MockServer is not running (use `async with MockServer()`)")
        return self._url

    def reset(self) -> None:
        """Zero the stats and forget ``fail=K`` attempt counts (same as ``POST /stats/reset``)."""
        self._state.reset()

    async def start(self) -> None:
        """Bind and start serving; sets ``url``."""
        keepalive: dict[str, Any] = {}
        if self.config.keepalive_s is not None:
            keepalive["keepalive_timeout"] = self.config.keepalive_s
        runner = web.AppRunner(
            self.app,
            access_log=None,  # thousands of req/s in benchmarks: no per-request logging
            handler_cancellation=True,
            logger=_HTTP_LOGGER,
            shutdown_timeout=_SHUTDOWN_TIMEOUT_S,
            **keepalive,
        )
        await runner.setup()
        server = runner.server
        assert server is not None
        gate = ConnectionGate(self.config.http_threads, self.stats)
        try:
            # A deep accept queue: benchmarks open hundreds of connections at once, and the
            # default backlog (128) drops some, which shows up as seconds-late requests.
            listener = await asyncio.get_running_loop().create_server(
                lambda: GatedProtocol(gate, server), self._host, self._port, backlog=4096
            )
        except BaseException:
            await runner.cleanup()
            raise
        self._runner, self._listener, self._gate = runner, listener, gate
        port = listener.sockets[0].getsockname()[1]
        host = f"[{self._host}]" if ":" in self._host else self._host
        self._url = f"http://{host}:{port}/v1"

    async def stop(self) -> None:
        """Stop serving; idempotent."""
        runner, self._runner = self._runner, None
        listener, self._listener = self._listener, None
        if listener is not None:
            listener.close()
        if self._gate is not None:
            self._gate.close_waiting()
        if runner is not None:
            await runner.cleanup()
        if listener is not None:
            await listener.wait_closed()

    async def __aenter__(self) -> MockServer:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()


async def serve_forever(config: MockConfig, *, host: str, port: int) -> None:
    """Run the mock on ``host:port`` until cancelled; logs the base URL at INFO."""
    async with MockServer(config, host=host, port=port) as server:
        logger.info("mock LLM upstream listening on %s", server.url)
        await asyncio.Event().wait()
