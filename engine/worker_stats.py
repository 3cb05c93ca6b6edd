"""``WorkerStats``: the snapshot every worker reports to the global scheduler.

Pure Python (no torch): a prefill, decode or colocated worker fills one after its engine
steps and sends it periodically; the global scheduler keeps the newest one per worker and
places requests from them. The cluster simulator fills the same dataclass for its simulated
workers, so placement code runs unchanged in both.

Prefix-cache hashes are reported as *net deltas* since the previous report, so that a report
stays small: a hash cached and evicted again in between appears in neither list, one evicted
and cached again appears in neither (or only in ``added``); the scheduler applies evictions
before additions. ``cache_snapshot=True`` says ``cached_block_hashes_added`` is instead the
worker's whole cache (first report, after a restart, or to resynchronise).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Role = Literal["prefill", "decode", "colocated"]
ROLES: tuple[str, ...] = ("prefill", "decode", "colocated")


@dataclass(frozen=True)
class WorkerStats:
    worker_id: str
    """Unique, stable id of the worker (its actor name)."""
    role: Role
    """"prefill" (prefill only, ships KV), "decode" (decodes; may prefill short prompts
    locally) or "colocated" (a plain engine doing both)."""
    num_waiting: int
    """Requests accepted by the worker but not yet scheduled in its engine."""
    num_running: int
    """Requests in the worker's running batch (prefilling or decoding)."""
    queued_prefill_tokens: int
    """Prompt tokens still to be computed for waiting + running requests (cache hits
    excluded): the prefill backlog used to estimate TTFT."""
    free_blocks: int
    """KV blocks neither used by a request nor reserved for an incoming transfer (cached,
    unreferenced blocks count as free: they are evictable)."""
    total_blocks: int
    """KV blocks of the worker's cache in total."""
    block_size: int
    """Tokens per KV block."""
    prefill_tokens_per_s: float
    """Measured prefill throughput (prompt tokens per second of busy time; 0 = unknown)."""
    decode_tokens_per_s: float
    """Measured decode throughput (generated tokens per second over the batch; 0 = unknown)."""
    cached_block_hashes_added: tuple[int, ...] = ()
    """Chained block hashes (``engine.prefix_hash.block_hashes``) newly in the prefix cache
    since the previous report (or the whole cache when ``cache_snapshot``)."""
    cached_block_hashes_evicted: tuple[int, ...] = ()
    """Chained block hashes evicted from the prefix cache since the previous report."""
    timestamp: float = 0.0
    """When the snapshot was taken, in the clock the scheduler uses (``time.time()`` live,
    simulated seconds in the simulator)."""
    draining: bool = False
    """True once the worker is being drained (removal or role change): finish in-flight work,
    accept nothing new."""
    max_num_seqs: int = 0
    """The worker's running-batch cap (0 = no cap known)."""
    cache_snapshot: bool = False
    """True when ``cached_block_hashes_added`` lists the complete cache, replacing what the
    scheduler knew (``cached_block_hashes_evicted`` is then empty)."""
    num_preemptions: int = 0
    """Requests preempted since the worker started (cumulative, for metrics)."""
    prefix_cache_queries: int = 0
    """Prompt tokens looked up in the prefix cache since start (cumulative)."""
    prefix_cache_hits: int = 0
    """Of those, tokens found cached (cumulative): hit rate = hits / queries."""
    kv_bytes_sent: int = 0
    """KV cache bytes this worker shipped to decode workers since start (cumulative)."""
    step_interval_p50_s: float = 0.0
    """Median time from one engine step's start to the next's while requests keep running,
    weighted by each step's decoding streams, seconds: the token cadence a decoding stream
    sees (step time plus the loop's work between steps)."""
    step_time_p50_s: float = 0.0
    """Median wall time of the worker's recent engine steps (its last 512), seconds: on a
    decode worker, the inter-token gap a client should see."""
    integrity_failures: int = 0
    """Block-pool integrity checks (run whenever the engine falls idle) that failed since
    start (cumulative; each is also logged as an error)."""

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, got {self.role!r}")
        for name in ("num_waiting", "num_running", "queued_prefill_tokens", "free_blocks"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.block_size <= 0 or self.total_blocks < 0:
            raise ValueError("block_size must be > 0 and total_blocks >= 0")
        if self.free_blocks > self.total_blocks:
            raise ValueError(
                f"free_blocks ({self.free_blocks}) exceeds total_blocks ({self.total_blocks})"
            )

    @property
    def kv_usage(self) -> float:
        """Fraction of KV blocks in use or reserved, in [0, 1]."""
        if self.total_blocks == 0:
            return 1.0
        return 1.0 - self.free_blocks / self.total_blocks
