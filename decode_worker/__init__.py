"""The decode pool's worker: reserves blocks, receives KV, decodes with continuous batching."""

from decode_worker.worker import DecodeWorker

__all__ = ["DecodeWorker"]
