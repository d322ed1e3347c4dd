"""Typed application state of the HTTP API (``web.AppKey``s), shared by every handler."""

from __future__ import annotations

import asyncio

from aiohttp import web

from promptq.api.lane import ChatLane
from promptq.api.metrics import Metrics
from promptq.api.store import ApiStore
from promptq.producer import Producer
from promptq.shared.settings import Settings

SETTINGS = web.AppKey("settings", Settings)
PRODUCER = web.AppKey("producer", Producer)
STORE = web.AppKey("store", ApiStore)
LANE = web.AppKey("lane", ChatLane)
#: Validation tasks of batches created by this process (awaited or cancelled on shutdown).
TASKS = web.AppKey("tasks", set[asyncio.Task[None]])
METRICS = web.AppKey("metrics", Metrics)
