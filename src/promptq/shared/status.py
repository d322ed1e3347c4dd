"""The batch state machine, defined once.

    validating ──► queued ──► in_progress ──► finalizing ──► completed
        │            │             │              ▲    └───► failed (a stop: quota, failure rate)
        │            └─────────────┴──► cancelling┘    └───► cancelled
        └──► failed (invalid input)

* ``validating``: the producer is writing the requests; nothing runs it (a producer that
  died midway leaves it here, and a new submit under the same id starts it over).
* ``queued`` / ``in_progress``: workers claim its requests (``CLAIMABLE``).
* ``cancelling``: a user's cancel; no claim, in-flight requests finish.
* ``finalizing``: the last result is in; the aggregator writes the stats, then the
  terminal status (``final_status`` in the batch hash when a stop decided it).

The sets below are what every module (and, through the generated prelude of
``shared.scripts``, every Lua script) asks of a status: nothing else spells them out.
"""

from __future__ import annotations

from enum import StrEnum


class Status(StrEnum):
    """Batch lifecycle, the OpenAI Batch API's names (plus ``queued``)."""

    VALIDATING = "validating"
    QUEUED = "queued"
    IN_PROGRESS = "in_progress"
    FINALIZING = "finalizing"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLING = "cancelling"
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        """Nothing will change any more (results and stats are final)."""
        return self in TERMINAL

    @property
    def running(self) -> bool:
        """Requests may still be sent or finish."""
        return self in RUNNING


#: workers may claim the batch's requests
CLAIMABLE = frozenset({Status.QUEUED, Status.IN_PROGRESS})
#: requests may still be sent or finish: followed by workers, counted as queued work
RUNNING = frozenset({Status.QUEUED, Status.IN_PROGRESS, Status.CANCELLING})
#: a stop (a user's cancel, promptq's own stop) may still decide how the batch ends
STOPPABLE = frozenset({Status.VALIDATING, Status.QUEUED, Status.IN_PROGRESS})
#: the end: results, counters and stats no longer change
TERMINAL = frozenset({Status.COMPLETED, Status.FAILED, Status.CANCELLED})
#: how a batch may end once finalizing (``final_status``)
FINAL = TERMINAL


def parse(value: str | bytes | None) -> Status | None:
    """A stored status, or None for a missing or unknown one."""
    if value is None:
        return None
    text = value.decode() if isinstance(value, bytes) else value
    try:
        return Status(text)
    except ValueError:
        return None
