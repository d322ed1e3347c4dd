"""Running the HTTP API: ``promptq serve``."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from aiohttp import web

from promptq.api.app import create_app
from promptq.shared.runtime import settle_heap
from promptq.shared.settings import Settings

logger = logging.getLogger(__name__)


def serve(
    settings: Settings,
    *,
    host: str,
    port: int,
    on_ready: Callable[[str], None] | None = None,
) -> None:
    """Serve until SIGINT/SIGTERM (on uvloop when installed); ``on_ready`` gets the base
    URL once the port is bound. Raises ``OSError`` if it cannot be bound and
    ``RedisUnavailable`` if Redis does not answer at startup."""
    try:
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    except ImportError:  # pragma: no cover - optional speed-up
        pass

    def bound(message: str) -> None:
        # aiohttp's message: "======== Running on http://127.0.0.1:8000 ========\n..."
        url = message.split("Running on ", 1)[-1].split(" ", 1)[0] + "/v1"
        logger.info("promptq serve listening on %s", url)
        if on_ready is not None:
            on_ready(url)

    app = create_app(settings)
    app.on_startup.append(_settle)  # last: once connected to Redis (cleanup_ctx)
    web.run_app(
        app,
        host=host,
        port=port,
        access_log=None,  # a log line per request would cost more than the request
        print=bound,
        shutdown_timeout=10.0,
    )


async def _settle(app: web.Application) -> None:
    settle_heap()
