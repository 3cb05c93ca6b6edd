"""The indexes placement reads, kept up to date at O(log workers) per change.

Pure Python. ``RankIndex``: workers in a policy's order (a heap with lazy invalidation).
``RolePool``: the workers of one role: listed in id order, ranked by one ``RankIndex`` per
policy group, and two O(1) room bounds. ``PrefixIndex``: which worker caches which chained
block hash. The policies that read them are in ``cluster.placement`` (which re-exports these).
"""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Iterable, Iterator, Sequence
from heapq import heapify, heappop, heappush
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from cluster.placement import Key, PlacementPolicy, WorkerState


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
        # one tuple object, typed as such: liveness is tested by identity (`is`), and a
        # compiled build (cluster.compiled) boxes a fixed-shape tuple anew per use
        entry: tuple = (key, wid, next(self._seq), w)
        live[wid] = entry
        heap = self._heap
        heappush(heap, entry)
        if len(heap) > 2 * len(live) + 32:  # stale entries dominate: rebuild, O(n) per n sets
            self._heap = list(live.values())
            heapify(self._heap)

    def _clean_top(self) -> list[tuple]:
        heap, live = self._heap, self._live
        while heap and live.get(heap[0][1]) is not heap[0]:
            heappop(heap)
        return heap

    def first(self) -> WorkerState | None:
        """The live worker with the lowest (key, id), O(1) amortised."""
        heap, live = self._heap, self._live
        while heap:
            top = heap[0]
            if live.get(top[1]) is top:
                return top[3]
            heappop(heap)  # a stale top
        return None

    def ordered(self) -> Iterator[WorkerState]:
        """Live workers by (key, id), lazily. Do not ``set`` while iterating."""
        heap, live = self._clean_top(), self._live
        if not heap:
            return
        yield heap[0][3]  # live after the clean-up
        n = len(heap)
        frontier = [(heap[c], c) for c in (1, 2) if c < n]
        heapify(frontier)
        while frontier:
            entry, i = heappop(frontier)
            if live.get(entry[1]) is entry:
                yield entry[3]
            for c in (2 * i + 1, 2 * i + 2):
                if c < n:
                    heappush(frontier, (heap[c], c))


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
        """``w``'s state changed: re-key it everywhere (O(log n); runs for every worker that
        changed between two placements)."""
        if w.draining:  # never has room: only listed
            self._drop(w)
            return
        wid = w.worker_id
        self._bounds_stale[wid] = w
        index_fn = self._index_fn
        if index_fn is not None:
            group, key = index_fn(w)
            slot = self._slot.get(wid)
            if slot is None or slot[0] != group:
                slot = self._regroup(w, group)
            slot[1].set(w, key)

    def _regroup(self, w: WorkerState, group: object) -> tuple[object, RankIndex]:
        """Move ``w`` into ``group``'s index (a new worker, or its group key changed)."""
        self._ungroup(w)
        index = self.groups.get(group)
        if index is None:
            index = self.groups[group] = RankIndex()
            self._regrouped()
        slot = self._slot[w.worker_id] = (group, index)
        return slot

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
