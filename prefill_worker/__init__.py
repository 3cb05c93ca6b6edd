"""The prefill pool's worker: chunked prefill, first token, KV shipped to a decode worker."""

from prefill_worker.worker import PrefillResult, PrefillWorker

__all__ = ["PrefillResult", "PrefillWorker"]
