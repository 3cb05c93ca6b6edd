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
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable

from cluster.backend import BackendOutput, BackendRequest, ServingBackend, TokenLogprob
from cluster.global_scheduler import GlobalScheduler, Placement, Queued
from cluster.handles import WorkerGone, WorkerHandle
from engine.errors import ResourceExhaustedError, SplitServeError, UnavailableError
from engine.outputs import TokenDelta

log = logging.getLogger(__name__)
POLL_TIMEOUT_S = 0.5
MAX_PLACE_ATTEMPTS = 3


class RequestFailed(SplitServeError):
    code = "INTERNAL"


class ClusterBackend(ServingBackend):
    def __init__(self, scheduler: GlobalScheduler, stats_interval_s: float = 0.5,
                 window=None) -> None:
        self.scheduler = scheduler
        # Optional cluster.autoscaler.RollingWindow fed with TTFT / ITL / arrival samples.
        self.window = window
        self.stats_interval_s = stats_interval_s
        self.workers: dict[str, WorkerHandle] = {}
        self._endpoints: dict[str, object] = {}  # decode worker id -> KV endpoint
        self._streams: dict[str, asyncio.Queue] = {}
        self._where: dict[str, tuple[str | None, str]] = {}  # request id -> (P, D)
        self._queued: dict[str, asyncio.Future] = {}
        self._tasks: dict[str, asyncio.Task] = {}
        self._stats_task: asyncio.Task | None = None
        self._draining: dict[str, asyncio.Event] = {}  # worker id -> set when it holds no request
        self._closed = False
        self.last_stats: dict[str, object] = {}  # worker id -> newest WorkerStats (metrics)
        # (worker id, role) of a worker that died; the cluster sets it to replace workers.
        self.on_worker_lost: Callable[[str, str], None] | None = None
        self._last_token_time: dict[str, float] = {}

    # -- membership ------------------------------------------------------------------------
    async def add_worker(self, handle: WorkerHandle) -> None:
        """Register a ready worker (its first stats report makes it placeable)."""
        self.workers[handle.worker_id] = handle
        self.readiness_may_have_changed()
        if handle.role in ("decode", "colocated"):
            if handle.role == "decode":
                self._endpoints[handle.worker_id] = await handle.call("endpoint")
            self._tasks[handle.worker_id] = asyncio.create_task(self._pump(handle))
        await self._report(handle)

    async def drain_and_remove(self, worker_id: str, timeout_s: float = 300.0) -> None:
        """Stop placing on the worker, wait for its requests to finish, then forget it."""
        handle = self.workers[worker_id]
        idle = self._draining.setdefault(worker_id, asyncio.Event())
        self.readiness_may_have_changed()
        self.scheduler.update_stats(await handle.call("stats", True))
        self._check_drained(worker_id)
        try:
            await asyncio.wait_for(idle.wait(), timeout_s)
        except asyncio.TimeoutError:
            log.warning("drain of %s timed out; aborting its requests", worker_id)
            for rid in [r for r, w in self._where.items() if worker_id in w]:
                await self.abort(rid)
        self.remove_worker(worker_id)

    def _check_drained(self, worker_id: str) -> None:
        idle = self._draining.get(worker_id)
        if idle is not None and not any(worker_id in w for w in self._where.values()):
            idle.set()

    def lose_worker(self, worker_id: str, why: str) -> None:
        """The worker died: fail its requests, forget it, and tell ``on_worker_lost`` (the
        cluster replaces it)."""
        handle = self.workers.get(worker_id)
        if handle is None:
            return  # already lost (several calls can fail at once)
        log.error("worker %s is gone: %s", worker_id, why)
        self._fail_worker_requests(worker_id, why)
        self.remove_worker(worker_id)
        if self.on_worker_lost is not None and not self._closed:
            self.on_worker_lost(worker_id, handle.role)

    def remove_worker(self, worker_id: str) -> None:
        self.scheduler.remove_worker(worker_id)
        self.workers.pop(worker_id, None)
        self.last_stats.pop(worker_id, None)
        self._endpoints.pop(worker_id, None)
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
        for rid in list(self._where):
            await self.abort(rid)
        tasks = [t for t in [self._stats_task, *self._tasks.values()] if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._tasks.clear()
        self._stats_task = None

    def is_ready(self) -> bool:
        roles = {h.role for wid, h in self.workers.items() if wid not in self._draining}
        return "colocated" in roles or {"prefill", "decode"} <= roles

    def stats(self) -> dict:
        return {
            "workers": {wid: h.role for wid, h in self.workers.items()},
            "draining": sorted(self._draining),
            "in_flight": len(self._where),
            "admission_queue": self.scheduler.queue_length,
        }

    async def abort(self, request_id: str) -> None:
        fut = self._queued.pop(request_id, None)
        if fut is not None:
            self.scheduler.cancel(request_id)
            fut.cancel()
        where = self._where.get(request_id)
        if where is None:
            return
        calls = [self.workers[w].call("abort", request_id) for w in where
                 if w is not None and w in self.workers]
        for result in await asyncio.gather(*calls, return_exceptions=True):
            if isinstance(result, Exception):
                log.warning("abort of %s failed on a worker: %s", request_id, result)

    def submit(self, request: BackendRequest) -> AsyncIterator[BackendOutput]:
        return self._run(request)

    # -- one request ---------------------------------------------------------------------
    async def _run(self, req: BackendRequest) -> AsyncIterator[BackendOutput]:
        rid = req.request_id
        queue: asyncio.Queue = asyncio.Queue()
        self._streams[rid] = queue
        finished = False
        try:
            timing = {"router_queue_start": time.time()}
            if self.window is not None:
                self.window.add_arrival(time.time(), len(req.prompt_token_ids))
            placement, blocks = await self._place_and_reserve(req)
            timing["placed"] = time.time()
            p_id, d_id = placement.prefill_worker_id, placement.decode_worker_id
            self._where[rid] = (p_id, d_id)
            if p_id is None:
                await self.workers[d_id].call("generate", rid, req.prompt_token_ids, req.params)
            else:
                first = await self._remote_prefill(req, p_id, d_id, blocks, timing)
                # Tell D the first token (or that it is done) while the client gets it:
                # TTFT waits for neither that call nor the KV transfer.
                verb = "abort" if first.finish_reason is not None else "start"
                args = (rid,) if verb == "abort" else (rid, first.new_token_ids[0])
                handoff = asyncio.ensure_future(self.workers[d_id].call(verb, *args))
                handoff.add_done_callback(_log_handoff_failure)
                self._observe(req, first)
                yield first
                await handoff
                if first.finish_reason is not None:
                    finished = True
                    return
            async for out in self._stream(rid, queue, req, timing):
                finished = out.finish_reason is not None
                self._observe(req, out)
                yield out
        except SplitServeError as exc:
            finished = True
            yield BackendOutput(rid, [], "error", error=exc)
        finally:
            self._streams.pop(rid, None)
            self._last_token_time.pop(rid, None)
            if not finished:
                await self.abort(rid)
            where = self._where.pop(rid, None)
            for worker_id in where or ():
                if worker_id is not None:
                    self._check_drained(worker_id)
            self._poll_admission()

    def _observe(self, req: BackendRequest, out: BackendOutput) -> None:
        """TTFT and ITL samples for the autoscaler's window (per output, not per token)."""
        n = len(out.new_token_ids)
        if self.window is None or n == 0:
            return
        now = time.time()
        last = self._last_token_time.get(req.request_id)
        if last is None:
            self.window.add_ttft(now, now - req.arrival_time)
            n -= 1  # the first token's latency is the TTFT
        elif n:
            self.window.add_itl(now, (now - last) / n, weight=n)
        self._last_token_time[req.request_id] = now
        if out.finish_reason is not None:
            self._last_token_time.pop(req.request_id, None)

    async def _place_and_reserve(self, req: BackendRequest) -> tuple[Placement, list | None]:
        for _ in range(MAX_PLACE_ATTEMPTS):
            placement = await self._place(req)
            d = self.workers[placement.decode_worker_id]
            if placement.prefill_worker_id is None:
                return placement, None
            blocks = await d.call("reserve", req.request_id, req.prompt_token_ids, req.params)
            if blocks is not None:
                return placement, blocks
            await self._report(d)  # stale stats: refresh, place again
        raise ResourceExhaustedError("decode workers have no free KV blocks; retry later")

    async def _place(self, req: BackendRequest) -> Placement:
        result = self.scheduler.place(req.request_id, len(req.prompt_token_ids),
                                      prompt_token_ids=req.prompt_token_ids)
        if isinstance(result, Placement):
            return result
        assert isinstance(result, Queued)
        fut = asyncio.get_running_loop().create_future()
        self._queued[req.request_id] = fut
        return await fut  # resolved by _poll_admission (or refused with an exception)

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

    async def _remote_prefill(self, req, p_id, d_id, blocks, timing) -> BackendOutput:
        endpoint = self._endpoints[d_id]
        try:
            result = await self.workers[p_id].call(
                "prefill", req.request_id, req.prompt_token_ids, req.params, endpoint, blocks)
        except SplitServeError:
            raise
        except Exception as exc:  # worker died, Ray error: the request fails, the server lives
            if isinstance(exc, WorkerGone):
                self.lose_worker(p_id, str(exc))
            raise UnavailableError(f"prefill worker {p_id} failed: {exc}") from exc
        timing.update(result.times)
        out = BackendOutput(req.request_id, [result.first_token], result.finish_reason,
                            num_prompt_tokens=len(req.prompt_token_ids),
                            num_cached_tokens=result.num_cached_tokens)
        if result.logprob is not None:
            out.logprobs = [TokenLogprob(result.first_token, result.logprob.logprob,
                                         list(result.logprob.top))]
        if out.finish_reason is not None:
            out.timing = _breakdown(req, timing, {})
        return out

    async def _stream(self, rid, queue: asyncio.Queue, req, timing) -> AsyncIterator[BackendOutput]:
        while True:
            delta: TokenDelta = await queue.get()
            out = BackendOutput(rid, delta.new_token_ids, delta.finish_reason,
                                num_prompt_tokens=len(req.prompt_token_ids),
                                num_cached_tokens=delta.num_cached_tokens)
            if delta.logprobs:
                out.logprobs = [TokenLogprob(t, lp.logprob, list(lp.top)) if lp else
                                TokenLogprob(t, 0.0) for t, lp in zip(delta.new_token_ids,
                                                                      delta.logprobs, strict=False)]
            if delta.finish_reason == "error":
                out.error = RequestFailed(delta.error or "request failed on a decode worker")
            if delta.finish_reason is not None:
                out.timing = _breakdown(req, timing, delta.times)
                yield out
                return
            yield out

    # -- background tasks ---------------------------------------------------------------------
    async def _pump(self, handle: WorkerHandle) -> None:
        """Long-poll one decode worker; hand every delta to its request's stream."""
        while True:
            try:
                deltas = await handle.call("get_outputs", POLL_TIMEOUT_S)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # its streams would hang: treat it as gone
                self.lose_worker(handle.worker_id, f"decode worker unreachable: {exc}")
                return
            finished = False
            for delta in deltas:
                queue = self._streams.get(delta.request_id)
                if queue is not None:
                    queue.put_nowait(delta)
                finished |= delta.finish_reason is not None
            if finished:
                self._poll_admission()

    def _fail_worker_requests(self, worker_id: str, why: str) -> None:
        for rid, where in list(self._where.items()):
            if worker_id in where and rid in self._streams:
                self._streams[rid].put_nowait(TokenDelta(
                    rid, [], "error", error=f"worker {worker_id} failed: {why}"))

    async def _report(self, handle: WorkerHandle) -> None:
        try:
            stats = await handle.call("stats", handle.worker_id in self._draining)
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


def _breakdown(req: BackendRequest, t: dict, d: dict) -> dict[str, float]:
    """Seconds per phase from wall-clock stamps (missing stamps give no entry)."""
    phases = {
        "router_queue": (req.arrival_time, t.get("placed")),
        "prefill_queue": (t.get("prefill_arrival"), t.get("prefill_start")),
        "prefill_compute": (t.get("prefill_start") or t.get("prefill_arrival"),
                            t.get("first_token")),
        "kv_transfer": (t.get("first_token"), d.get("kv_landed")),
        "decode_queue": (d.get("kv_landed"), d.get("activated")),
        "decode": (d.get("activated") or d.get("local_arrival"), d.get("finished")),
    }
    return {k: max(0.0, b - a) for k, (a, b) in phases.items() if a is not None and b is not None}
