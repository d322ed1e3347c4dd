"""Recovery, one rule for every lane: what a worker owns minus what it holds goes back.

Every lane keeps its claims in Redis under the claiming worker's id (a batch's
``:inflight`` hash, a worker's chat list) until the result is written, and each worker
knows what it holds (running, or result not yet written). So:

* a **dead** worker (no heartbeat within the liveness window, its heartbeat hash
  expired; ``shared.registry``) holds nothing: any live worker gives everything it
  owned back to the front of its queue (``reap_dead``), once per request (the scripts
  hand back only what is still owned, and a request with a result is never handed
  back);
* a **live** worker, after Redis trouble (an outage, or a command redis-py sent again),
  gives back what it owns but does not hold: requests of a claim whose reply was lost
  (``recheck``);
* a **stopping** worker lets what runs finish for ``PROMPTQ_SHUTDOWN_GRACE_S``, hands
  the rest back, then gives back anything still owned (``Dispatcher.drain``).

A worker that was only slow, not dead, and finishes a request that was handed back
records nothing twice: results are recorded once per custom_id (HSETNX).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from promptq.shared.registry import WorkerRegistry
from promptq.worker.dispatcher import Dispatcher
from promptq.worker.sources import Source

logger = logging.getLogger(__name__)


class Recovery:
    """Reaping and rechecking for one worker."""

    def __init__(
        self, *, registry: WorkerRegistry, dispatcher: Dispatcher, sources: Sequence[Source]
    ) -> None:
        self.registry = registry
        self.dispatcher = dispatcher
        self.sources = list(sources)

    async def reap_dead(self) -> int:
        """Give every dead worker's requests back; returns how many."""
        total = 0
        for dead in await self.registry.dead(me=self.dispatcher.worker_id):
            for source in self.sources:
                total += await source.reap(dead)
            await self.registry.forget(dead)
        return total

    async def recheck(self) -> bool:
        """Give back what this worker owns but does not hold, in every lane. False when a
        lane could not tell (a claim was on the wire): try again at the next beat."""
        complete = True
        for source in self.sources:
            if not await source.recheck(self.dispatcher.held(source)):
                complete = False
        return complete
