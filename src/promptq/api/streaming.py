"""Streamed answers: JSONL/NDJSON lines written out as they are read from Redis."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator

from aiohttp import web

logger = logging.getLogger(__name__)

#: bytes buffered before a (non-live) streamed answer is written out
_FLUSH_BYTES = 256 * 1024


@contextlib.asynccontextmanager
async def closing(lines: AsyncIterator[bytes]) -> AsyncIterator[None]:
    """Close an async generator on exit (its Redis reads stop at once)."""
    try:
        yield
    finally:
        aclose = getattr(lines, "aclose", None)
        if aclose is not None:
            await aclose()


async def stream_lines(
    request: web.Request, lines: AsyncIterator[bytes], *, content_type: str, live: bool = False
) -> web.StreamResponse:
    """Answer with ``lines`` (newline-terminated): each as it comes when ``live``, else
    in writes of about 256 KiB.

    Once the answer has started no error body can follow: if the source fails midway
    the connection is dropped, so a client never mistakes a cut answer for a whole one.
    """
    response = web.StreamResponse(headers={"Content-Type": content_type})
    await response.prepare(request)
    chunk: list[bytes] = []
    size = 0
    try:
        async with closing(lines):
            async for raw in lines:
                chunk += (raw, b"\n")
                size += len(raw) + 1
                if live or size >= _FLUSH_BYTES:
                    await response.write(b"".join(chunk))
                    chunk, size = [], 0
        if chunk:
            await response.write(b"".join(chunk))
    except ConnectionResetError:
        return response  # the client left
    except Exception:
        logger.exception(
            "%s %s failed midway; dropping the connection", request.method, request.path
        )
        if request.transport is not None:
            request.transport.abort()
        return response
    await response.write_eof()
    return response
