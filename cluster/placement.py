"""Placement policies, the prefix index, and the per-worker view they rank.

Pure Python. The global scheduler (``cluster.global_scheduler``) filters workers that have
room; a policy only *ranks* the survivors, by a key where lower is better. Policies are
looked up by name in ``POLICIES`` (a registry), so adding one is adding a class.

- ``round_robin``: the next worker in id order after the previous pick, per role.
- ``least_loaded``: prefill by backlog tokens, decode by requests held.
- ``kv_aware`` (default): prefill by estimated TTFT
  ``(backlog tokens + prompt tokens - tokens cached there) / measured prefill speed``;
  decode by KV usage + running-batch occupancy.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Union

from engine.worker_stats import WorkerStats


class WorkerState:
    """The newest stats of a worker plus what was placed on it since they were taken.

    The hot fields (``queued_tokens``, ``free_blocks``, ``num_requests``, ...) are plain
    attributes kept up to date on every change: placement reads them for every worker on
    every request.
    """

    __slots__ = (
        "stats", "worker_id", "pending", "pending_tokens", "pending_blocks", "pending_seqs",
        "queued_tokens", "free_blocks", "num_requests", "draining", "total_blocks",
        "max_num_seqs", "prefill_speed", "headroom_blocks", "watermark",
    )

    def __init__(self, stats: WorkerStats, watermark: float = 0.0) -> None:
        self.worker_id = stats.worker_id
        self.pending: list[tuple[float, int, int]] = []
        """(placement time, prefill tokens, decode blocks) of placements the stats do not show."""
        self.pending_tokens = self.pending_blocks = self.pending_seqs = 0
        self.watermark = watermark
        """Fraction of blocks a decode placement must leave free (``headroom_blocks``)."""
        self.replace_stats(stats)

    def add_pending(self, now: float, tokens: int, blocks: int) -> None:
        self.pending.append((now, tokens, blocks))
        self.pending_tokens += tokens
        self.pending_blocks += blocks
        self.pending_seqs += 1
        self._refresh()

    def replace_stats(self, stats: WorkerStats) -> None:
        """Take a newer snapshot; placements made at or before it are now inside it."""
        self.stats = stats
        if self.pending:
            self.pending = [p for p in self.pending if p[0] > stats.timestamp]
            self.pending_tokens = sum(p[1] for p in self.pending)
            self.pending_blocks = sum(p[2] for p in self.pending)
            self.pending_seqs = len(self.pending)
        self.draining = stats.draining
        self.total_blocks = stats.total_blocks
        self.headroom_blocks = math.ceil(self.watermark * stats.total_blocks)
        self.max_num_seqs = stats.max_num_seqs
        self.prefill_speed = stats.prefill_tokens_per_s
        self._refresh()

    def _refresh(self) -> None:
        s = self.stats
        self.queued_tokens = s.queued_prefill_tokens + self.pending_tokens
        self.free_blocks = s.free_blocks - self.pending_blocks
        # requests held: running + waiting + placed since the snapshot
        self.num_requests = s.num_running + s.num_waiting + self.pending_seqs


# A policy's ranking key: lower is better (floats, or tuples for round robin).
Key = Union[float, tuple[int, str]]  # noqa: UP007 (a runtime alias: py3.10 needs Union)


@dataclass
class RequestInfo:
    """What a policy may look at about the request being placed."""

    request_id: str
    num_prompt_tokens: int
    block_hashes: Sequence[int]
    cached_tokens: dict[str, int]
    """worker id -> prompt tokens that worker is believed to hold (absent = 0)."""
    default_prefill_speed: float = 1.0
    """Tokens/s assumed for a worker that has not measured its speed yet."""

    def uncached(self, worker_id: str) -> int:
        return self.num_prompt_tokens - self.cached_tokens.get(worker_id, 0)


class PlacementPolicy:
    """Ranks workers that have room: one key per worker, lower is better; ties go to the
    lower worker id. Keys are computed for a whole list at once (placement runs for every
    request over every worker, so no per-worker call)."""

    name = "base"

    def prefill_keys(self, workers: list[WorkerState], req: RequestInfo) -> list[Key]:
        raise NotImplementedError

    def decode_keys(self, workers: list[WorkerState], req: RequestInfo) -> list[Key]:
        raise NotImplementedError

    def on_placed(self, prefill_id: str | None, decode_id: str) -> None:
        """Called after every placement (stateful policies advance here)."""


class RoundRobinPolicy(PlacementPolicy):
    """The next worker in id order after the one picked last, per role."""

    name = "round_robin"

    def __init__(self) -> None:
        self._last: dict[str, str] = {}  # "prefill"/"decode" -> last id picked

    def _keys(self, role: str, workers: list[WorkerState]) -> list[Key]:
        last = self._last.get(role)
        return [(0 if last is None or w.worker_id > last else 1, w.worker_id) for w in workers]

    def prefill_keys(self, workers: list[WorkerState], req: RequestInfo) -> list[Key]:
        return self._keys("prefill", workers)

    def decode_keys(self, workers: list[WorkerState], req: RequestInfo) -> list[Key]:
        return self._keys("decode", workers)

    def on_placed(self, prefill_id: str | None, decode_id: str) -> None:
        if prefill_id is not None:
            self._last["prefill"] = prefill_id
        self._last["decode"] = decode_id


class LeastLoadedPolicy(PlacementPolicy):
    """Prefill: fewest backlog tokens. Decode: fewest requests held (then lower KV usage)."""

    name = "least_loaded"

    def prefill_keys(self, workers: list[WorkerState], req: RequestInfo) -> list[Key]:
        return [w.queued_tokens + 1e-3 * w.num_requests for w in workers]

    def decode_keys(self, workers: list[WorkerState], req: RequestInfo) -> list[Key]:
        return [
            w.num_requests + 1e-3 * (1.0 - w.free_blocks / (w.total_blocks or 1))
            for w in workers
        ]


class KVAwarePolicy(PlacementPolicy):
    """Prefill: estimated TTFT = (backlog + prompt - cached there) / measured speed.
    Decode: KV usage + running-batch occupancy (both in [0, 1])."""

    name = "kv_aware"

    def prefill_keys(self, workers: list[WorkerState], req: RequestInfo) -> list[Key]:
        n, cached, default = req.num_prompt_tokens, req.cached_tokens, req.default_prefill_speed
        if not cached:  # fast path: no prefix known anywhere
            return [(w.queued_tokens + n) / (w.prefill_speed or default) for w in workers]
        return [
            (w.queued_tokens + n - cached.get(w.worker_id, 0)) / (w.prefill_speed or default)
            for w in workers
        ]

    def decode_keys(self, workers: list[WorkerState], req: RequestInfo) -> list[Key]:
        return [
            1.0 - w.free_blocks / (w.total_blocks or 1) + w.num_requests / (w.max_num_seqs or 256)
            for w in workers
        ]


POLICIES: dict[str, type[PlacementPolicy]] = {
    p.name: p for p in (RoundRobinPolicy, LeastLoadedPolicy, KVAwarePolicy)
}


def make_policy(name: str) -> PlacementPolicy:
    try:
        return POLICIES[name]()
    except KeyError:
        raise ValueError(
            f"unknown placement policy {name!r}; choose from {sorted(POLICIES)}"
        ) from None


class PrefixIndex:
    """Which worker holds which chained block hash (from the workers' reported deltas).

    ``match(hashes)`` gives each worker's longest cached prefix, in blocks. Because hashes
    are chained, a worker matches block ``i`` only if it also matched blocks ``0..i-1``.
    """

    def __init__(self) -> None:
        self._workers_by_hash: dict[int, set[str]] = {}
        self._hashes_by_worker: dict[str, set[int]] = {}

    def add(self, worker_id: str, hashes: Iterable[int]) -> None:
        mine = self._hashes_by_worker.setdefault(worker_id, set())
        for h in hashes:
            if h not in mine:
                mine.add(h)
                self._workers_by_hash.setdefault(h, set()).add(worker_id)

    def evict(self, worker_id: str, hashes: Iterable[int]) -> None:
        mine = self._hashes_by_worker.get(worker_id)
        if not mine:
            return
        for h in hashes:
            if h in mine:
                mine.discard(h)
                holders = self._workers_by_hash[h]
                holders.discard(worker_id)
                if not holders:
                    del self._workers_by_hash[h]

    def remove_worker(self, worker_id: str) -> None:
        self.evict(worker_id, list(self._hashes_by_worker.get(worker_id, ())))
        self._hashes_by_worker.pop(worker_id, None)

    def reset(self, worker_id: str, hashes: Iterable[int]) -> None:
        self.remove_worker(worker_id)
        self.add(worker_id, hashes)

    def num_hashes(self, worker_id: str) -> int:
        return len(self._hashes_by_worker.get(worker_id, ()))

    def match(self, hashes: Sequence[int]) -> dict[str, int]:
        """worker id -> number of leading blocks of ``hashes`` that worker caches (> 0 only)."""
        result: dict[str, int] = {}
        alive: set[str] | None = None
        for i, h in enumerate(hashes):
            holders = self._workers_by_hash.get(h)
            if alive is None:
                alive = set(holders) if holders else set()
            else:
                gone = alive - holders if holders else alive
                for w in gone:
                    result[w] = i
                alive = alive & holders if holders else set()
            if not alive:
                return result
        for w in alive or ():
            result[w] = len(hashes)
        return result
