"""Iteration-level scheduler with chunked prefill and preemption by recompute.

Pure Python (no torch). Each ``schedule()`` builds one ragged batch under a token budget
(``max_num_batched_tokens``) and a sequence cap (``max_num_seqs``):
  1. running requests first, oldest first: one token for a decode, the next chunk for a
     request still prefilling (a long prompt is split across steps: chunked prefill);
  2. when blocks run out, the newest running request is preempted (blocks freed, back to
     the front of the waiting queue, recomputed later);
  3. then waiting requests are admitted in arrival order while budget, seats and blocks
     last, each starting after its cached prefix (prefix-cache hit).
``update()`` advances the counters with the runner's sampled tokens and finishes requests.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable

from engine.batch import ModelRunnerOutput, ScheduledRequest, SchedulerOutput
from engine.config import SchedulerConfig
from engine.kv_cache_manager import KVCacheManager
from engine.request import Request, RequestStatus


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv: KVCacheManager) -> None:
        self.config = config
        self.kv = kv
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}  # every unfinished request by id
        self.num_preemptions = 0
        self.num_reserved = 0  # decode side: requests holding blocks while their KV travels
        # Called with a request whose prompt KV is computed and that has siblings to fork
        # (n > 1), before its first token's stop check (the engine forks them).
        self.on_prompt_done: Callable[[Request], None] | None = None

    # -- request intake / removal ----------------------------------------------------------
    def add_request(self, request: Request) -> None:
        if request.request_id in self.requests:
            raise ValueError(f"request id {request.request_id!r} is already in use")
        self.requests[request.request_id] = request
        self.waiting.append(request)

    def finish(self, request_id: str, status: RequestStatus) -> Request | None:
        """End a request with a terminal status and free its blocks (unless it is a
        prefilled request whose blocks wait for the KV transfer). None if unknown."""
        request = self.requests.pop(request_id, None)
        if request is None:
            return None
        if request.status == RequestStatus.WAITING_FOR_KV:
            self.num_reserved -= 1
        if request.status == RequestStatus.RUNNING:
            self.running.remove(request)
        elif request.status == RequestStatus.WAITING:
            self.waiting.remove(request)
        # WAITING_FOR_KV requests sit in no queue: only their reserved blocks are freed.
        request.status = status
        if status != RequestStatus.FINISHED_PREFILLED:
            self.kv.free(request)
        return request

    # -- decode side of disaggregation ------------------------------------------------------
    def reserve(self, request: Request) -> bool:
        """Preallocate blocks for a prompt whose KV will arrive by transfer (with a resumed
        request's earlier output tokens: all of its ``token_ids``). The request waits in
        WAITING_FOR_KV, outside the queues. False (nothing held) when the blocks or the
        running-batch seats are not there: the decode side's backpressure."""
        if request.request_id in self.requests:
            raise ValueError(f"request id {request.request_id!r} is already in use")
        seats = self.config.max_num_seqs - len(self.running) - self.num_reserved
        if seats <= 0 or not self.kv.allocate_slots(request, request.num_tokens):
            return False
        request.status = RequestStatus.WAITING_FOR_KV
        self.requests[request.request_id] = request
        self.num_reserved += 1
        return True

    def activate(self, request_id: str, first_token: int) -> Request:
        """The prompt's KV has landed and the prefill side sampled ``first_token``: the
        request joins the running batch (or finishes at once if that token ends it)."""
        request = self.requests[request_id]
        if request.status != RequestStatus.WAITING_FOR_KV:
            raise ValueError(
                f"request {request_id!r} is {request.status.value}, not waiting for KV")
        self.num_reserved -= 1
        request.num_computed_tokens = request.num_tokens  # every token's KV has landed
        request.append_token(first_token)
        request.status = RequestStatus.RUNNING
        self.running.append(request)
        self._start_siblings(request)
        status = request.check_stop()
        if status is not None:
            self.finish(request_id, status)
        return request

    # -- n > 1: siblings sharing a prompt -----------------------------------------------------
    def fork(self, parent: Request, child: Request) -> tuple[int, int] | None:
        """Start ``child`` (same prompt as ``parent``, its own params) from the parent's
        computed prompt KV, shared by reference: it joins the running batch with the last
        prompt token left to compute, so its first sample is its own. Returns the block
        copy the runner must do first (copy-on-write), or None. Raises NoFreeBlocksError
        / ValueError (nothing changed) when there is no block for it or no seat."""
        if child.request_id in self.requests:
            raise ValueError(f"request id {child.request_id!r} is already in use")
        if (parent.status != RequestStatus.RUNNING
                or parent.num_computed_tokens < parent.num_prompt_tokens):
            raise ValueError(f"request {parent.request_id!r} has no computed prompt to fork")
        if not self.has_seat():
            raise ValueError("no seat in the running batch for a forked request")
        if child.num_prompt_tokens == 1:  # nothing to share: an ordinary admission
            self.requests[child.request_id] = child
            self.waiting.appendleft(child)
            return None
        copy = self.kv.fork(parent, child, child.num_prompt_tokens - 1)
        self.requests[child.request_id] = child
        child.status = RequestStatus.RUNNING
        child.first_scheduled_time = time.monotonic()
        self.running.append(child)
        return copy

    def _start_siblings(self, request: Request) -> None:
        if request.siblings and self.on_prompt_done is not None:
            self.on_prompt_done(request)
        request.siblings = ()

    def has_seat(self) -> bool:
        """Room for one more request in the running batch (reserved ones count)."""
        return len(self.running) + self.num_reserved < self.config.max_num_seqs

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    # -- one step --------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        budget = self.config.max_num_batched_tokens
        chosen: list[tuple[Request, int]] = []
        preempted: list[Request] = []
        budget = self._schedule_running(budget, chosen, preempted)
        if not preempted:
            self._schedule_waiting(budget, chosen)
        return self._build_output(chosen, preempted)

    def _schedule_running(self, budget: int, chosen: list, preempted: list) -> int:
        block_size = self.kv.block_size
        i = 0
        while i < len(self.running) and budget > 0:
            request = self.running[i]
            n = min(len(request.token_ids) - request.num_computed_tokens, budget)
            # Fast path (most decode steps): the request's last block still has room.
            if request.num_computed_tokens + n > len(request.block_ids) * block_size:
                while not self.kv.allocate_slots(request, n):
                    victim = self.running[-1]
                    self._preempt(victim)
                    preempted.append(victim)
                    if victim is request:
                        return budget
            chosen.append((request, n))
            budget -= n
            i += 1
        return budget

    def _schedule_waiting(self, budget: int, chosen: list) -> None:
        block_size = self.kv.block_size
        max_seqs = self.config.max_num_seqs - self.num_reserved
        while self.waiting and budget > 0 and len(self.running) < max_seqs:
            request = self.waiting[0]
            cached = self.kv.find_cached_prefix(request)
            n = min(request.num_tokens - len(cached) * block_size, budget)
            if not self.kv.can_admit(request, cached, n):
                return
            self.waiting.popleft()
            self.kv.adopt_cached(request, cached)
            if request.num_preemptions == 0:
                request.num_cached_tokens = len(cached) * block_size
            allocated = self.kv.allocate_slots(request, n)
            assert allocated, "can_admit promised room"
            request.status = RequestStatus.RUNNING
            if request.first_scheduled_time is None:
                request.first_scheduled_time = time.monotonic()
            self.running.append(request)
            chosen.append((request, n))
            budget -= n

    def _preempt(self, request: Request) -> None:
        self.running.remove(request)
        self.kv.free(request)
        request.num_computed_tokens = 0
        request.num_preemptions += 1
        request.status = RequestStatus.WAITING
        self.waiting.appendleft(request)
        self.num_preemptions += 1

    @staticmethod
    def _build_output(chosen: list[tuple[Request, int]], preempted: list) -> SchedulerOutput:
        decodes, prefills = [], []
        total = 0
        for request, n in chosen:
            start = request.num_computed_tokens
            entry = ScheduledRequest(request, n, start, start + n >= request.num_tokens)
            (decodes if n == 1 else prefills).append(entry)
            total += n
        return SchedulerOutput(decodes + prefills, len(decodes), total, preempted)

    def update(self, batch: SchedulerOutput, out: ModelRunnerOutput) -> list[Request]:
        """Apply a step's results. Returns the requests that got a token or finished."""
        touched = []
        sampled = iter(out.sampled_token_ids)
        logprobs = iter(out.logprobs) if out.logprobs is not None else None
        now = time.monotonic()
        block_size = self.kv.block_size
        if out.prompt_logprobs:
            for entry in batch.scheduled:
                chunk = out.prompt_logprobs.get(entry.request.request_id)
                if chunk is not None:
                    _extend_prompt_logprobs(entry.request, *chunk)
        for entry in batch.scheduled:
            request = entry.request
            computed = entry.start + entry.num_new_tokens
            request.num_computed_tokens = computed
            if computed // block_size > request.num_registered_blocks:
                self.kv.cache_computed_blocks(request)
            if not entry.sample:
                continue
            request.append_token(next(sampled))
            lp = next(logprobs) if logprobs is not None else None
            if request.params.logprobs is not None:
                request.logprobs.append(lp)
            if request.first_token_time is None:
                request.first_token_time = now
            self._start_siblings(request)
            status = request.check_stop()
            if status is not None:
                self.finish(request.request_id, status)
            touched.append(request)
        return touched


def _extend_prompt_logprobs(request: Request, first: int, entries: list) -> None:
    """Append a chunk's prompt logprobs (entry i is for prompt token first + i); positions
    already held are skipped (a preempted request recomputes its prompt)."""
    held = len(request.prompt_logprobs)
    assert first <= held, "prompt chunks are computed in order, from a held position"
    request.prompt_logprobs.extend(entries[held - first :])
