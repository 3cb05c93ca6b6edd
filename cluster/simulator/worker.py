"""A simulated worker: chunked prefill and continuous-batching decode against a cost model.

One class serves the three roles. A worker alternates between two kinds of *segments*:

  mixed step     the prefill queue is not empty: one engine step computes a chunk of prompt
                 tokens (the step's token budget minus one token per running decode) and one
                 token for every running decode. One event per step.
  decode run     only decodes: the batch is advanced analytically over ``m`` steps, up to the
                 step at which its first member finishes. Step j lasts
                 ``a + c * (K0 + j * B)`` (B sequences, K0 context tokens at the start: every
                 step adds B tokens of KV to read), so ``m`` steps take
                 ``m * a + c * (m * K0 + B * m * (m - 1) / 2)``. One event per run; a request
                 joining mid-run shortens it to the step boundary after the join.

Request progress is counters: ``prefill_left`` tokens to compute, and for decodes a finish
step on the worker's step counter (a heap), so a run costs O(log B), not O(B).

Decode-side KV: blocks for prompt + output are reserved when the request is placed (the
receiver preallocates, so there is no preemption in the simulator). The prefix cache is an
LRU of chained block hashes, as big as the worker's KV cache; hits are decided when a request
is accepted and the blocks it fills are cached when its prefill completes.
"""

from __future__ import annotations

import dataclasses
import heapq
import math
from collections import OrderedDict, deque
from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol

from cluster.simulator.profiles import CostProfile
from engine.worker_stats import WorkerStats

if TYPE_CHECKING:
    from cluster.simulator.config import SimConfig


class SimRequest:
    __slots__ = (
        "idx", "rid", "arrival", "prompt", "output", "hashes", "decode_worker",
        "prefill_left", "computed", "cached", "blocks", "ctx_join", "join_step",
    )

    def __init__(self, idx: int, arrival: float, prompt: int, output: int, hashes: tuple):
        self.idx, self.rid, self.arrival = idx, str(idx), arrival
        self.prompt, self.output, self.hashes = prompt, output, hashes
        self.decode_worker: SimWorker | None = None
        self.prefill_left = prompt  # prompt tokens still to compute
        self.computed = 0  # prompt tokens in KV so far (cache hits included)
        self.cached = 0  # prompt tokens served by the prefix cache
        self.blocks = 0  # decode-side blocks reserved
        self.ctx_join = 0  # context length when the request joined the decode batch
        self.join_step = 0  # worker step counter at the join


class Host(Protocol):
    """What a worker needs from the simulation around it."""

    def schedule(self, t: float, worker: SimWorker) -> None: ...
    def first_token(self, r: SimRequest, t: float) -> None: ...
    def prefill_done(self, r: SimRequest, t: float, worker: SimWorker) -> None: ...
    def finished(self, r: SimRequest, t: float) -> None: ...
    def decode_steps(self, t: float, d0: float, d1: float, m: int, batch: int) -> None: ...


class SimWorker:
    # slots: the loop reads a few fields of a random one of ~1,000 workers per event; slots
    # keep them in the object itself (one cache line less to fetch than instance values)
    __slots__ = (
        "wid", "role", "prof", "host", "block_size", "total_blocks", "chunk", "max_seqs",
        "max_prefill_seqs", "prefill_q", "queued_tokens", "decode_wait", "expecting", "heap",
        "sum_ctx", "steps", "reserved", "busy", "version", "seg", "chunks", "busy_s",
        "alive_from", "alive_to", "draining", "move_to", "link_free", "lru", "_added",
        "_evicted", "prefill_speed", "_kv_c", "_decode_fixed_s", "_decode_per_seq_s",
        "_schedule", "_fields", "_believed",
    )

    def __init__(
        self, wid: str, role: str, prof: CostProfile, cfg: SimConfig, host: Host, now: float
    ):
        self.wid, self.role, self.prof, self.host = wid, role, prof, host
        self.block_size = cfg.scheduler.block_size
        capacity = cfg.kv_capacity_tokens or prof.kv_capacity_tokens
        self.total_blocks = max(1, capacity // self.block_size)
        self.chunk = cfg.prefill_chunk_tokens if role == "prefill" else cfg.colocated_chunk_tokens
        self.max_seqs = cfg.decode_max_num_seqs if role != "prefill" else 0
        self.max_prefill_seqs = cfg.prefill_max_num_seqs
        self.prefill_q: deque[SimRequest] = deque()
        self.queued_tokens = 0
        self.decode_wait: deque[SimRequest] = deque()
        self.expecting = 0  # reserved here, KV not arrived yet
        self.heap: list[tuple[int, int, SimRequest]] = []  # (finish step, idx, request)
        self.sum_ctx = 0  # KV tokens of the running batch
        self.steps = 0
        self.reserved = 0
        self.busy = False
        self.version = 0
        self.seg: tuple[float, int, int, int, float, float, float] = (0, 0, 0, 0, 0, 0, 0)
        self.chunks: Sequence[tuple[SimRequest, int]] = _NO_CHUNKS  # the step's prompt chunks
        self.busy_s = 0.0
        self.alive_from, self.alive_to = now, math.inf
        self.draining = False
        self.move_to: str | None = None
        self.link_free = 0.0  # outbound KV link busy until
        self.lru: OrderedDict[int, None] = OrderedDict()
        self._added: set[int] = set()
        self._evicted: set[int] = set()
        self.prefill_speed = prof.prefill_tokens_per_s(self.chunk)
        self._kv_c = prof.decode_per_kv_byte_s * prof.kv_bytes_per_token  # s per KV token read
        self._decode_fixed_s, self._decode_per_seq_s = prof.decode_fixed_s, prof.decode_per_seq_s
        self._schedule = host.schedule
        self._fields = _constant_fields(self)
        self._believed: tuple | None = None
        """(requests held, backlog, free blocks, draining) as the scheduler derives them."""

    # ---- requests arriving -----------------------------------------------------------------

    def accept_prefill(self, r: SimRequest, now: float) -> None:
        """Queue ``r``'s prompt here (prefill role, or a local prefill on decode/colocated)."""
        hits = 0
        if r.hashes:
            lru = self.lru
            for h in r.hashes:
                if h not in lru:
                    break
                lru.move_to_end(h)
                hits += 1
        r.cached = r.computed = min(hits * self.block_size, r.prompt - 1)
        r.prefill_left = left = r.prompt - r.cached
        self.prefill_q.append(r)
        self.queued_tokens += left
        if not self.busy:  # = self.kick(now), inlined (once per request)
            self._start(now)
        elif not self.chunks and self.seg[1] > 1:
            self._interrupt(now)

    def reserve(self, r: SimRequest) -> None:
        """Preallocate decode blocks for prompt + output; the KV (or local prefill) follows."""
        r.blocks = -(-(r.prompt + r.output) // self.block_size)
        r.decode_worker = self
        self.reserved += r.blocks
        self.expecting += 1

    def receive_kv(self, r: SimRequest, now: float) -> None:
        self.expecting -= 1
        self.decode_wait.append(r)
        if not self.busy:  # = self.kick(now), inlined (once per request)
            self._start(now)
        elif not self.chunks and self.seg[1] > 1:
            self._interrupt(now)

    def release(self, r: SimRequest) -> None:
        """Drop a reservation whose request ended before decoding (one-token outputs)."""
        self.reserved -= r.blocks
        self.expecting -= 1

    # ---- the event loop's entry points -----------------------------------------------------

    def kick(self, now: float) -> None:
        """New work arrived: start if idle, or cut a decode run at the next step boundary."""
        if not self.busy:
            self._start(now)
        elif not self.chunks and self.seg[1] > 1:
            self._interrupt(now)

    def on_event(self, now: float, version: int) -> bool:
        """End of the current segment; False if the event is stale."""
        if version != self.version or not self.busy:
            return False
        self.end_segment(now)
        return True

    def is_idle(self) -> bool:
        return not (self.busy or self.prefill_q or self.heap or self.decode_wait or self.expecting)

    # ---- segments --------------------------------------------------------------------------

    def _start(self, now: float) -> None:
        heap = self.heap
        if self.decode_wait:
            wait, steps = self.decode_wait, self.steps
            while wait and len(heap) < self.max_seqs:
                r = wait.popleft()
                r.ctx_join, r.join_step = r.prompt + 1, steps
                heapq.heappush(heap, (steps + r.output - 1, r.idx, r))
                self.sum_ctx += r.ctx_join
        batch = len(heap)
        chunks = (self._take_chunks(self.chunk - batch) if self.prefill_q and self.chunk > batch
                  else _NO_CHUNKS)
        self.chunks = chunks
        if chunks:
            n, attn = 0, 0.0
            for r, c in chunks:  # tokens computed, attention pairs (= sum(), same order)
                n += c
                attn += c * (r.computed + c / 2)
            p = self.prof
            base = p.decode_step_s(batch, self.sum_ctx) if batch else p.prefill_fixed_s
            dur = base + p.prefill_per_token_s * n + p.prefill_per_attn_pair_s * attn
            self.seg = (now, 1, batch, self.sum_ctx, dur, 0.0, dur)
        elif batch:
            m = heap[0][0] - self.steps
            a = self._decode_fixed_s + self._decode_per_seq_s * batch
            c, k0 = self._kv_c, self.sum_ctx
            # _run_time(m, a, c, k0, batch), inlined (once per decode run)
            dur = m * a + c * (m * k0 + batch * m * (m - 1) / 2)
            self.seg = (now, m, batch, k0, a, c, dur)
        else:
            self.busy = False
            return
        self.busy = True
        self.version += 1
        self._schedule(now + dur, self)

    def _take_chunks(self, budget: int) -> list[tuple[SimRequest, int]]:
        """The step's prompt chunks, FIFO, within ``budget`` (> 0) tokens."""
        chunks: list[tuple[SimRequest, int]] = []
        cap = self.max_prefill_seqs
        for r in self.prefill_q:
            if budget <= 0 or len(chunks) >= cap:
                break
            n = r.prefill_left if r.prefill_left < budget else budget
            chunks.append((r, n))
            budget -= n
        return chunks

    def _interrupt(self, now: float) -> None:
        t0, m, batch, k0, a, c, _ = self.seg
        elapsed = now - t0
        qa = c * batch / 2
        qb = a + c * k0 - qa
        done = elapsed / qb if qa == 0 else (-qb + _sqrt(qb * qb + 4 * qa * elapsed)) / (2 * qa)
        new_m = int(done) + 1
        if new_m < 1:  # = max(1, int(done) + 1)
            new_m = 1
        dur = new_m * a + c * (new_m * k0 + batch * new_m * (new_m - 1) / 2)  # = _run_time
        while dur < elapsed:  # the closed form's rounding, corrected
            new_m += 1
            dur = _run_time(new_m, a, c, k0, batch)
        if new_m >= m:
            return
        self.seg = (t0, new_m, batch, k0, a, c, dur)
        self.version += 1
        self._schedule(t0 + dur, self)

    def end_segment(self, now: float) -> bool:
        """The current (live, busy) segment ends now: account for it and start the next
        (``on_event`` without the staleness check, which the event loop makes itself).

        Returns whether anything ``report`` compares changed (a request finished, prompt
        tokens were computed): a decode run cut short for a joining request changes
        nothing the scheduler reads, and needs no report."""
        t0, m, batch, k0, a, c, dur = self.seg
        self.busy_s += now - t0
        self.busy = False
        chunks = self.chunks
        visible = bool(chunks)
        if batch:
            first = a + c * k0 if not chunks else dur
            last = a + c * (k0 + (m - 1) * batch) if not chunks else dur
            host = self.host
            host.decode_steps(now, first, last, m, batch)
            steps = self.steps = self.steps + m
            self.sum_ctx += batch * m
            heap = self.heap
            if heap and heap[0][0] <= steps:
                visible = True
            while heap and heap[0][0] <= steps:
                _, _, r = heapq.heappop(heap)
                self.sum_ctx -= r.ctx_join + steps - r.join_step
                self.reserved -= r.blocks
                host.finished(r, now)
        if chunks:
            done = 0
            for r, n in chunks:
                r.prefill_left -= n
                r.computed += n
                done += n
            self.queued_tokens -= done
            q = self.prefill_q
            while q and q[0].prefill_left == 0:
                self._prefill_complete(q.popleft(), now)
            self.chunks = _NO_CHUNKS
        self._start(now)
        return visible

    def _prefill_complete(self, r: SimRequest, now: float) -> None:
        self._cache(r.hashes)
        self.host.first_token(r, now)
        if self.role == "prefill":
            self.host.prefill_done(r, now, self)
        elif r.output <= 1:
            self.reserved -= r.blocks
            self.expecting -= 1
            self.host.finished(r, now)
        else:
            self.expecting -= 1
            self.decode_wait.append(r)

    def _cache(self, hashes: tuple) -> None:
        lru = self.lru
        for h in hashes:
            if h in lru:
                lru.move_to_end(h)
                continue
            lru[h] = None
            if h in self._evicted:
                self._evicted.discard(h)  # evicted and back within one report: no net change
            else:
                self._added.add(h)
        while len(lru) > self.total_blocks:
            old, _ = lru.popitem(last=False)
            if old in self._added:
                self._added.discard(old)
            else:
                self._evicted.add(old)

    # ---- reporting -------------------------------------------------------------------------

    def report(self, now: float) -> WorkerStats | None:
        """The snapshot to send the scheduler, or None when what it believes is already
        exact: the requests held, backlog, free blocks and draining flag it derives from the
        last report plus the placements made since (``placed``) equal the worker's, and no
        cache change is due. (Placement reads only those; pending placements it keeps are
        replaced by the next snapshot sent.)"""
        waiting = len(self.prefill_q) + len(self.decode_wait) + self.expecting
        running = len(self.heap)
        free = self.total_blocks - self.reserved
        if free < 0:
            free = 0
        view = (waiting + running, self.queued_tokens, free, self.draining)
        if view == self._believed and not (self._added or self._evicted):
            return None
        self._believed = view
        added: tuple[int, ...] = ()
        evicted: tuple[int, ...] = ()
        if self._added or self._evicted:
            added, evicted = tuple(self._added), tuple(self._evicted)
            self._added.clear()
            self._evicted.clear()
        # the hot path (one per worker change): fill the new object's own __dict__ with this
        # worker's constant fields and set the changing ones, instead of the frozen
        # dataclass's __init__ (~8x slower: it sets fields one object.__setattr__ at a time
        # and re-validates what the counters guarantee); the result is the same object
        # (equal, same type: tests/cluster/test_sim_speed.py)
        stats = _new(WorkerStats)
        fields = stats.__dict__
        fields.update(self._fields)
        fields["num_waiting"] = waiting
        fields["num_running"] = running
        fields["queued_prefill_tokens"] = self.queued_tokens
        fields["free_blocks"] = free
        fields["draining"] = self.draining
        fields["cached_block_hashes_added"] = added
        fields["cached_block_hashes_evicted"] = evicted
        fields["timestamp"] = now
        return stats

    def placed(self, tokens: int, blocks: int) -> None:
        """The scheduler placed a request here, counting ``tokens`` of backlog and ``blocks``
        of KV as pending until the next snapshot (``GlobalScheduler._commit``)."""
        if self._believed is not None:
            held, queued, free, draining = self._believed
            self._believed = (held + 1, queued + tokens, free - blocks, draining)

    def stats(self, now: float) -> WorkerStats:
        """The worker's snapshot now (always)."""
        self._believed = None
        report = self.report(now)
        assert report is not None
        return report


_new = object.__new__
_sqrt = math.sqrt
_NO_CHUNKS: tuple = ()  # a decode run's (or an idle worker's) prompt chunks


def _constant_fields(w: SimWorker) -> dict:
    """A worker's report with the fields that never change filled (the rest at defaults)."""
    fields = {f.name: f.default for f in dataclasses.fields(WorkerStats)
              if f.default is not dataclasses.MISSING}
    fields.update(
        worker_id=w.wid, role=w.role, total_blocks=w.total_blocks, block_size=w.block_size,
        prefill_tokens_per_s=w.prefill_speed, decode_tokens_per_s=0.0,  # not modelled
        max_num_seqs=w.max_seqs,
    )
    order = [f.name for f in dataclasses.fields(WorkerStats)]
    return {name: fields.get(name) for name in order}


def _run_time(m: int, a: float, c: float, k0: int, batch: int) -> float:
    """Duration of ``m`` decode steps starting with ``k0`` context tokens over ``batch``."""
    return m * a + c * (m * k0 + batch * m * (m - 1) / 2)
