"""Mock OpenAI-compatible upstream used by the demo, the tests and the benchmarks.

Use :class:`MockServer` in tests (``async with MockServer(cfg) as mock: mock.url``),
:func:`create_app` to mount it elsewhere and :func:`serve_forever` for the CLI. A request
can script its own fate with ``[[mock status=500 fail=2]]`` in its prompt; see
:class:`Directives`.
"""

from promptq.mock._directives import DirectiveError, Directives, expected_content
from promptq.mock._models import MockConfig, MockStats
from promptq.mock.server import MockServer, create_app, serve_forever

__all__ = [
    "DirectiveError",
    "Directives",
    "MockConfig",
    "MockServer",
    "MockStats",
    "create_app",
    "expected_content",
    "serve_forever",
]
