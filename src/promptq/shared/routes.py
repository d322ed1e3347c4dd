"""Routes: how a batch's requests reach the upstream (``promptq run|submit --route``).

* ``realtime`` (default): one upstream request per line, through the workers' lanes.
* ``batch-api``: through the upstream's own Batch API (``worker.sources.batchapi``), in
  shards of at most ``PROMPTQ_BATCH_API_MAX_LINES`` lines and
  ``PROMPTQ_BATCH_API_MAX_BYTES`` bytes; with a deadline, what has no result by then
  (or whose provider batch failed or expired) goes through the realtime lane.

Every result line says which route answered it (``"route"``).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field

from promptq.shared import serialization
from promptq.shared.models import QueuedRequest
from promptq.shared.results import BATCH_API, REALTIME

ROUTES = (REALTIME, BATCH_API)
#: the metadata of a provider batch a shard created: its marker (a worker that took the
#: shard over finds the provider batch by it)
MARKER_BATCH = "promptq_batch"
MARKER_SHARD = "promptq_shard"

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|m|h|d)?\s*$")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> float:
    """Seconds in ``45s``, ``30m``, ``2h``, ``1d`` (a bare number: seconds); ValueError
    saying what is accepted otherwise."""
    match = _DURATION.match(text)
    if match is None or float(match.group(1)) <= 0:
        raise ValueError(f"'{text}' is not a duration: use e.g. 45s, 30m, 2h or 1d")
    return float(match.group(1)) * _UNIT_S[match.group(2) or "s"]


def format_duration(seconds: float) -> str:
    """``5400 -> "1h30m"``, ``45 -> "45s"``."""
    seconds = round(seconds)
    parts = []
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            parts.append(f"{seconds // size}{unit}")
            seconds %= size
    if seconds or not parts:
        parts.append(f"{seconds}s")
    return "".join(parts)


def provider_line(request: QueuedRequest, endpoint: str) -> bytes:
    """The request as a line of a Batch API input file (without the newline)."""
    return serialization.dumps(
        {"custom_id": request.custom_id, "method": "POST", "url": endpoint, "body": request.body}
    )


@dataclass(slots=True)
class ShardCutter:
    """Cuts a batch, in input order, into shards of at most ``max_lines`` lines and
    ``max_bytes`` bytes of Batch API input file. ``add`` each request (from index
    ``start``); it returns the shard it closed, if any; ``close`` returns the last one."""

    endpoint: str
    max_lines: int
    max_bytes: int
    start: int = 0
    _lines: int = 0
    _bytes: int = 0
    closed: list[tuple[int, int, int]] = field(default_factory=list)

    def add(self, request: QueuedRequest) -> None:
        size = len(provider_line(request, self.endpoint)) + 1
        if self._lines and (
            self._lines + 1 > self.max_lines or self._bytes + size > self.max_bytes
        ):
            self._cut()
        self._lines += 1
        self._bytes += size

    def close(self) -> None:
        if self._lines:
            self._cut()

    def _cut(self) -> None:
        end = self.start + self._lines
        self.closed.append((self.start, end, self._bytes))
        self.start, self._lines, self._bytes = end, 0, 0

    def take(self, *, before: int) -> Iterator[tuple[int, int, int]]:
        """The closed shards whose lines are all below ``before`` (written), once each."""
        while self.closed and self.closed[0][1] <= before:
            yield self.closed.pop(0)
