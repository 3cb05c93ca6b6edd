"""Placement policies and the per-worker view they rank.

Pure Python. The global scheduler (``cluster.global_scheduler``) filters workers that have
room; a policy only *ranks* the survivors, by a key where lower is better. Policies are
looked up by name in ``POLICIES`` (a registry), so adding one is adding a class.

- ``round_robin``: the next worker in id order after the previous pick, per role.
- ``least_loaded``: prefill by backlog tokens, decode by requests held.
- ``kv_aware`` (default): prefill by estimated TTFT
  ``(backlog tokens + prompt tokens - tokens cached there) / measured prefill speed``;
  decode by KV usage + running-batch occupancy.

The indexes the policies read (``RankIndex``, ``RolePool``, ``PrefixIndex``) live in
``cluster.placement_index`` and are re-exported here.
"""

from __future__ import annotations

import bisect
import enum
import heapq
import itertools
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import ClassVar, Union

from cluster.placement_index import PrefixIndex, RankIndex, RolePool
from engine.worker_stats import WorkerStats

__all__ = [
    "POLICIES", "WALK", "KVAwarePolicy", "LeastLoadedPolicy", "PlacementPolicy", "PrefixIndex",
    "RankIndex", "RequestInfo", "RolePool", "RoundRobinPolicy", "WorkerState", "make_policy",
]


class WorkerState:
    """The newest stats of a worker plus what was placed on it since they were taken.

    The hot fields (``queued_tokens``, ``free_blocks``, ``num_requests``, ...) are plain
    attributes kept up to date on every change: placement reads them for every worker on
    every request.
    """

    __slots__ = (
        "stats", "worker_id", "role", "pending", "pending_tokens", "pending_blocks", "pending_seqs",
        "queued_tokens", "free_blocks", "num_requests", "draining", "total_blocks",
        "max_num_seqs", "prefill_speed", "headroom_blocks", "watermark",
    )

    def __init__(self, stats: WorkerStats, watermark: float = 0.0) -> None:
        self.worker_id = stats.worker_id
        self.role = stats.role
        """Fixed for this state (a worker that changes role gets a new one)."""
        self.pending: list[tuple[float, int, int]] = []
        """(placement time, prefill tokens, decode blocks) of placements the stats do not show."""
        self.pending_tokens = self.pending_blocks = self.pending_seqs = 0
        self.total_blocks = -1  # set from the first snapshot
        self.watermark = watermark
        """Fraction of blocks a decode placement must leave free (``headroom_blocks``)."""
        self.replace_stats(stats)

    def add_pending(self, now: float, tokens: int, blocks: int) -> None:
        self.pending.append((now, tokens, blocks))
        self.pending_tokens += tokens
        self.pending_blocks += blocks
        self.pending_seqs += 1
        self.queued_tokens += tokens  # the derived fields, kept in step
        self.free_blocks -= blocks
        self.num_requests += 1

    def replace_stats(self, stats: WorkerStats) -> None:
        """Take a newer snapshot; placements made at or before it are now inside it."""
        self.stats = stats
        pending = self.pending
        if pending:
            ts = stats.timestamp
            if len(pending) == 1 and pending[0][0] <= ts:
                pending = self.pending = []  # the usual case: one placement, now in the stats
            else:
                pending = self.pending = [p for p in pending if p[0] > ts]
            if pending:
                self.pending_tokens = sum(p[1] for p in pending)
                self.pending_blocks = sum(p[2] for p in pending)
            else:  # the usual case: the snapshot covers every placement
                self.pending_tokens = self.pending_blocks = 0
            self.pending_seqs = len(pending)
        self.draining = stats.draining
        if stats.total_blocks != self.total_blocks:
            self.total_blocks = stats.total_blocks
            self.headroom_blocks = math.ceil(self.watermark * stats.total_blocks)
        self.max_num_seqs = stats.max_num_seqs
        self.prefill_speed = stats.prefill_tokens_per_s
        # the derived fields (placement reads these); runs once per worker report
        self.queued_tokens = stats.queued_prefill_tokens + self.pending_tokens
        self.free_blocks = stats.free_blocks - self.pending_blocks
        self.num_requests = stats.num_running + stats.num_waiting + self.pending_seqs


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
    lower worker id.

    ``prefill_key`` / ``decode_key`` give a worker's key for a request. A policy whose keys
    order workers the same way for every request (within a *group*: see ``index_fn``) sets
    ``indexed`` and the scheduler keeps its workers in heaps by that order, so a placement
    looks at a few workers instead of all of them (``ranked``); otherwise every worker is
    scored per request.
    """

    name: ClassVar[str] = "base"
    indexed: ClassVar[bool] = False
    """True: ``index_fn`` orders workers as the keys do (for every request)."""
    cache_sensitive: ClassVar[bool] = False
    """True: the prefill key depends on the tokens a worker caches (ranked apart)."""

    def prefill_key(self, w: WorkerState, req: RequestInfo) -> Key:
        raise NotImplementedError

    def decode_key(self, w: WorkerState, req: RequestInfo) -> Key:
        raise NotImplementedError

    def prefill_keys(self, workers: list[WorkerState], req: RequestInfo) -> list[Key]:
        return [self.prefill_key(w, req) for w in workers]

    def decode_keys(self, workers: list[WorkerState], req: RequestInfo) -> list[Key]:
        return [self.decode_key(w, req) for w in workers]

    def index_fn(self, kind: str) -> Callable[[WorkerState], tuple[object, Key]]:
        """For ``kind`` ("prefill" or "decode"): a worker's (group, order key), independent
        of the request. Within a group a lower order key means a lower key for every request
        (for workers not caching the request's prefix, when ``cache_sensitive``)."""
        raise NotImplementedError

    def ranked(self, kind: str, pool: RolePool, req: RequestInfo) -> Iterator[WorkerState]:
        """The pool's non-draining workers, best first, by (key, worker id)."""
        key = self.prefill_key if kind == "prefill" else self.decode_key
        if not self.indexed:  # score every worker
            live = [w for w in pool.members if not w.draining]
            keys = [key(w, req) for w in live]
            return (live[i] for i in sorted(range(len(live)), key=keys.__getitem__))
        apart = self.cache_sensitive and kind == "prefill" and req.cached_tokens
        streams: list[Iterable[WorkerState]] = []
        for index in pool.groups.values():
            stream = index.ordered()
            if apart:
                cached = req.cached_tokens
                stream = (w for w in stream if w.worker_id not in cached)
            streams.append(stream)
        if apart:  # workers caching the prefix: scored one by one
            holders = [pool.by_id[i] for i in req.cached_tokens if i in pool.by_id]
            holders = [w for w in holders if not w.draining]
            holders.sort(key=lambda w: (key(w, req), w.worker_id))
            streams.append(holders)
        if len(streams) == 1:
            return iter(streams[0])
        return heapq.merge(*streams, key=lambda w: (key(w, req), w.worker_id))

    def top(self, kind: str, pool: RolePool, req: RequestInfo) -> WorkerState | None | Walk:
        """The best-ranked worker (None: none) when one index ranks the pool; ``WALK`` when
        the ranking has to be walked (several groups, cached prefixes, not indexed)."""
        index = pool.single
        if index is not None and not (
            self.cache_sensitive and kind == "prefill" and req.cached_tokens
        ):
            return index.first()
        return WALK if pool.members else None

    def best(
        self,
        kind: str,
        pool: RolePool,
        req: RequestInfo,
        ok: Callable[[WorkerState], bool],
        maybe: Callable[[], bool],
    ) -> WorkerState | None:
        """The first of ``ranked`` for which ``ok`` holds. Usually that is ``top``;
        otherwise the walk down the ranking happens only if ``maybe()`` (a cheap bound:
        False means no worker can be ``ok``)."""
        top = self.top(kind, pool, req)
        if top is None or (top is not WALK and ok(top)):
            return top
        if not maybe():
            return None
        return next((w for w in self.ranked(kind, pool, req) if ok(w)), None)

    def on_placed(self, prefill_id: str | None, decode_id: str) -> None:
        """Called after every placement (stateful policies advance here)."""


class RoundRobinPolicy(PlacementPolicy):
    """The next worker in id order after the one picked last, per role."""

    name: ClassVar[str] = "round_robin"

    def __init__(self) -> None:
        self._last: dict[str, str] = {}  # "prefill"/"decode" -> last id picked

    def _key(self, role: str, w: WorkerState) -> Key:
        last = self._last.get(role)
        return (0 if last is None or w.worker_id > last else 1, w.worker_id)

    def prefill_key(self, w: WorkerState, req: RequestInfo) -> Key:
        return self._key("prefill", w)

    def decode_key(self, w: WorkerState, req: RequestInfo) -> Key:
        return self._key("decode", w)

    def ranked(self, kind: str, pool: RolePool, req: RequestInfo) -> Iterator[WorkerState]:
        """Members in id order, starting after the last pick (a rotation, no scoring)."""
        last = self._last.get("prefill" if kind == "prefill" else "decode")
        members = pool.members
        start = 0 if last is None else bisect.bisect_right(pool.ids, last)
        return (w for w in itertools.chain(members[start:], members[:start]) if not w.draining)

    def on_placed(self, prefill_id: str | None, decode_id: str) -> None:
        if prefill_id is not None:
            self._last["prefill"] = prefill_id
        self._last["decode"] = decode_id


class LeastLoadedPolicy(PlacementPolicy):
    """Prefill: fewest backlog tokens. Decode: fewest requests held (then lower KV usage)."""

    name: ClassVar[str] = "least_loaded"
    indexed: ClassVar[bool] = True

    def prefill_key(self, w: WorkerState, req: RequestInfo) -> Key:
        return w.queued_tokens + 1e-3 * w.num_requests

    def decode_key(self, w: WorkerState, req: RequestInfo) -> Key:
        return w.num_requests + 1e-3 * (1.0 - w.free_blocks / (w.total_blocks or 1))

    def index_fn(self, kind: str) -> Callable[[WorkerState], tuple[object, Key]]:
        # keys do not depend on the request: one group, ordered by the key itself
        key = self.prefill_key if kind == "prefill" else self.decode_key
        return lambda w: (None, key(w, _NO_REQUEST))


class KVAwarePolicy(PlacementPolicy):
    """Prefill: estimated TTFT = (backlog + prompt - cached there) / measured speed.
    Decode: KV usage + running-batch occupancy (both in [0, 1])."""

    name: ClassVar[str] = "kv_aware"
    indexed: ClassVar[bool] = True
    cache_sensitive: ClassVar[bool] = True

    def prefill_key(self, w: WorkerState, req: RequestInfo) -> Key:
        cached = req.cached_tokens.get(w.worker_id, 0) if req.cached_tokens else 0
        speed = w.prefill_speed or req.default_prefill_speed
        return (w.queued_tokens + req.num_prompt_tokens - cached) / speed

    def decode_key(self, w: WorkerState, req: RequestInfo) -> Key:
        usage = 1.0 - w.free_blocks / (w.total_blocks or 1)
        return usage + w.num_requests / (w.max_num_seqs or 256)

    def index_fn(self, kind: str) -> Callable[[WorkerState], tuple[object, Key]]:
        if kind == "prefill":
            # among workers of one speed that cache nothing of the prompt, (q + n) / speed
            # grows strictly with the backlog q (integers), whatever n is: group by speed
            return lambda w: (w.prefill_speed, w.queued_tokens)
        # decode_key, inlined (runs on every decode worker report): keep the two in step
        return lambda w: (None, 1.0 - w.free_blocks / (w.total_blocks or 1)
                          + w.num_requests / (w.max_num_seqs or 256))


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


_NO_REQUEST = RequestInfo("", 0, (), {})  # for keys that do not look at the request
class Walk(enum.Enum):
    """``PlacementPolicy.top``'s answer when the ranking has to be walked (an enum: type
    checkers narrow ``is WALK``)."""

    WALK = "walk"


WALK = Walk.WALK
