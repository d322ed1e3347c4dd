"""The ``python:MODULE:FUNCTION`` backend: local inference and custom code.

``FUNCTION(endpoint: str, body: dict) -> dict`` is called once per attempt; the dict it
returns is the response body, recorded with status 200. Async doesn't help CPU-bound
work such as local inference, so:

* a plain ``def`` runs through ``loop.run_in_executor`` in a pool of
  ``--backend-threads N`` threads (default 1: code that releases the GIL, e.g. most
  native inference libraries, or blocking I/O), or of ``--backend-processes N``
  processes (pure-Python code that holds the GIL); the event loop stays free for
  heartbeats, claims and results while it runs;
* an ``async def`` is awaited on the loop (it must not block it).

Raising ``promptq.BackendError(message, status_code=, code=, retryable=)`` records that
error (retried when ``retryable``); any other exception is code ``backend_error`` with
its message, not retried. ``PROMPTQ_TIMEOUT_S`` bounds each attempt: an ``async def``
is cancelled, a pool's call is abandoned (it finishes in the background, its answer
unused). With a pool, the worker takes no more requests at a time than the pool has
threads or processes, so no request waits inside the worker (its timeout running)
while another worker could run it. For a function that takes well under a millisecond,
claims then dominate: make it ``async def``, or give it more threads.
"""

from __future__ import annotations

import asyncio
import importlib
import inspect
import multiprocessing
import uuid
from collections.abc import Callable
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from functools import cache
from typing import Any

import orjson

from promptq.shared.errors import (
    BackendError,
    ConfigError,
    FatalUpstreamError,
    RetryableUpstreamError,
    UpstreamError,
)
from promptq.worker.backends import NO_HEADERS, Attempt, Relay

PREFIX = "python:"
_ERROR_TYPE = "backend_error"


def parse_spec(spec: str) -> tuple[str, str]:
    """``python:pkg.mod:func`` -> ``("pkg.mod", "func")``; ``ConfigError`` otherwise."""
    if not spec.startswith(PREFIX):
        raise ConfigError(
            f"unknown backend {spec!r}: use 'openai' or 'python:MODULE:FUNCTION' "
            "(PROMPTQ_BACKEND, --backend)"
        )
    module, sep, function = spec.removeprefix(PREFIX).rpartition(":")
    if not sep or not module or not function:
        raise ConfigError(
            f"backend {spec!r}: expected python:MODULE:FUNCTION, e.g. python:mypkg.infer:answer"
        )
    return module, function


def import_function(module_name: str, function_name: str) -> Callable[..., Any]:
    """The function, or a ``ConfigError`` that says what is missing and how to fix it."""
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(
            f"backend python:{module_name}:{function_name}: cannot import module "
            f"{module_name!r} ({exc}); is it installed, or on PYTHONPATH?"
        ) from exc
    except Exception as exc:
        raise ConfigError(
            f"backend python:{module_name}:{function_name}: importing {module_name!r} "
            f"failed: {type(exc).__name__}: {exc}"
        ) from exc
    function = getattr(module, function_name, None)
    if function is None:
        raise ConfigError(
            f"backend python:{module_name}:{function_name}: module {module_name!r} has no "
            f"{function_name!r}"
        )
    if not callable(function):
        raise ConfigError(
            f"backend python:{module_name}:{function_name}: {function_name!r} is not a function"
        )
    return function  # type: ignore[no-any-return]


@cache
def _child_function(module_name: str, function_name: str) -> Callable[..., Any]:
    return import_function(module_name, function_name)


def _call_in_child(module_name: str, function_name: str, endpoint: str, body: Any) -> Any:
    """Runs in a pool process: import once, call."""
    return _child_function(module_name, function_name)(endpoint, body)


class PythonBackend:
    """Calls a Python function for each attempt (see the module docstring)."""

    def __init__(
        self,
        function: Callable[..., Any],
        *,
        module_name: str,
        function_name: str,
        threads: int = 1,
        processes: int | None = None,
        timeout_s: float = 60.0,
    ) -> None:
        self.function = function
        self.module_name = module_name
        self.function_name = function_name
        self.label = f"{PREFIX}{module_name}:{function_name}"
        self.is_async = inspect.iscoroutinefunction(function)
        self.threads = threads
        self.processes = processes
        self.timeout_s = timeout_s
        self._pool: Executor | None = None
        self._in_flight = 0
        if self.is_async:
            self.parallelism: int | None = None
        else:
            # no request waits inside the worker for a thread (its timeout would run
            # while it waits, and another worker could have run it)
            self.parallelism = processes or threads

    @classmethod
    def from_spec(
        cls, spec: str, *, threads: int = 1, processes: int | None = None, timeout_s: float = 60.0
    ) -> PythonBackend:
        module_name, function_name = parse_spec(spec)
        function = import_function(module_name, function_name)
        return cls(
            function,
            module_name=module_name,
            function_name=function_name,
            threads=threads,
            processes=processes,
            timeout_s=timeout_s,
        )

    def __repr__(self) -> str:
        pool = (
            "async"
            if self.is_async
            else f"{self.processes} process(es)"
            if self.processes
            else f"{self.threads} thread(s)"
        )
        return f"PythonBackend({self.label}, {pool})"

    @property
    def in_flight(self) -> int:
        return self._in_flight

    async def start(self) -> None:
        if self.is_async:
            return
        if self.processes:
            # spawn, not fork: the worker runs threads and an event loop, which a forked
            # child would inherit half-copied
            self._pool = ProcessPoolExecutor(
                max_workers=self.processes, mp_context=multiprocessing.get_context("spawn")
            )
        else:
            self._pool = ThreadPoolExecutor(
                max_workers=self.threads, thread_name_prefix="promptq-backend"
            )

    async def close(self) -> None:
        if self._pool is not None:
            pool, self._pool = self._pool, None
            # a call still running (past its timeout) finishes in the background: it
            # does not hold up the worker's shutdown
            pool.shutdown(wait=False, cancel_futures=True)

    async def attempt(
        self, endpoint: str, body: dict[str, Any], *, relay: Relay | None = None
    ) -> Attempt:
        self._in_flight += 1
        try:
            async with asyncio.timeout(self.timeout_s):
                answer = await self._call(endpoint, body)
        except BackendError as exc:
            return _failed(exc.message, exc.code, exc.status_code, retryable=exc.retryable)
        except TimeoutError:
            error = RetryableUpstreamError(
                f"the backend function gave no answer within {self.timeout_s:g}s",
                code="timeout",
            )
            return Attempt(None, None, None, error, NO_HEADERS)
        except Exception as exc:
            return _failed(f"{type(exc).__name__}: {exc}", _ERROR_TYPE, 500, retryable=False)
        finally:
            self._in_flight -= 1
        if not isinstance(answer, dict):
            return _failed(
                f"{self.label} returned {type(answer).__name__}, not a dict (the response body)",
                _ERROR_TYPE,
                500,
                retryable=False,
            )
        try:
            orjson.dumps(answer)
        except TypeError as exc:
            return _failed(
                f"{self.label} returned a dict that is not JSON: {exc}", _ERROR_TYPE, 500,
                retryable=False,
            )  # fmt: skip
        return Attempt(200, answer, f"req_{uuid.uuid4().hex}", None, NO_HEADERS)

    async def _call(self, endpoint: str, body: dict[str, Any]) -> Any:
        if self.is_async:
            return await self.function(endpoint, body)
        assert self._pool is not None, "start() the backend first"
        loop = asyncio.get_running_loop()
        if self.processes:
            return await loop.run_in_executor(
                self._pool, _call_in_child, self.module_name, self.function_name, endpoint, body
            )
        return await loop.run_in_executor(self._pool, self.function, endpoint, body)


def _failed(message: str, code: str, status_code: int, *, retryable: bool) -> Attempt:
    body = {"error": {"message": message, "type": _ERROR_TYPE, "param": None, "code": code}}
    cls: type[UpstreamError] = RetryableUpstreamError if retryable else FatalUpstreamError
    error = cls(message, code=code, status_code=status_code, body=body)
    return Attempt(status_code, body, f"req_{uuid.uuid4().hex}", error, NO_HEADERS)
