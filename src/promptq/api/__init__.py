"""The HTTP API (``promptq serve``): OpenAI Files + Batches API, chat completions
through the queue, health and metrics. See ``promptq.api.app``."""

from promptq.api.app import create_app
from promptq.api.serve import serve

__all__ = ["create_app", "serve"]
