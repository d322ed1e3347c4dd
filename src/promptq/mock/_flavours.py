"""How each OpenAI-compatible server shapes its answers, for ``mock-llm --flavour``.

promptq talks to OpenAI and to self-hosted servers that copy its API but not its error
bodies. A :class:`Flavour` answers one *kind* of failure the way that server does, with
the status code and body its source produces (llama.cpp's bodies are the ones a real
``llama-server`` answered, see the issue that asked for this); the tests run promptq's
classifier against every flavour. Kinds:

==============  =================================================================
``context``     the prompt is longer than the context
``parse``       the request body is not valid JSON
``invalid``     any other invalid request (``status=400``)
``auth``        a wrong or missing API key (the mock was started with one)
``model``       an unknown model
``path``        an unknown URL path
``busy``        overloaded, no free slot, too many queued requests
``loading``     the model is still loading
``unsupported`` the endpoint is switched off (llama.cpp's embeddings without ``--embeddings``)
``too_large``   an embeddings input over the physical batch size (llama.cpp)
``server``      an internal error (``status=5xx``)
==============  =================================================================

A kind a server cannot produce falls back to the nearest it can (Ollama truncates long
prompts and has no key check: its ``context`` is a success, its ``auth`` a proxy's 401).

Streams: :func:`stream_style` says how each server's chat chunks differ from OpenAI's
(fingerprint, nulls, roles, llama.cpp's timings and keep-alive pings), and
:func:`stream_failure` gives the events it sends when generation fails midway.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final

import orjson

__all__ = [
    "FLAVOURS",
    "KINDS",
    "Failure",
    "StreamStyle",
    "failure",
    "stream_failure",
    "stream_style",
]

FLAVOURS: Final = ("openai", "vllm", "ollama", "llamacpp", "tgi")
KINDS: Final = (
    "context",
    "parse",
    "invalid",
    "auth",
    "model",
    "path",
    "busy",
    "loading",
    "unsupported",
    "too_large",
    "server",
)


@dataclass(frozen=True, slots=True)
class Failure:
    """One failed answer: status, JSON body (None: an empty body) and extra headers."""

    status: int
    body: Any
    headers: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class Facts:
    """What the failure is about (fills the servers' message templates)."""

    model: str
    method: str = "POST"
    path: str = "/v1/chat/completions"
    prompt_tokens: int = 0
    max_tokens: int = 16
    context_tokens: int = 512
    status: int = 500


def failure(flavour: str, kind: str, facts: Facts) -> Failure | None:
    """The answer ``flavour`` gives for ``kind`` (None: this server would answer normally)."""
    return _BUILDERS[flavour](kind, facts)


# -- OpenAI ----------------------------------------------------------------------------


def _openai_error(
    status: int, message: str, type_: str, code: str | None, param: str | None = None
) -> Failure:
    return Failure(
        status, {"error": {"message": message, "type": type_, "param": param, "code": code}}
    )


def _openai(kind: str, f: Facts) -> Failure | None:
    if kind == "context":
        return _openai_error(
            400,
            f"This model's maximum context length is {f.context_tokens} tokens. However, your "
            f"messages resulted in {f.prompt_tokens} tokens. Please reduce the length of the "
            "messages.",
            "invalid_request_error",
            "context_length_exceeded",
            "messages",
        )
    if kind == "parse":
        return _openai_error(
            400,
            "We could not parse the JSON body of your request. (HINT: This likely means you "
            "aren't using your HTTP library correctly. The OpenAI API expects a JSON payload, "
            "but what was sent was not valid JSON.)",
            "invalid_request_error",
            None,
        )
    if kind == "auth":
        return _openai_error(
            401,
            "Incorrect API key provided: sk-****. You can find your API key at "
            "https://platform.openai.com/account/api-keys.",
            "invalid_request_error",
            "invalid_api_key",
        )
    if kind == "model":
        return _openai_error(
            404,
            f"The model `{f.model}` does not exist or you do not have access to it.",
            "invalid_request_error",
            "model_not_found",
        )
    if kind in ("path", "unsupported"):
        return _openai_error(
            404, f"Invalid URL ({f.method} {f.path})", "invalid_request_error", None
        )
    if kind in ("busy", "loading"):
        return _openai_error(
            503, "The engine is currently overloaded, please try again later", "server_error", None
        )
    if kind == "too_large":
        return _openai_error(
            400,
            f"This model's maximum context length is {f.context_tokens} tokens, however you "
            f"requested {f.prompt_tokens} tokens. Please reduce your prompt.",
            "invalid_request_error",
            None,
        )
    if kind == "invalid":
        return _openai_error(400, "Invalid request (mock).", "invalid_request_error", None)
    return _openai_error(
        f.status,
        "The server had an error while processing your request. Sorry about that!",
        "server_error",
        None,
    )


# -- vLLM (its OpenAI-compatible server: ErrorResponse, FastAPI) -----------------------


def _vllm_error(status: int, message: str, type_: str, param: str | None = None) -> Failure:
    # vLLM's ErrorResponse as nested under "error" since v0.10.1; before, the same fields
    # were top-level with "object": "error" (promptq reads both; tests/test_retry.py)
    return Failure(
        status, {"error": {"message": message, "type": type_, "param": param, "code": status}}
    )


def _vllm(kind: str, f: Facts) -> Failure | None:
    if kind in ("context", "too_large"):
        return _vllm_error(
            400,
            f"This model's maximum context length is {f.context_tokens} tokens. However, your "
            f"request has {f.prompt_tokens} input tokens. Please reduce the length of the "
            "input messages.",
            "BadRequestError",
            "input_tokens",
        )
    if kind == "parse":
        return _vllm_error(
            400,
            "1 validation error:\n  {'type': 'json_invalid', 'loc': ('body', 0), 'msg': 'JSON "
            "decode error', 'input': {}, 'ctx': {'error': 'Expecting value'}}",
            "Bad Request",
            "body.0",
        )
    if kind == "auth":
        return Failure(401, {"error": "Unauthorized"})
    if kind == "model":
        return _vllm_error(404, f"The model `{f.model}` does not exist.", "NotFoundError")
    if kind in ("path", "unsupported"):
        return Failure(404, {"detail": "Not Found"})
    if kind in ("busy", "loading"):
        # vLLM itself queues every request and does not serve until loaded: a 503 here
        # is the load balancer or Kubernetes service in front of a pod that is not ready
        return _vllm_error(503, "Service Unavailable", "ServiceUnavailableError")
    if kind == "invalid":
        return _vllm_error(400, "Invalid request (mock).", "BadRequestError")
    return _vllm_error(
        f.status, "EngineCore encountered an issue. See stack trace", "InternalServerError"
    )


# -- Ollama (its OpenAI-compatible /v1 API) ---------------------------------------------


def _ollama_error(status: int, message: str, type_: str = "api_error") -> Failure:
    return Failure(
        status, {"error": {"message": message, "type": type_, "param": None, "code": None}}
    )


def _ollama(kind: str, f: Facts) -> Failure | None:
    if kind == "context":
        return None  # Ollama truncates the prompt to num_ctx and answers
    if kind == "too_large":
        return _ollama_error(400, "the input length exceeds the context length")
    if kind == "parse":
        return _ollama_error(
            400, "invalid character 'x' looking for beginning of value", "invalid_request_error"
        )
    if kind == "auth":
        return Failure(401, {"error": "unauthorized"})  # a proxy in front: Ollama has no keys
    if kind == "model":
        return _ollama_error(404, f"model '{f.model}' not found", "not_found_error")
    if kind in ("path", "unsupported"):
        return Failure(404, None)  # Go's mux: "404 page not found" in text/plain
    if kind == "busy":
        return _ollama_error(
            503, "server busy, please try again.  maximum pending requests exceeded"
        )
    if kind == "loading":
        return None  # Ollama loads the model inside the request and answers late
    if kind == "invalid":
        return _ollama_error(400, "invalid request (mock)", "invalid_request_error")
    return _ollama_error(f.status, "an error was encountered while running the model")


# -- llama.cpp's llama-server (format_error_response) -----------------------------------


def _llamacpp_error(status: int, message: str, type_: str, **extra: Any) -> Failure:
    return Failure(status, {"error": {"code": status, "message": message, "type": type_, **extra}})


def _llamacpp(kind: str, f: Facts) -> Failure | None:
    if kind == "context":
        return _llamacpp_error(
            400,
            f"request ({f.prompt_tokens} tokens) exceeds the available context size "
            f"({f.context_tokens} tokens), try increasing it",
            "exceed_context_size_error",
            n_prompt_tokens=f.prompt_tokens,
            n_ctx=f.context_tokens,
        )
    if kind == "parse":
        return _llamacpp_error(
            500,
            "[json.exception.parse_error.101] parse error at line 1, column 1: syntax error "
            "while parsing value - invalid literal; last read: 'x'",
            "server_error",
        )
    if kind == "too_large":
        return _llamacpp_error(
            500,
            f"input ({f.prompt_tokens} tokens) is too large to process. increase the physical "
            f"batch size (current batch size: {f.context_tokens})",
            "server_error",
        )
    if kind == "unsupported":
        return _llamacpp_error(
            501,
            "This server does not support embeddings. Start it with `--embeddings`",
            "not_supported_error",
        )
    if kind == "auth":
        # this one is built by a different function in the server: other key order
        return Failure(
            401,
            {"error": {"message": "Invalid API Key", "type": "authentication_error", "code": 401}},
        )
    if kind in ("path", "model"):  # llama-server serves its one model whatever the name
        return Failure(
            404, {"error": {"message": "File Not Found", "type": "not_found_error", "code": 404}}
        )
    if kind == "loading":
        return _llamacpp_error(503, "Loading model", "unavailable_error")
    if kind == "busy":  # queued by default; /slots?fail_on_no_slot=1 answers this
        return _llamacpp_error(503, "no slot available", "unavailable_error")
    if kind == "invalid":
        return _llamacpp_error(400, "Invalid request (mock)", "invalid_request_error")
    return _llamacpp_error(f.status, "Internal server error (mock)", "server_error")


# -- Hugging Face TGI (router: ErrorResponse {error, error_type}) -----------------------


def _tgi_error(status: int, message: str, error_type: str) -> Failure:
    return Failure(status, {"error": message, "error_type": error_type})


def _tgi(kind: str, f: Facts) -> Failure | None:
    if kind in ("context", "too_large"):
        return _tgi_error(
            422,
            "Input validation error: `inputs` tokens + `max_new_tokens` must be <= "
            f"{f.context_tokens}. Given: {f.prompt_tokens} `inputs` tokens and {f.max_tokens} "
            "`max_new_tokens`",
            "validation",
        )
    if kind == "parse":
        return Failure(
            400,
            "Failed to parse the request body as JSON: expected value at line 1 column 1",
            (("Content-Type", "text/plain; charset=utf-8"),),
        )
    if kind == "auth":
        return Failure(401, None)  # TGI's --api-key check answers an empty 401
    if kind in ("path", "unsupported"):
        return Failure(404, None)
    if kind == "busy":
        return _tgi_error(429, "Model is overloaded", "overloaded")
    if kind == "loading":
        return _tgi_error(503, "Model is loading", "unhealthy")
    if kind == "model":
        return None  # TGI serves its one model whatever the name
    if kind == "invalid":
        return _tgi_error(422, "Input validation error: invalid request (mock)", "validation")
    return _tgi_error(
        424 if f.status == 500 else f.status,
        "Request failed during generation: Server error: CUDA out of memory (mock)",
        "generation",
    )


# -- streams ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class StreamStyle:
    """How one server's streamed chat chunks differ from OpenAI's.

    * ``fingerprint``: its ``system_fingerprint`` (``...`` absent: vLLM leaves unset
      fields out of its chunks);
    * ``usage_null``: ``"usage": null`` in every chunk (OpenAI only when usage is asked
      for; TGI always; vLLM and Ollama never);
    * ``role_every_delta``: every delta repeats ``"role": "assistant"`` (Ollama, TGI);
    * ``logprobs``: ``"logprobs": null`` in each choice;
    * ``timings``: llama.cpp's ``timings`` object in its last chunks;
    * ``ping``: an SSE comment (``:``) first, as ``llama-server`` sends while a long
      prompt is processed.
    """

    fingerprint: Any = None
    usage_null: str = "asked"  # "asked", "always", "never"
    role_every_delta: bool = False
    logprobs: bool = True
    timings: bool = False
    ping: bool = False


_STYLES: Final = {
    "openai": StreamStyle(),
    "vllm": StreamStyle(fingerprint=..., usage_null="never"),
    "ollama": StreamStyle(
        fingerprint="fp_ollama", usage_null="never", role_every_delta=True, logprobs=False
    ),
    "llamacpp": StreamStyle(fingerprint="b6000-mock", usage_null="never", timings=True, ping=True),
    "tgi": StreamStyle(fingerprint="3.3.4-native", usage_null="always", role_every_delta=True),
}


def stream_style(flavour: str) -> StreamStyle:
    return _STYLES[flavour]


def stream_failure(flavour: str, message: str) -> list[bytes]:
    """The events ``flavour``'s server sends when generation fails midway (the HTTP status
    is 200 already): an error in the data, in each server's own shape; vLLM then ends the
    stream with ``[DONE]``, the others just end it."""
    body: Any
    if flavour == "tgi":  # the router's ErrorResponse as an event
        body = {"error": message, "error_type": "generation"}
    elif flavour == "vllm":
        body = {"error": {"message": message, "type": "InternalServerError", "param": None,
                          "code": 500}}  # fmt: skip
    elif flavour == "llamacpp":
        body = {"error": {"code": 500, "message": message, "type": "server_error"}}
    elif flavour == "ollama":
        body = {"error": {"message": message, "type": "api_error", "param": None, "code": None}}
    else:
        body = {"error": {"message": message, "type": "server_error", "param": None,
                          "code": None}}  # fmt: skip
    events = [b"data: " + orjson.dumps(body) + b"\n\n"]
    if flavour == "vllm":
        events.append(b"data: [DONE]\n\n")
    return events


_BUILDERS: Final = {
    "openai": _openai,
    "vllm": _vllm,
    "ollama": _ollama,
    "llamacpp": _llamacpp,
    "tgi": _tgi,
}
