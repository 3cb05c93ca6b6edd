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

import bisect
import heapq
import itertools
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
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
        if self.pending:
            ts = stats.timestamp
            pending = self.pending = [p for p in self.pending if p[0] > ts]
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

    name = "base"
    indexed = False
    """True: ``index_fn`` orders workers as the keys do (for every request)."""
    cache_sensitive = False
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

    def top(self, kind: str, pool: RolePool, req: RequestInfo) -> WorkerState | None | object:
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
        if top is None or (top is not WALK and ok(top)):  # type: ignore[arg-type]
            return top  # type: ignore[return-value]
        if not maybe():
            return None
        return next((w for w in self.ranked(kind, pool, req) if ok(w)), None)

    def on_placed(self, prefill_id: str | None, decode_id: str) -> None:
        """Called after every placement (stateful policies advance here)."""


class RoundRobinPolicy(PlacementPolicy):
    """The next worker in id order after the one picked last, per role."""

    name = "round_robin"

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

    name = "least_loaded"
    indexed = True

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

    name = "kv_aware"
    indexed = True
    cache_sensitive = True

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
WALK = object()  # PlacementPolicy.top: walk the ranking


class RankIndex:
    """Workers ordered by a key (then worker id), with lazy invalidation.

    A binary heap of ``(key, worker id, seq, state)`` entries; a worker's newest entry is its
    live one and older ones are skipped when met (and dropped when they reach the top, or in
    a rebuild once they outnumber the live ones). ``set`` is O(log n); ``ordered`` walks the
    heap in key order without popping (a frontier heap over array positions), so reading the
    best k workers costs O(k log k) plus the stale entries among them.
    """

    __slots__ = ("_heap", "_live", "_seq")

    def __init__(self) -> None:
        self._heap: list[tuple] = []
        self._live: dict[str, tuple] = {}  # worker id -> its live entry
        self._seq = itertools.count()

    def __len__(self) -> int:
        return len(self._live)

    def set(self, w: WorkerState, key: Key | None) -> None:
        """``w``'s key is now ``key`` (None: leave it out)."""
        live = self._live
        wid = w.worker_id
        old = live.get(wid)
        if old is not None and old[0] == key:
            return
        if key is None:
            if old is not None:
                del live[wid]
            return
        entry = (key, wid, next(self._seq), w)
        live[wid] = entry
        heap = self._heap
        heapq.heappush(heap, entry)
        if len(heap) > 2 * len(live) + 32:  # stale entries dominate: rebuild, O(n) per n sets
            self._heap = list(live.values())
            heapq.heapify(self._heap)

    def _clean_top(self) -> list[tuple]:
        heap, live = self._heap, self._live
        while heap and live.get(heap[0][1]) is not heap[0]:
            heapq.heappop(heap)
        return heap

    def first(self) -> WorkerState | None:
        """The live worker with the lowest (key, id), O(1) amortised."""
        heap, live = self._heap, self._live
        while heap:
            top = heap[0]
            if live.get(top[1]) is top:
                return top[3]
            heapq.heappop(heap)  # a stale top
        return None

    def ordered(self) -> Iterator[WorkerState]:
        """Live workers by (key, id), lazily. Do not ``set`` while iterating."""
        heap, live = self._clean_top(), self._live
        if not heap:
            return
        yield heap[0][3]  # live after the clean-up
        n = len(heap)
        frontier = [(heap[c], c) for c in (1, 2) if c < n]
        heapq.heapify(frontier)
        while frontier:
            entry, i = heapq.heappop(frontier)
            if live.get(entry[1]) is entry:
                yield entry[3]
            for c in (2 * i + 1, 2 * i + 2):
                if c < n:
                    heapq.heappush(frontier, (heap[c], c))


class RolePool:
    """The workers of one role, as placement reads them.

    ``members`` in id order (listing, round robin); when the policy is ``indexed``, one
    ``RankIndex`` per policy group by its order key; and two room bounds that answer "does
    any worker have room?" in O(1) (``spare_top``: most blocks free beyond the watermark
    among workers under their batch cap; ``backlog_top``: least prefill backlog). The bounds
    are consulted only when the best-ranked worker has no room, so they are re-keyed lazily,
    when read. Draining workers are in ``members`` only.
    """

    def __init__(self, kind: str, policy: PlacementPolicy, colocated: bool = False) -> None:
        self.kind = kind  # "prefill" (prefill and colocated pools) or "decode": their ranking
        self.policy = policy
        self.members: list[WorkerState] = []
        self.ids: list[str] = []
        self.by_id: dict[str, WorkerState] = {}
        self.groups: dict[object, RankIndex] = {}
        self.single: RankIndex | None = None  # the index, when the workers form one group
        self._slot: dict[str, tuple[object, RankIndex]] = {}  # worker id -> (group, index)
        self._spare = RankIndex()
        self._backlog = RankIndex()
        self._bounds_stale: dict[str, WorkerState] = {}
        self._decodes = kind == "decode" or colocated
        self._prefills = kind == "prefill"
        self._index_fn = policy.index_fn(kind) if policy.indexed else None

    def add(self, w: WorkerState) -> None:
        i = bisect.bisect_left(self.ids, w.worker_id)
        self.ids.insert(i, w.worker_id)
        self.members.insert(i, w)
        self.by_id[w.worker_id] = w
        self.touch(w)

    def remove(self, w: WorkerState) -> None:
        i = bisect.bisect_left(self.ids, w.worker_id)
        del self.ids[i], self.members[i]
        del self.by_id[w.worker_id]
        self._drop(w)

    def touch(self, w: WorkerState) -> None:
        """``w``'s state changed: re-key it everywhere (O(log n))."""
        if w.draining:  # never has room: only listed
            self._drop(w)
            return
        self._bounds_stale[w.worker_id] = w
        if self._index_fn is not None:
            group, key = self._index_fn(w)
            slot = self._slot.get(w.worker_id)
            if slot is None or slot[0] != group:
                self._ungroup(w)
                index = self.groups.get(group)
                if index is None:
                    index = self.groups[group] = RankIndex()
                    self._regrouped()
                slot = self._slot[w.worker_id] = (group, index)
            slot[1].set(w, key)

    def _drop(self, w: WorkerState) -> None:
        self._ungroup(w)
        self._bounds_stale.pop(w.worker_id, None)
        self._spare.set(w, None)
        self._backlog.set(w, None)

    def _rekey_bounds(self) -> None:
        for w in self._bounds_stale.values():
            if self._decodes:
                capped = w.max_num_seqs and w.num_requests >= w.max_num_seqs
                self._spare.set(w, None if capped else w.headroom_blocks - w.free_blocks)
            if self._prefills:
                self._backlog.set(w, w.queued_tokens)
        self._bounds_stale.clear()

    def spare_top(self) -> WorkerState | None:
        """The non-draining worker under its batch cap with the most blocks free beyond its
        watermark headroom."""
        if self._bounds_stale:
            self._rekey_bounds()
        return self._spare.first()

    def backlog_top(self) -> WorkerState | None:
        """The non-draining worker with the least prefill backlog."""
        if self._bounds_stale:
            self._rekey_bounds()
        return self._backlog.first()

    def _ungroup(self, w: WorkerState) -> None:
        slot = self._slot.pop(w.worker_id, None)
        if slot is None:
            return
        group, index = slot
        index.set(w, None)
        if not len(index):
            del self.groups[group]
            self._regrouped()

    def _regrouped(self) -> None:
        self.single = next(iter(self.groups.values())) if len(self.groups) == 1 else None


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
