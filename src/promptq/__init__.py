"""promptq: run many LLM requests at once through Redis and horizontally scaled arq workers.

What users import lives here; everything else is internal.

    import promptq
    run = promptq.run(["What is 2+2?", "Name a prime."], concurrency=64)
    print(run.stats.succeeded, run.results[0].content)
"""

from promptq._oneshot import RunResult, arun, run, stream
from promptq.producer import Batch, Producer
from promptq.shared.errors import (
    BackendError,
    BatchError,
    BatchExists,
    BatchNotFound,
    InputError,
    PromptqError,
    RedisUnavailable,
)
from promptq.shared.models import BatchInfo, BatchStats, Priority, Result, Status
from promptq.shared.settings import Settings

__version__ = "0.1.0"

__all__ = [
    "BackendError",
    "Batch",
    "BatchError",
    "BatchExists",
    "BatchInfo",
    "BatchNotFound",
    "BatchStats",
    "InputError",
    "Priority",
    "Producer",
    "PromptqError",
    "RedisUnavailable",
    "Result",
    "RunResult",
    "Settings",
    "Status",
    "__version__",
    "arun",
    "run",
    "stream",
]
