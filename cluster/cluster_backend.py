"""The disaggregated cluster as a ServingBackend: the router's requests, placed and run.

Life of a request here (DESIGN §1):
  1. ``place`` with the global scheduler → (prefill P, decode D); no room: wait in the
     admission queue (released as stats/finishes free room) or refuse (RESOURCE_EXHAUSTED).
  2. D.reserve → block ids (None: D filled up meanwhile → place again, bounded).
  3. P.prefill(request, D's endpoint, block ids) → the first token, streamed at once.
  4. D.start(first token); D's deltas (coalesced per step, one long-poll per D for all
     requests) stream to the client until the final one.
  Local prefill (conditional disaggregation, colocated workers): D.generate, then step 4.
  Cancel / deadline / stop string: ``abort`` reaches P and D; every block is freed there.

Migration (``cluster.flight``): a worker that dies under a request does not fail it.
  - P dies before the first token (or before the KV landed): the decode reservation is
    released at once and the request is re-placed and re-prefilled.
  - D dies: the prompt plus every token already streamed is re-prefilled on a healthy pair
    (waiting for a replacement up to the request's deadline) and the stream goes on.
  - The KV transfer fails (a broken pair channel): retried once on a new placement.
  A request already decoding is untouched by its prefill worker's death. Each request
  migrates at most ``max_migrations`` times; every migration is counted
  (``migrations``) and reported in the request's timing breakdown.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from cluster.backend import (
    MIGRATION_COUNT,
    BackendOutput,
    BackendRequest,
    ServingBackend,
    TokenLogprob,
    sample_params,
)
from cluster.flight import MIGRATION_KINDS, Attempt, AttemptIds, Flight, Migrate
from cluster.global_scheduler import GlobalScheduler, Placement, Queued
from cluster.handles import DecodeHandle, WorkerGone, WorkerHandle
from engine.errors import ResourceExhaustedError, SplitServeError, UnavailableError

log = logging.getLogger(__name__)
MAX_PLACE_ATTEMPTS = 3
MAX_MIGRATIONS = 3  # per request, all kinds together
MAX_TRANSFER_RETRIES = 1  # a failed KV transfer is retried once
RESUME_WAIT_S = 120.0  # how long a migrating request without a deadline waits for workers


class RequestFailed(SplitServeError):
    code = "INTERNAL"


class _WorkerLost:
    """Queued into an attempt's stream when one of its workers dies."""

    def __init__(self, kind: str, why: str) -> None:
        self.kind, self.why = kind, why


class ClusterBackend(ServingBackend):
    def __init__(self, scheduler: GlobalScheduler, stats_interval_s: float = 0.5,
                 window=None, max_migrations: int = MAX_MIGRATIONS) -> None:
        self.scheduler = scheduler
        # Optional cluster.autoscaler.RollingWindow fed with TTFT / ITL / arrival samples.
        self.window = window
        self.stats_interval_s = stats_interval_s
        self.max_migrations = max_migrations
        self.workers: dict[str, WorkerHandle] = {}  # PrefillHandle / DecodeHandle
        self._endpoints: dict[str, object] = {}  # decode worker id -> KV endpoint
        # prefill worker id -> KV heads of each of its tensor-parallel ranks (the decode
        # side plans its receives from them)
        self._kv_heads: dict[str, list[tuple[int, int]]] = {}
        self._flights: dict[str, Flight] = {}  # client request id -> its record
        self._ids = AttemptIds()
        self._by_worker_rid: dict[str, Flight] = {}  # current attempt's worker-side id
        self._queued: dict[str, asyncio.Future] = {}  # worker-side id -> placement
        self._tasks: dict[str, asyncio.Task] = {}
        self._cleanups: set[asyncio.Task] = set()  # frees of late reservations, held until done
        self._stats_task: asyncio.Task | None = None
        self._draining: dict[str, asyncio.Event] = {}  # worker id -> set when it holds no request
        self._membership: asyncio.Event | None = None  # set when a worker joins
        self._closed = False
        self.last_stats: dict[str, object] = {}  # worker id -> newest WorkerStats (metrics)
        # (worker id, role) of a worker that died; the cluster sets it to replace workers.
        self.on_worker_lost: Callable[[str, str], None] | None = None
        # Requests moved to another attempt, by why (cumulative; metrics read it).
        self.migrations: dict[str, int] = dict.fromkeys(MIGRATION_KINDS, 0)
        self.migrations_failed = 0  # requests that ran out of migrations or time
        # Whether a lost worker of a role is being replaced; the cluster sets it.
        self.replacement_pending: Callable[[str], bool] = lambda role: False

    # -- membership ------------------------------------------------------------------------
    async def add_worker(self, handle: WorkerHandle) -> None:
        """Register a ready worker (its first stats report makes it placeable)."""
        self.workers[handle.worker_id] = handle
        self.readiness_may_have_changed()
        if handle.role in ("decode", "colocated"):
            if handle.role == "decode":
                self._endpoints[handle.worker_id] = await handle.endpoint()
            self._tasks[handle.worker_id] = asyncio.create_task(self._pump(handle))
        elif handle.role == "prefill":
            self._kv_heads[handle.worker_id] = await handle.kv_heads()
        await self._report(handle)
        if self._membership is not None:  # wake requests waiting for a worker
            self._membership.set()
            self._membership = None

    def _requests_on(self, worker_id: str) -> list[Flight]:
        return [f for f in self._flights.values() if worker_id in f.attempt.workers()]

    async def drain_and_remove(self, worker_id: str, timeout_s: float = 300.0) -> None:
        """Stop placing on the worker, wait for its requests to finish, then forget it."""
        handle = self.workers[worker_id]
        idle = self._draining.setdefault(worker_id, asyncio.Event())
        self.readiness_may_have_changed()
        self.scheduler.update_stats(await handle.stats(True))
        self._check_drained(worker_id)
        try:
            await asyncio.wait_for(idle.wait(), timeout_s)
        except asyncio.TimeoutError:
            log.warning("drain of %s timed out; aborting its requests", worker_id)
            for flight in self._requests_on(worker_id):
                await self.abort(flight.request_id)
        self.remove_worker(worker_id)

    def _check_drained(self, worker_id: str) -> None:
        idle = self._draining.get(worker_id)
        if idle is not None and not self._requests_on(worker_id):
            idle.set()

    def lose_worker(self, worker_id: str, why: str) -> None:
        """The worker died: move its requests elsewhere, forget it, and tell
        ``on_worker_lost`` (the cluster replaces it)."""
        handle = self.workers.get(worker_id)
        if handle is None:
            return  # already lost (several calls can fail at once)
        log.error("worker %s is gone: %s", worker_id, why)
        self._migrate_worker_requests(worker_id, handle.role, why)
        self.remove_worker(worker_id)
        if self.on_worker_lost is not None and not self._closed:
            self.on_worker_lost(worker_id, handle.role)

    def _migrate_worker_requests(self, worker_id: str, role: str, why: str) -> None:
        """Tell each request that needs the dead worker; a request that has left its prefill
        worker behind (decoding) does not need it."""
        for flight in self._flights.values():
            attempt = flight.attempt
            if attempt.decode_id == worker_id:
                attempt.queue.put_nowait(_WorkerLost("decode", why))
            elif attempt.prefill_id == worker_id and attempt.phase in ("prefill", "kv"):
                attempt.queue.put_nowait(_WorkerLost("prefill", why))

    def remove_worker(self, worker_id: str) -> None:
        self.scheduler.remove_worker(worker_id)
        self.workers.pop(worker_id, None)
        self.last_stats.pop(worker_id, None)
        self._endpoints.pop(worker_id, None)
        self._kv_heads.pop(worker_id, None)
        self._draining.pop(worker_id, None)
        task = self._tasks.pop(worker_id, None)
        if task is not None:
            task.cancel()
        self.readiness_may_have_changed()

    # -- ServingBackend ------------------------------------------------------------------
    async def start(self) -> None:
        if self._stats_task is None:
            self._stats_task = asyncio.create_task(self._stats_loop())

    async def shutdown(self) -> None:
        self._closed = True
        for rid in list(self._flights):
            await self.abort(rid)
        tasks = [t for t in [self._stats_task, *self._tasks.values()] if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._tasks.clear()
        self._stats_task = None

    def is_ready(self) -> bool:
        return self._ready_with(set())

    def can_accept(self) -> bool:
        """Ready, or ready once the replacements being started have joined."""
        if self._closed:
            return False
        return self._ready_with({r for r in ("prefill", "decode", "colocated")
                                 if self.replacement_pending(r)})

    def _ready_with(self, extra_roles: set[str]) -> bool:
        roles = {h.role for wid, h in self.workers.items() if wid not in self._draining}
        roles |= extra_roles
        return "colocated" in roles or {"prefill", "decode"} <= roles

    def stats(self) -> dict:
        return {
            "workers": {wid: h.role for wid, h in self.workers.items()},
            "draining": sorted(self._draining),
            "in_flight": len(self._flights),
            "admission_queue": self.scheduler.queue_length,
            "migrations": dict(self.migrations),
            "migrations_failed": self.migrations_failed,
        }

    async def abort(self, request_id: str) -> None:
        flight = self._flights.get(request_id)
        if flight is not None:
            for one in (flight, *flight.children):  # n > 1: samples that went on alone
                await self._abort_attempt(one.attempt)

    async def abort_sample(self, request_id: str, index: int) -> None:
        flight = self._flights.get(request_id)
        if flight is None or index in flight.finished:
            return
        alone = f"{request_id}.{index}"  # a sample that went on alone after a failure
        for child in flight.children:
            if child.request_id == alone:
                await self._abort_attempt(child.attempt)
                return
        attempt = flight.attempt
        worker_rid = next((rid for rid, i in attempt.members.items() if i == index), None)
        decode = self.workers.get(attempt.decode_id or "")
        if worker_rid is None or decode is None:
            return
        try:  # the worker ends it only once it decodes on its own blocks
            await decode.call("abort_sample", worker_rid)
        except Exception as e:  # a lost worker: the migration path handles the request
            log.warning("abort of sample %d of %s failed: %s", index, request_id, e)

    async def _abort_attempt(self, attempt: Attempt) -> None:
        """Free the attempt's resources on every worker of it that is still alive."""
        fut = self._queued.pop(attempt.worker_rid, None)
        if fut is not None:
            self.scheduler.cancel(attempt.worker_rid)
            fut.cancel()
        calls = [self.workers[w].abort(attempt.worker_rid) for w in attempt.workers()
                 if w in self.workers]
        for result in await asyncio.gather(*calls, return_exceptions=True):
            if isinstance(result, Exception):
                log.warning("abort of %s failed on a worker: %s", attempt.worker_rid, result)

    def submit(self, request: BackendRequest) -> AsyncIterator[BackendOutput]:
        return self._run(request)

    # -- one request ---------------------------------------------------------------------
    async def _run(self, req: BackendRequest,
                   flight: Flight | None = None) -> AsyncIterator[BackendOutput]:
        """One request to its end (``flight``: a prepared record, for an n > 1 sample that
        goes on alone)."""
        rid = req.request_id
        fresh = flight is None
        flight = flight or Flight(req, Attempt(self._ids.new(rid, 0)))
        flight.timing.setdefault("router_queue_start", time.time())
        self._flights[rid] = flight
        try:
            if self.window is not None and fresh:
                self.window.add_arrival(time.time(), len(req.prompt_token_ids))
            async for out in self._serve(flight):
                flight.outputs.setdefault(out.index, []).extend(out.new_token_ids)
                if out.finish_reason is not None:
                    flight.finished.add(out.index)
                self._observe(flight, out)
                yield out
        except SplitServeError as exc:
            for index in range(req.n):  # one final per sample still open
                if index not in flight.finished:
                    flight.finished.add(index)
                    yield self._final(flight, BackendOutput(rid, [], "error", error=exc,
                                                            index=index), {})
        finally:
            self._forget(flight)  # first: a second cancellation cannot leave it behind
            if not flight.done():  # shielded: a client that cancels twice still frees workers
                await asyncio.shield(self._abort_attempt(flight.attempt))

    def _forget(self, flight: Flight) -> None:
        self._flights.pop(flight.request_id, None)
        for worker_rid in flight.attempt.members:
            self._by_worker_rid.pop(worker_rid, None)
        for worker_id in flight.attempt.workers():
            self._check_drained(worker_id)
        self._poll_admission()

    async def _serve(self, flight: Flight) -> AsyncIterator[BackendOutput]:
        """Attempt after attempt until the request ends (see ``cluster.flight``)."""
        while True:
            try:
                async for out in self._attempt(flight):
                    yield out
                return
            except Migrate as why:
                await self._migrate(flight, why)
                if flight.req.n > 1:  # each open sample goes on alone
                    async for out in self._fan_out(flight):
                        yield out
                    return
                if flight.remaining_tokens() <= 0:  # every token was out: only the end was lost
                    yield self._final(flight, BackendOutput(flight.request_id, [], "length"),
                                      {})
                    return

    async def _fan_out(self, flight: Flight) -> AsyncIterator[BackendOutput]:
        """n > 1 after a failed attempt: every open sample continues as a request of its
        own (its seed, the tokens it streamed), concurrently; their outputs are merged
        back under the request's id with their sample index."""
        merged: asyncio.Queue = asyncio.Queue()
        ended = object()

        async def sample(index: int) -> None:
            req = dataclasses.replace(flight.req, request_id=f"{flight.request_id}.{index}",
                                      params=sample_params(flight.req.params, index), n=1)
            child = Flight(req, Attempt(self._ids.new(req.request_id, flight.num_migrations)),
                           outputs={0: list(flight.outputs.get(index, []))},
                           migrations=dict(flight.migrations), timing=dict(flight.timing),
                           last_token_time=time.time())
            flight.children.append(child)
            try:
                if child.remaining_tokens() <= 0:  # all its tokens were out; its end was lost
                    merged.put_nowait((index, self._final(child, BackendOutput(
                        req.request_id, [], "length"), {})))
                    return
                async for out in self._run(req, child):
                    merged.put_nowait((index, out))
            finally:
                merged.put_nowait((index, ended))

        tasks = [asyncio.create_task(sample(i)) for i in range(flight.req.n)
                 if i not in flight.finished]
        try:
            for _ in tasks:
                while (item := await merged.get())[1] is not ended:
                    index, out = item
                    yield dataclasses.replace(out, request_id=flight.request_id, index=index)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _migrate(self, flight: Flight, why: Migrate) -> None:
        """End the failed attempt everywhere and prepare the next one (or give up)."""
        old = flight.attempt
        self._by_worker_rid.pop(old.worker_rid, None)
        await self._abort_attempt(old)
        for worker_id in old.workers():
            self._check_drained(worker_id)
        flight.migrations[why.kind] += 1
        transfer_retries_left = flight.migrations["transfer"] <= MAX_TRANSFER_RETRIES
        if flight.num_migrations > self.max_migrations or not transfer_retries_left:
            self.migrations_failed += 1
            reason = str(why).removesuffix("; retry the request")  # said once, below
            raise UnavailableError(
                f"request {flight.request_id} failed after {flight.num_migrations - 1} "
                f"retries: {reason}; retry the request")
        self.migrations[why.kind] += 1
        log.warning("request %s moves to another worker after %d tokens (%s: %s)",
                    flight.request_id, len(flight.generated), why.kind, why)
        flight.timing.setdefault("migration_start", time.time())
        flight.next_attempt(self._ids)

    async def _attempt(self, flight: Flight) -> AsyncIterator[BackendOutput]:
        """One placement of the request, from placing it to its last token."""
        attempt = flight.attempt
        siblings = self._siblings(flight)
        for worker_rid in attempt.members:
            self._by_worker_rid[worker_rid] = flight
        placement, blocks = await self._place_and_reserve(flight, siblings)
        if "migration_start" in flight.timing:
            flight.migration_s += time.time() - flight.timing.pop("migration_start")
        flight.timing.setdefault("placed", time.time())
        # Set just as its call goes out (no await between): an abort never reaches a prefill
        # worker before the call it aborts was sent (PrefillWorker remembers such an abort).
        attempt.prefill_id = placement.prefill_worker_id
        attempt.decode_id = placement.decode_worker_id
        d = self._worker(attempt.decode_id, "decode")
        if attempt.prefill_id is None:
            await self._ended_if_cancelled(d, attempt.worker_rid, self._call(
                d, "decode", d.generate(attempt.worker_rid, flight.req.prompt_token_ids,
                                        flight.req.params, flight.generated, siblings)))
        else:
            attempt.phase = "prefill"
            first = await self._remote_prefill(flight, blocks)
            attempt.phase = "kv"
            # Tell D the first token (or that it is done: no KV to wait for, unless the
            # other samples of an n > 1 request decode from it) while the client gets it:
            # TTFT waits for neither that call nor the KV transfer.
            ended = first.finish_reason is not None and not siblings
            handoff = asyncio.ensure_future(self._hand_off(
                d, attempt.worker_rid, None if ended else first.new_token_ids[0]))
            handoff.add_done_callback(_log_handoff_failure)
            if first.finish_reason is not None:
                first = self._final(flight, first, {})
            yield first
            if ended:
                return
            if await handoff is False:  # D no longer knows it: its transfer failed
                raise Migrate("transfer", "the decode worker dropped the request")
        async for out in self._stream(flight, attempt):
            yield out

    async def _hand_off(self, d: DecodeHandle, worker_rid: str, first_token: int | None):
        """Tell the decode worker the first token, or (None) that the request ended with it.
        The call is made here, in the task: a task cancelled before it runs then leaves no
        call object behind that was never awaited."""
        call = (d.abort(worker_rid) if first_token is None
                else d.start(worker_rid, first_token))
        return await self._call(d, "decode", call)

    def _siblings(self, flight: Flight) -> list[tuple]:
        """n > 1 (on the first attempt): (worker-side id, params) of samples 1..n-1, which
        the decode worker forks from sample 0's KV; registered as the attempt's members."""
        if flight.req.n == 1 or flight.num_migrations:
            return []
        attempt = flight.attempt
        siblings = [(f"{attempt.worker_rid}/{i}", sample_params(flight.req.params, i))
                    for i in range(1, flight.req.n)]
        attempt.members.update({rid: i for i, (rid, _) in enumerate(siblings, start=1)})
        return siblings

    def _worker(self, worker_id: str | None, kind: str):
        """The attempt's live worker (a ``PrefillHandle`` or ``DecodeHandle``)."""
        handle = self.workers.get(worker_id) if worker_id is not None else None
        if handle is None:
            raise Migrate(kind, f"{kind} worker {worker_id} is gone")
        return handle

    async def _call(self, handle: WorkerHandle, kind: str, call: Awaitable):
        """Await a call to ``handle``; its worker's death migrates the request."""
        try:
            return await call
        except WorkerGone as exc:
            self.lose_worker(handle.worker_id, str(exc))
            raise Migrate(kind, str(exc)) from exc

    def _observe(self, flight: Flight, out: BackendOutput) -> None:
        """TTFT and ITL samples for the autoscaler's window (per output, not per token)."""
        n = len(out.new_token_ids)
        if self.window is None or n == 0:
            return
        now = time.time()
        last = flight.last_token_time
        if last is None:
            self.window.add_ttft(now, now - flight.req.arrival_time)
            n -= 1  # the first token's latency is the TTFT
        elif n:
            self.window.add_itl(now, (now - last) / n, weight=n)
        flight.last_token_time = now

    async def _place_and_reserve(self, flight: Flight,
                                 siblings: list[tuple]) -> tuple[Placement, list | None]:
        attempt = flight.attempt
        for _ in range(MAX_PLACE_ATTEMPTS):
            placement = await self._place(flight, flight.placement_tokens())
            d = self._worker(placement.decode_worker_id, "decode")
            if placement.prefill_worker_id is None:
                return placement, None
            blocks = await self._ended_if_cancelled(d, attempt.worker_rid, self._call(
                d, "decode", d.reserve(attempt.worker_rid, flight.req.prompt_token_ids,
                                       flight.req.params, flight.generated, siblings,
                                       self._kv_heads.get(placement.prefill_worker_id))),
                took_effect=lambda reserved: reserved is not None)
            if blocks is not None:
                return placement, blocks
            await self._report(d)  # stale stats: refresh, place again
        raise ResourceExhaustedError("decode workers have no free KV blocks; retry later")

    async def _ended_if_cancelled(self, d: DecodeHandle, worker_rid: str, call: Awaitable,
                                  took_effect: Callable[[Any], bool] = lambda _: True):
        """Await a call that starts ``worker_rid`` on ``d`` (reserve, generate). If the
        request is cancelled meanwhile, the call still runs on the worker, and on a threaded
        Ray actor after the abort sent now, which then finds nothing: so once the call is
        done, and ``took_effect`` says it started something, abort it there again (nothing
        else would: the request is gone)."""
        future = asyncio.ensure_future(call)
        try:
            return await asyncio.shield(future)
        except asyncio.CancelledError:
            future.add_done_callback(functools.partial(self._abort_late, d, worker_rid,
                                                       took_effect))
            raise

    def _abort_late(self, d: DecodeHandle, worker_rid: str, took_effect: Callable[[Any], bool],
                    call: asyncio.Future) -> None:
        if call.cancelled() or call.exception() is not None or not took_effect(call.result()):
            return
        task = asyncio.ensure_future(d.abort(worker_rid))
        self._cleanups.add(task)
        task.add_done_callback(self._cleanups.discard)
        task.add_done_callback(_log_late_abort_failure)

    async def _place(self, flight: Flight, prompt: list[int]) -> Placement:
        rid = flight.attempt.worker_rid
        while True:
            try:
                result = self.scheduler.place(rid, len(prompt), prompt_token_ids=prompt)
                break
            except UnavailableError:
                if not (flight.num_migrations or self.can_accept()):
                    raise  # nothing is coming back: refused at once
                await self._wait_for_workers(flight)  # a replacement is on its way
        if isinstance(result, Placement):
            return result
        assert isinstance(result, Queued)
        fut = asyncio.get_running_loop().create_future()
        self._queued[rid] = fut
        return await fut  # resolved by _poll_admission (or refused with an exception)

    async def _wait_for_workers(self, flight: Flight) -> None:
        """A migrating request (or a new one while a lost worker is being replaced) waits
        for a worker to join, up to its deadline (or ``RESUME_WAIT_S``)."""
        deadline = flight.req.deadline or (flight.timing.get("migration_start")
                                           or flight.timing["router_queue_start"]) + RESUME_WAIT_S
        left = deadline - time.time()
        if left <= 0:
            raise UnavailableError("no worker came back in time to resume the request; "
                                   "retry the request")
        if self._membership is None:
            self._membership = asyncio.Event()
        try:
            await asyncio.wait_for(self._membership.wait(), left)
        except asyncio.TimeoutError:
            raise UnavailableError("no worker came back in time to resume the request; "
                                   "retry the request") from None

    def _poll_admission(self) -> None:
        if not self._queued:
            return
        update = self.scheduler.poll_queue()
        for placement in update.placed:
            fut = self._queued.pop(placement.request_id, None)
            if fut is not None and not fut.done():
                fut.set_result(placement)
        for rid in update.refused:
            fut = self._queued.pop(rid, None)
            if fut is not None and not fut.done():
                fut.set_exception(ResourceExhaustedError(
                    "request waited too long for a free worker; retry later"))

    async def _remote_prefill(self, flight: Flight, blocks) -> BackendOutput:
        attempt, req = flight.attempt, flight.req
        p = self._worker(attempt.prefill_id, "prefill")
        endpoint = self._endpoints.get(attempt.decode_id)
        if endpoint is None:
            raise Migrate("decode", f"decode worker {attempt.decode_id} is gone")
        try:
            result = await p.prefill(attempt.worker_rid, req.prompt_token_ids, req.params,
                                     endpoint, blocks, flight.generated,
                                     ship_always=req.n > 1)
        except SplitServeError:
            raise
        except WorkerGone as exc:
            self.lose_worker(p.worker_id, str(exc))
            raise Migrate("prefill", str(exc)) from exc
        except Exception as exc:  # a Ray error other than death: the request fails
            raise UnavailableError(f"prefill worker {p.worker_id} failed: {exc}") from exc
        attempt.times.update(result.times)  # its KV transfer starts at its first token
        for key, stamp in result.times.items():
            flight.timing.setdefault(key, stamp)  # the first attempt's prefill phases count
        out = BackendOutput(req.request_id, [result.first_token], result.finish_reason,
                            num_prompt_tokens=len(req.prompt_token_ids),
                            num_cached_tokens=result.num_cached_tokens,
                            prompt_logprobs=result.prompt_logprobs)
        if result.logprob is not None:
            out.logprobs = [TokenLogprob(result.first_token, result.logprob.logprob,
                                         list(result.logprob.top))]
        return out

    async def _stream(self, flight: Flight, attempt: Attempt) -> AsyncIterator[BackendOutput]:
        """The decode worker's deltas of the attempt's samples, until each has ended."""
        req = flight.req
        open_samples = set(attempt.members.values()) - flight.finished
        while open_samples:
            delta = await attempt.queue.get()
            if isinstance(delta, _WorkerLost):
                raise Migrate(delta.kind, delta.why)
            if delta.finish_reason == "error" and attempt.phase == "kv":
                # Failed before decoding anything: its KV never landed (transfer failure).
                raise Migrate("transfer", delta.error or "KV transfer failed")
            attempt.phase = "decode"
            index = attempt.members.get(delta.request_id, 0)
            if index not in open_samples:  # n > 1: sample 0 ended with the prefill's token
                continue
            out = BackendOutput(req.request_id, delta.new_token_ids, delta.finish_reason,
                                num_prompt_tokens=len(req.prompt_token_ids),
                                num_cached_tokens=delta.num_cached_tokens, index=index,
                                prompt_logprobs=delta.prompt_logprobs)
            if delta.logprobs:
                out.logprobs = [TokenLogprob(t, lp.logprob, list(lp.top)) if lp else
                                TokenLogprob(t, 0.0) for t, lp in zip(delta.new_token_ids,
                                                                      delta.logprobs, strict=False)]
            if delta.finish_reason == "error":
                out.error = RequestFailed(delta.error or "request failed on a decode worker")
            if delta.finish_reason is not None:
                open_samples.discard(index)
                yield self._final(flight, out, delta.times)
                continue
            yield out

    def _final(self, flight: Flight, out: BackendOutput, decode_times: dict) -> BackendOutput:
        """Stamp the request's last output with its timing breakdown and migrations."""
        out.timing = _breakdown(flight.req, flight.timing, flight.attempt.times, decode_times)
        if flight.num_migrations:
            out.timing[MIGRATION_COUNT] = float(flight.num_migrations)
            out.timing["migration"] = flight.migration_s
        return out

    # -- background tasks ---------------------------------------------------------------------
    async def _pump(self, handle: DecodeHandle) -> None:
        """Follow one decode worker's output stream (one item per engine step, as each step
        ends); hand every delta to its request's stream at once."""
        try:
            async for deltas in handle.stream_outputs():
                finished = False
                for delta in deltas:
                    flight = self._by_worker_rid.get(delta.request_id)
                    if flight is not None and delta.request_id in flight.attempt.members:
                        flight.attempt.queue.put_nowait(delta)
                    finished |= delta.finish_reason is not None
                if finished:
                    self._poll_admission()
            why = "its output stream ended"
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # its streams would hang: treat it as gone
            why = f"decode worker unreachable: {exc}"
        if handle.worker_id in self.workers and not self._closed:
            self.lose_worker(handle.worker_id, why)

    async def _report(self, handle: WorkerHandle) -> None:
        try:
            stats = await handle.stats(handle.worker_id in self._draining)
        except WorkerGone as exc:  # else the scheduler would go on placing on it
            self.lose_worker(handle.worker_id, str(exc))
            raise
        self.scheduler.update_stats(stats)
        self.last_stats[handle.worker_id] = stats

    async def _stats_loop(self) -> None:
        while True:
            handles = list(self.workers.values())
            results = await asyncio.gather(*(self._report(h) for h in handles),
                                           return_exceptions=True)
            for h, res in zip(handles, results, strict=False):
                if isinstance(res, Exception):
                    log.warning("stats from %s failed: %s", h.worker_id, res)
            self._poll_admission()
            await asyncio.sleep(self.stats_interval_s)  # the reporting period itself


def _log_handoff_failure(task: asyncio.Future) -> None:
    """The decode hand-off may fail after the client left; say so instead of losing it."""
    if not task.cancelled() and task.exception() is not None:
        log.warning("decode hand-off failed: %s", task.exception())


def _log_late_abort_failure(task: asyncio.Future) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.warning("ending a cancelled request on its worker failed: %s", task.exception())


def _breakdown(req: BackendRequest, t: dict, last: dict, d: dict) -> dict[str, float]:
    """Seconds per phase from wall-clock stamps (missing stamps give no entry): the queue
    and the prefill that gave the first token (``t``: the first attempt's), the KV transfer,
    decode queue and decode of the attempt that ended the request (``last``: its prefill's
    stamps, ``d``: its decode worker's). A migrated request's wait between attempts is its
    ``migration`` entry, in no phase (it was counted as KV transfer)."""
    phases = {
        "router_queue": (req.arrival_time, t.get("placed")),
        "prefill_queue": (t.get("prefill_arrival"), t.get("prefill_start")),
        "prefill_compute": (t.get("prefill_start") or t.get("prefill_arrival"),
                            t.get("first_token")),
        "kv_transfer": (last.get("first_token"), d.get("kv_landed")),
        "decode_queue": (d.get("kv_landed"), d.get("activated")),
        "decode": (d.get("activated") or d.get("local_arrival"), d.get("finished")),
    }
    return {k: max(0.0, b - a) for k, (a, b) in phases.items() if a is not None and b is not None}
