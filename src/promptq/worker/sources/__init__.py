"""Lanes as sources: where a worker's requests come from, and where their results go.

A source hands the dispatcher ``Job``s it has claimed for this worker, and takes their
outcomes back (its sink side: buffered, then written in groups). Every source holds
its claims in Redis under this worker's id until the result is written, which gives
one recovery rule for every lane: what a worker owns minus what it holds (running, or
result not yet written) has been stranded and goes back to the queue; a dead worker
holds nothing (``worker.recovery``).

    batch  ``sources.batch``  requests of batches (the runnable index, claims)
    chat   ``sources.chat``   POST /v1/chat/completions without batches (BLMOVE)

Adding a lane is one module with a class that follows ``Source``.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from promptq.shared.results import Outcome

if TYPE_CHECKING:
    from promptq.worker.dispatcher import Dispatcher
    from promptq.worker.relay import StreamRelay


@dataclass(slots=True, eq=False)
class Job:
    """One claimed request: what to send, and where its result goes."""

    source: Source
    key: str  # unique within the source's group: the custom_id, the chat id
    group: str  # the batch id ('' for the chat lane)
    endpoint: str
    body: dict[str, Any]
    extra: Any = field(default=None)  # the source's own data (the chat queue entry)
    cache_ttl_s: int | None = None  # answer identical requests from the cache
    relay: StreamRelay | None = None  # a streamed request: where its events go


class Source(Protocol):
    """A lane (see the package docstring)."""

    name: str

    async def feed(self, dispatcher: Dispatcher) -> None:
        """Claim work whenever the dispatcher has room, and start it, until cancelled."""
        ...

    def finished(self, job: Job, outcome: Outcome) -> None:
        """Take a job's outcome (buffered: ``flush`` writes it)."""
        ...

    @property
    def unwritten(self) -> bool:
        """Results wait to be written."""
        ...

    async def flush(self) -> bool:
        """Write one group of buffered results; False when Redis refused (kept, retried)."""
        ...

    async def hand_back(self, jobs: Collection[Job]) -> int:
        """Give unfinished jobs back to their queue (shutdown); returns how many."""
        ...

    async def recheck(self, running: Collection[Job]) -> bool:
        """After Redis trouble: give back what this worker owns in Redis but does not hold
        (``running`` plus results not yet written). False when a claim or a write was on
        the wire, so owned and held could not be told apart: try again later."""
        ...

    async def reap(self, dead_worker_id: str) -> int:
        """Give back everything a dead worker owned; returns how many requests."""
        ...

    async def release_all(self) -> int:
        """At shutdown, once nothing runs: give back anything still owned."""
        ...
