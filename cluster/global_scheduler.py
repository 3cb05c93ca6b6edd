"""The global scheduler: picks a prefill and a decode worker for every request.

Pure Python (no torch, ray or grpc): the live cluster and the simulator drive it through the
same five calls.

    update_stats(WorkerStats)   a worker's newest snapshot (also how workers join / drain)
    remove_worker(worker_id)    the worker is gone
    place(request_id, num_prompt_tokens, prompt_token_ids=... | block_hashes=...)
                                -> Placement            placed now
                                -> Queued               no room; waits in the admission queue
                                raises ResourceExhaustedError  queue full: refused
                                raises UnavailableError        no worker of a needed role
    poll_queue() -> QueueUpdate queued requests that now fit (FIFO) or timed out
    cancel(request_id)          drop a queued request (client went away)

Life of a request in here:
  1. ``place`` hashes the prompt's full blocks (``engine.prefix_hash``) and looks up how much
     of it each worker caches (``PrefixIndex``, fed by the workers' added/evicted hashes).
  2. Conditional disaggregation: if the part not cached on a decode worker with room is at
     most ``local_prefill_threshold_tokens``, that worker prefills it itself
     (``Placement.prefill_worker_id is None``: no KV transfer).
  3. Otherwise prefill workers with room are ranked by the policy; for each in turn, decode
     workers with room (and, when partners are bounded, reachable from it) are ranked; the
     first pair wins. Colocated workers are used when there is no prefill+decode pair.
  4. The placement is charged to both workers as *pending* load until a snapshot taken after
     it arrives, so a burst between two reports spreads instead of piling on one worker; the
     prompt's hashes are credited to the prefill worker at once (it will cache them).
  5. No pair has room: the request waits in a bounded FIFO queue (``Queued``) that
     ``poll_queue`` drains as room appears, or is refused when the queue is full / it waited
     past ``admission_queue_timeout_s``.

"Room": a prefill worker that is not draining and whose backlog plus the request's uncached
tokens stays under ``max_queued_prefill_tokens`` (an idle worker always has room); a decode
worker that is not draining, has ``ceil(prompt / block_size)`` blocks free beyond the
watermark, and is under its ``max_num_seqs``.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from cluster.placement import (
    WALK,
    PlacementPolicy,
    PrefixIndex,
    RequestInfo,
    RolePool,
    WorkerState,
    make_policy,
)
from cluster.policy_config import SchedulerConfig
from engine.errors import ResourceExhaustedError, UnavailableError
from engine.prefix_hash import block_hashes as compute_block_hashes
from engine.worker_stats import WorkerStats


@dataclass(frozen=True)
class Placement:
    request_id: str
    prefill_worker_id: str | None
    """Worker that prefills and ships the KV; None: the decode worker prefills locally
    (conditional disaggregation, or a colocated worker)."""
    decode_worker_id: str
    """Worker that receives the KV (reserving blocks first) and decodes."""
    num_cached_tokens_expected: int
    """Prompt tokens the prefilling worker is believed to hold in its prefix cache."""


@dataclass(frozen=True)
class Queued:
    """No placement fits now; the request waits in the admission queue."""

    request_id: str
    position: int  # 0 = next to be placed


@dataclass
class QueueUpdate:
    placed: list[Placement] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)  # timed out in the queue


@dataclass
class _Waiting:
    num_prompt_tokens: int
    block_hashes: tuple[int, ...]
    enqueued_at: float


class GlobalScheduler:
    def __init__(
        self,
        config: SchedulerConfig | None = None,
        policy: str | PlacementPolicy | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config or SchedulerConfig()
        policy = policy if policy is not None else self.config.policy
        self.policy = make_policy(policy) if isinstance(policy, str) else policy
        self._clock = clock
        self._workers: dict[str, WorkerState] = {}
        # colocated workers are ranked like prefill workers (then need decode room too)
        self._pools = {
            "prefill": RolePool("prefill", self.policy),
            "decode": RolePool("decode", self.policy),
            "colocated": RolePool("prefill", self.policy, colocated=True),
        }
        self._index = PrefixIndex()
        self._partners: dict[str, list[str]] = {}  # prefill id -> decode partners (bounded)
        self._queue: OrderedDict[str, _Waiting] = OrderedDict()
        self._speeds_changed = True
        self._default_speed = 1.0
        self._bs = self.config.block_size
        self._local_prefill = self.config.local_prefill_threshold_tokens > 0
        self._stale: dict[str, WorkerState] = {}
        """Workers changed since the pools' indexes last saw them: re-keyed once before the
        next placement (a worker often changes several times between two placements)."""

    # ---- worker membership and stats -------------------------------------------------------

    def update_stats(self, stats: WorkerStats) -> None:
        wid = stats.worker_id
        state = self._workers.get(wid)
        if state is None or state.role != stats.role or stats.block_size != self._bs:
            self._join(stats)
        else:  # the hot path: a known worker's newer snapshot
            if stats.prefill_tokens_per_s != state.prefill_speed:
                self._speeds_changed = True
            state.replace_stats(stats)
            self._stale[wid] = state
        if stats.cache_snapshot:
            self._index.reset(wid, stats.cached_block_hashes_added)
        else:
            if stats.cached_block_hashes_evicted:
                self._index.evict(wid, stats.cached_block_hashes_evicted)
            if stats.cached_block_hashes_added:
                self._index.add(wid, stats.cached_block_hashes_added)
        if stats.draining and stats.role == "decode":
            self._drop_partner(wid)

    def _join(self, stats: WorkerStats) -> None:
        """A new worker, or one that changed role (it starts afresh)."""
        if stats.block_size != self.config.block_size:
            raise ValueError(
                f"worker {stats.worker_id} reports block_size {stats.block_size}, scheduler "
                f"hashes blocks of {self.config.block_size}: set SchedulerConfig.block_size"
            )
        if stats.worker_id in self._workers:
            self.remove_worker(stats.worker_id)
        state = WorkerState(stats, self.config.decode_free_blocks_watermark)
        self._workers[stats.worker_id] = state
        self._pools[stats.role].add(state)
        self._speeds_changed = True

    def remove_worker(self, worker_id: str) -> None:
        state = self._workers.pop(worker_id, None)
        if state is None:
            return
        self._stale.pop(worker_id, None)
        self._pools[state.role].remove(state)
        self._index.remove_worker(worker_id)
        self._speeds_changed = True
        self._partners.pop(worker_id, None)
        self._drop_partner(worker_id)

    def _drop_partner(self, decode_id: str) -> None:
        for partners in self._partners.values():
            if decode_id in partners:
                partners.remove(decode_id)

    def worker_ids(self, role: str) -> list[str]:
        return list(self._pools[role].ids)

    def partners(self, prefill_id: str) -> list[str]:
        return list(self._partners.get(prefill_id, ()))

    @property
    def queue_length(self) -> int:
        return len(self._queue)

    def queued_prompt_blocks(self) -> int:
        """KV blocks the queued requests' prompts will take on a decode worker."""
        bs = self.config.block_size
        return sum(-(-w.num_prompt_tokens // bs) for w in self._queue.values())

    # ---- placement -------------------------------------------------------------------------

    def place(
        self,
        request_id: str,
        num_prompt_tokens: int,
        *,
        prompt_token_ids: Sequence[int] | None = None,
        block_hashes: Sequence[int] | None = None,
    ) -> Placement | Queued:
        """Place a request (see the module docstring). Give the prompt's token ids, or its
        chained block hashes when already computed, or neither (no prefix matching)."""
        if num_prompt_tokens <= 0:
            raise ValueError("num_prompt_tokens must be positive")
        if block_hashes is None:
            block_hashes = (
                compute_block_hashes(prompt_token_ids, self.config.block_size)
                if prompt_token_ids is not None
                else ()
            )
        hashes = tuple(block_hashes)
        if not self._has_workers():
            raise UnavailableError(
                "no prefill+decode pair or colocated worker is ready; retry when workers are up"
            )
        if not self._queue:  # FIFO: nobody may overtake a waiting request
            placed = self._try_place(request_id, num_prompt_tokens, hashes)
            if placed is not None:
                return placed
        if len(self._queue) >= self.config.admission_queue_size:
            raise ResourceExhaustedError(
                f"all workers are full and {len(self._queue)} requests are already waiting; "
                "retry later"
            )
        self._queue[request_id] = _Waiting(num_prompt_tokens, hashes, self._clock())
        return Queued(request_id, len(self._queue) - 1)

    def poll_queue(self) -> QueueUpdate:
        """Place queued requests in arrival order while they fit; refuse timed-out ones."""
        update = QueueUpdate()
        now = self._clock()
        while self._queue:
            request_id, waiting = next(iter(self._queue.items()))
            if now - waiting.enqueued_at > self.config.admission_queue_timeout_s:
                self._queue.popitem(last=False)
                update.refused.append(request_id)
                continue
            placed = self._try_place(request_id, waiting.num_prompt_tokens, waiting.block_hashes)
            if placed is None:
                break
            self._queue.popitem(last=False)
            update.placed.append(placed)
        return update

    def cancel(self, request_id: str) -> bool:
        """Remove a queued request; False if it was not queued."""
        return self._queue.pop(request_id, None) is not None

    def _has_workers(self) -> bool:
        pools = self._pools
        decode = bool(pools["decode"].members)
        local = decode and self.config.local_prefill_threshold_tokens > 0
        return (decode and bool(pools["prefill"].members)) or local or bool(
            pools["colocated"].members
        )

    def _request_info(self, request_id: str, n: int, hashes: tuple[int, ...]) -> RequestInfo:
        bs = self.config.block_size
        matched = self._index.match(hashes) if hashes else None
        cached = {w: min(b * bs, n - 1) for w, b in matched.items()} if matched else {}
        if self._speeds_changed:  # mean measured speed, for workers that have none yet
            known = [s.prefill_speed for s in self._workers.values() if s.prefill_speed > 0]
            self._default_speed = sum(known) / len(known) if known else 1.0
            self._speeds_changed = False
        return RequestInfo(request_id, n, hashes, cached, self._default_speed)

    def _try_place(self, request_id: str, n: int, hashes: tuple[int, ...]) -> Placement | None:
        if self._stale:
            pools = self._pools
            for state in self._stale.values():
                pools[state.role].touch(state)
            self._stale.clear()
        req = self._request_info(request_id, n, hashes)
        need = math.ceil(n / self.config.block_size)
        placement = self._try_local(req, need) if self._local_prefill else None
        if placement is None:
            placement = self._try_pair(req, need)
        if placement is None:
            placement = self._try_colocated(req, need)
        if placement is not None:
            self.policy.on_placed(placement.prefill_worker_id, placement.decode_worker_id)
        return placement

    def _best_of(self, workers: list[WorkerState], req: RequestInfo) -> WorkerState | None:
        """The best decode worker of a short explicit list (lowest key, then id)."""
        key = self.policy.decode_key
        return min(workers, key=lambda w: (key(w, req), w.worker_id), default=None)

    def _try_local(self, req: RequestInfo, need: int) -> Placement | None:
        cfg = self.config
        limit = cfg.local_prefill_threshold_tokens
        pool = self._pools["decode"]
        if limit <= 0:
            return None

        def local(d: WorkerState) -> bool:
            return (decode_room(d, need) and req.uncached(d.worker_id) <= limit
                    and d.queued_tokens <= cfg.local_prefill_max_queued_tokens)

        if req.num_prompt_tokens > limit:  # only workers caching part of the prompt qualify
            holders = [pool.by_id[i] for i in req.cached_tokens if i in pool.by_id]
            d = self._best_of([d for d in holders if local(d)], req)
        else:
            d = self.policy.best("decode", pool, req, local, lambda: any_decode_room(pool, need))
        return None if d is None else self._commit(req, None, d, need)

    def _try_pair(self, req: RequestInfo, need: int) -> Placement | None:
        decodes, prefills = self._pools["decode"], self._pools["prefill"]
        cap = self.config.max_queued_prefill_tokens
        policy = self.policy
        best_d = policy.top("decode", decodes, req)  # usually the answer: no closures
        if best_d is WALK or (best_d is not None and not decode_room(best_d, need)):
            best_d = policy.best("decode", decodes, req, lambda d: decode_room(d, need),
                                 lambda: any_decode_room(decodes, need))
        if best_d is None:
            return None
        bound = self.config.max_decode_partners_per_prefill
        if bound == 0:
            p = policy.top("prefill", prefills, req)
            if p is WALK or (p is not None and not prefill_room(p, req, cap)):
                p = policy.best("prefill", prefills, req, lambda p: prefill_room(p, req, cap),
                                lambda: any_prefill_room(prefills, req, cap))
            return None if p is None else self._commit(req, p, best_d, need)
        if not any_prefill_room(prefills, req, cap):
            return None
        for p in policy.ranked("prefill", prefills, req):
            if not prefill_room(p, req, cap):
                continue
            partners = self._partners.setdefault(p.worker_id, [])
            d: WorkerState | None = best_d
            if len(partners) >= bound:
                mine = [decodes.by_id[i] for i in partners if i in decodes.by_id]
                d = self._best_of([x for x in mine if decode_room(x, need)], req)
            if d is not None:
                if d.worker_id not in partners:
                    partners.append(d.worker_id)
                return self._commit(req, p, d, need)
        return None

    def _try_colocated(self, req: RequestInfo, need: int) -> Placement | None:
        pool = self._pools["colocated"]
        cap = self.config.max_queued_prefill_tokens
        if not pool.members:
            return None
        w = self.policy.best(
            "prefill", pool, req, lambda w: decode_room(w, need) and prefill_room(w, req, cap),
            lambda: any_decode_room(pool, need) and any_prefill_room(pool, req, cap),
        )
        return None if w is None else self._commit(req, None, w, need)

    def _commit(
        self, req: RequestInfo, p: WorkerState | None, d: WorkerState, need: int
    ) -> Placement:
        now = self._clock()
        prefiller = p if p is not None else d
        pid = prefiller.worker_id
        cached = req.cached_tokens.get(pid, 0)
        if p is not None:
            p.add_pending(now, req.num_prompt_tokens - cached, 0)
            d.add_pending(now, 0, need)
            self._stale[p.worker_id] = p
        else:
            d.add_pending(now, req.num_prompt_tokens - cached, need)
        self._stale[d.worker_id] = d
        if req.block_hashes:
            self._index.add(pid, req.block_hashes)  # it is about to cache them
        return Placement(
            req.request_id, p.worker_id if p is not None else None, d.worker_id, cached
        )


# ---- "room": the one definition of where a request may go ---------------------------------


def prefill_room(w: WorkerState, req: RequestInfo, cap: int) -> bool:
    """``w`` may prefill ``req``: not draining, and idle or with backlog + the request's
    uncached tokens <= ``cap``."""
    q = w.queued_tokens
    return not w.draining and (q == 0 or q + req.uncached(w.worker_id) <= cap)


def decode_room(w: WorkerState, need_blocks: int) -> bool:
    """``w`` may decode a request needing ``need_blocks``: not draining, under its batch cap,
    and with the blocks free beyond the watermark headroom."""
    return (
        not w.draining
        and (not w.max_num_seqs or w.num_requests < w.max_num_seqs)
        and w.free_blocks >= need_blocks + w.headroom_blocks
    )


def any_decode_room(pool: RolePool, need_blocks: int) -> bool:
    """Exact, O(1): the worker with the most spare blocks (under its cap) has enough."""
    top = pool.spare_top()
    return top is not None and top.free_blocks >= need_blocks + top.headroom_blocks


def any_prefill_room(pool: RolePool, req: RequestInfo, cap: int) -> bool:
    """O(1) and never False when some worker has room: the smallest backlog with the largest
    cache hit of the request (so a True may still find no worker)."""
    top = pool.backlog_top()
    if top is None:
        return False
    q = top.queued_tokens
    hit = max(req.cached_tokens.values(), default=0)
    return q == 0 or q + req.num_prompt_tokens - hit <= cap
