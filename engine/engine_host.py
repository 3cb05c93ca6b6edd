"""EngineHost: an Engine on its loop thread plus what every worker reports about it.

Workers (prefill, decode, colocated) own one by composition; it builds the engine from
plain, picklable options (they travel through Ray) and produces ``WorkerStats``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from engine.engine_loop import EngineLoop
from engine.outputs import RequestOutput
from engine.worker_stats import WorkerStats

log = logging.getLogger(__name__)
STATS_TIMEOUT_S = 30.0


class EngineHost:
    def __init__(self, worker_id: str, role: str, model_dir: str, engine_options: dict,
                 on_outputs: Callable[[list[RequestOutput]], None]) -> None:
        import torch

        from engine.llm_engine import Engine

        self.worker_id = worker_id
        self.role = role
        options = dict(engine_options)
        threads = options.pop("num_threads", None)
        if threads:
            torch.set_num_threads(threads)
        if options.get("device", "cpu") == "auto":  # resolved where the worker runs
            options["device"] = "cuda" if torch.cuda.is_available() else "cpu"
        warmup = options.pop("warmup", True)
        t0 = time.perf_counter()
        self.engine = Engine.from_pretrained(model_dir, **options)
        self.load_s = time.perf_counter() - t0  # weights, KV cache allocation, tokenizer
        # Before the loop starts: the first requests then run at steady-state speed.
        self.warmup_s = self.engine.warmup() if warmup else None
        log.info("%s: KV cache %d blocks of %d tokens; loaded in %.1f s, warm-up %s s",
                 worker_id, self.engine.num_blocks, self.engine.cache_config.block_size,
                 self.load_s, "off" if self.warmup_s is None else f"{self.warmup_s:.2f}")
        self.loop = EngineLoop(self.engine, on_outputs, name=f"{worker_id}-engine")
        self._sent_snapshot = False
        self.kv_bytes_sent = 0  # counted by the owning prefill worker
        self.loop.start()

    def call(self, fn: Callable, *args, timeout: float | None = None):
        """Run ``fn(engine, *args)`` on the loop thread and wait for its result."""
        return self.loop.call(fn, *args).result(timeout)

    def call_ranks(self, fn: Callable, *args) -> None:
        """Tensor parallelism: ``fn(runner, comm, *args)`` on ranks 1..N-1, sent from the
        loop thread between two steps (``Engine.call_ranks``)."""
        self.call(lambda engine: engine.call_ranks(fn, *args))

    def stats(self, draining: bool = False) -> WorkerStats:
        return self.call(self._stats, draining, timeout=STATS_TIMEOUT_S)

    def _stats(self, engine, draining: bool) -> WorkerStats:
        sched = engine.scheduler
        queued = sum(r.num_tokens - r.num_computed_tokens for r in sched.waiting)
        queued += sum(max(0, r.num_prompt_tokens - r.num_computed_tokens) for r in sched.running)
        added, evicted = engine.pool.take_cache_events()
        snapshot = not self._sent_snapshot
        if snapshot:  # first report: the whole cache, so a restarted scheduler resyncs
            added, evicted = engine.pool.cached_hashes(), []
            self._sent_snapshot = True
        counters = self.loop.counters
        return WorkerStats(
            worker_id=self.worker_id, role=self.role,
            num_waiting=sched.num_waiting, num_running=sched.num_running + sched.num_reserved,
            queued_prefill_tokens=queued, free_blocks=engine.pool.num_free,
            total_blocks=engine.pool.num_blocks, block_size=engine.cache_config.block_size,
            prefill_tokens_per_s=counters.prefill_tokens_per_s(),
            decode_tokens_per_s=counters.decode_tokens_per_s(),
            cached_block_hashes_added=tuple(added), cached_block_hashes_evicted=tuple(evicted),
            timestamp=time.time(), draining=draining,
            max_num_seqs=engine.scheduler_config.max_num_seqs, cache_snapshot=snapshot,
            num_preemptions=sched.num_preemptions,
            prefix_cache_queries=engine.kv_manager.num_prefix_queries,
            prefix_cache_hits=engine.kv_manager.num_prefix_hits,
            kv_bytes_sent=self.kv_bytes_sent,
            integrity_failures=counters.integrity_failures,
            step_time_p50_s=counters.step_time_p50(),
            step_interval_p50_s=counters.step_interval_p50(),
        )

    def startup_report(self) -> dict:
        """What start-up did, for the driver to print (workers' own logs may not reach it):
        KV cache size, weight-loading and warm-up seconds. Static after construction."""
        engine = self.engine
        return {"num_blocks": engine.num_blocks, "block_size": engine.cache_config.block_size,
                "kv_cache_bytes": engine.num_blocks * engine.bytes_per_block,
                "load_s": self.load_s, "warmup_s": self.warmup_s}

    def check_integrity(self) -> None:
        self.call(lambda engine: engine.check_integrity(), timeout=STATS_TIMEOUT_S)

    def free_blocks(self) -> int:
        return self.call(lambda engine: engine.pool.num_free, timeout=STATS_TIMEOUT_S)

    def shutdown(self) -> None:
        self.loop.stop()
        self.engine.close()  # tensor parallelism: stops the other ranks (a no-op otherwise)


class HostedWorker:
    """What every worker answers the cluster about its engine (stats, health, checks);
    subclasses set ``self.host`` to their EngineHost."""

    host: EngineHost

    def stats(self, draining: bool = False) -> WorkerStats:
        return self.host.stats(draining)

    def free_blocks(self) -> int:
        return self.host.free_blocks()

    def startup_report(self) -> dict:
        return self.host.startup_report()

    def check_integrity(self) -> None:
        self.host.check_integrity()

    def health(self) -> bool:
        """False once the engine cannot serve any more: its loop thread ended, or (tensor
        parallelism) a rank died and the group failed for good."""
        broken = getattr(self.host.engine.runner, "error", None)
        return self.host.loop.is_alive() and not getattr(broken, "fatal", False)
