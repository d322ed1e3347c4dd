"""Worker side: arq settings, fetch-with-retry, the dispatcher and the aggregator job."""

from promptq.worker.worker import PromptqWorker, WorkerSettings, create_worker

__all__ = ["PromptqWorker", "WorkerSettings", "create_worker"]
