"""Worker side: the engine (lanes, slots, backends, dispatcher, supervisor), arq's
settings for the aggregator jobs, and the worker process."""

from promptq.worker.engine import Engine
from promptq.worker.worker import LocalWorker, WorkerSettings, run_worker

__all__ = ["Engine", "LocalWorker", "WorkerSettings", "run_worker"]
