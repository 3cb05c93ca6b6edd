"""The discrete-event loop: a trace, simulated workers, and the REAL scheduler and autoscaler.

Events (one heap, time-ordered; arrivals are merged in from the sorted trace):

  arrival        ``GlobalScheduler.place`` -> the decode worker reserves blocks, the prefill
                 worker (or the decode worker itself, for local prefill) queues the prompt;
                 ``Queued`` requests wait for ``poll_queue``; refusals are recorded
  worker         a worker's step / decode run ended (``worker.SimWorker``)
  transfer       a request's KV reached its decode worker (prefill done + link time)
  autoscale      every ``autoscaler.interval_s``: ``Autoscaler.decide`` and apply it
  gauge          every ``gauge_interval_s``: queue lengths and KV usage into the window
  ready          a new (or role-changed) worker finished starting

The scheduler and the autoscaler are reached only through their public calls
(``update_stats``, ``remove_worker``, ``place``, ``poll_queue``; ``decide``) and see
simulated seconds through the scheduler's clock: exactly what the live cluster does.
Workers push their ``WorkerStats`` after every change (an ideal, zero-delay report).
"""

from __future__ import annotations

import gc
import heapq
import itertools
import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import numpy as np

from cluster.autoscaler import Autoscaler, RollingWindow
from cluster.global_scheduler import GlobalScheduler, Placement
from cluster.placement import PlacementPolicy
from cluster.simulator.config import SimConfig
from cluster.simulator.metrics import Recorder
from cluster.simulator.profiles import CostProfile, resolve_profile
from cluster.simulator.scaling import autoscale, sample_gauges
from cluster.simulator.trace import TraceRequest
from cluster.simulator.worker import SimRequest, SimWorker
from engine.errors import ResourceExhaustedError, UnavailableError
from engine.prefix_hash import block_hashes

_WORKER, _TRANSFER, _AUTOSCALE, _GAUGE, _READY = range(5)
_UNIQUE = 1 << 63  # tag of synthetic hashes of never-shared blocks (cannot collide in practice)


class Simulation:
    def __init__(
        self,
        cfg: SimConfig,
        trace: Sequence[TraceRequest],
        profile: CostProfile | None = None,
        policy: str | PlacementPolicy | None = None,
    ) -> None:
        self.cfg = cfg
        self.trace = trace
        # per role: workers of a pool with its own TP size run that size's cost model
        self.profs = pool_profiles(cfg, profile)
        self.prof = next(iter(self.profs.values()))  # prefill's (colocated's)
        self._transfer = (transfer_profile(self.profs["prefill"], self.profs["decode"])
                          if cfg.mode == "disaggregated" else self.prof)
        self.now = 0.0
        self.sched = GlobalScheduler(cfg.scheduler, policy=policy, clock=lambda: self.now)
        # the autoscaler sizes pools in workers of each pool's TP size; its budget is GPUs
        tps = {role: cfg.tp_of(role) for role in ("prefill", "decode")}
        self.autoscaler = Autoscaler(cfg.autoscaler, cfg.slo, tps) if cfg.autoscaler else None
        self.window = RollingWindow(cfg.autoscaler.window_s) if cfg.autoscaler else None
        self._heap: list[tuple[float, int, int, object, int]] = []
        self._seq = itertools.count()
        self._ids = itertools.count()
        self.workers: dict[str, SimWorker] = {}
        self.retired: list[SimWorker] = []
        self.starting = {"prefill": 0, "decode": 0, "colocated": 0}
        self.cancelled_starts = {"prefill": 0, "decode": 0, "colocated": 0}
        self.inflight: dict[str, SimRequest] = {}  # placed or queued, not finished
        self.rec = Recorder(
            np.array([r.arrival_s for r in trace], dtype=float),
            np.array([r.prompt_tokens for r in trace], dtype=float),
            np.array([r.output_tokens for r in trace], dtype=float),
        )
        self._record_run = self.rec.runs.extend
        self._group_hashes: dict[int, list[int]] = {}
        self._use_hashes = any(r.prefix_group >= 0 for r in trace)
        self.num_events = 0  # heap events processed (arrivals not counted)
        self._changed: dict[str, SimWorker | None] = {}
        """Workers changed since the last flush (any: a poll is due), by id; None for those
        whose changes the scheduler does not read (no report is due)."""
        self._queued = False  # = sched.queue_length > 0, kept here (read after every event)
        self._bs = cfg.scheduler.block_size

    # ---- the Host interface used by workers ------------------------------------------------

    def schedule(self, t: float, worker: SimWorker) -> None:
        heapq.heappush(self._heap, (t, next(self._seq), _WORKER, worker, worker.version))

    def first_token(self, r: SimRequest, t: float) -> None:
        rec = self.rec
        rec.first_token[r.idx] = t
        rec.cached[r.idx] = r.cached
        if self.window is not None:
            self.window.add_ttft(t, t - r.arrival)

    def prefill_done(self, r: SimRequest, t: float, worker: SimWorker) -> None:
        d = r.decode_worker
        assert d is not None
        if r.output <= 1:
            d.release(r)
            self._push(d)
            self.finished(r, t)
            return
        link = worker.link_free
        start = t if t >= link else link  # = max(t, link)
        transfer = self._transfer
        dur = transfer.transfer_s(r.prompt)
        worker.link_free = start + dur - transfer.transfer_latency_s
        heapq.heappush(self._heap, (start + dur, next(self._seq), _TRANSFER, r, 0))

    def finished(self, r: SimRequest, t: float) -> None:
        self.rec.finish[r.idx] = t
        self.inflight.pop(r.rid, None)

    def decode_steps(self, t: float, d0: float, d1: float, m: int, batch: int) -> None:
        self._record_run((d0, d1, m, batch))  # = self.rec.decode_run (once per decode run)
        if self.window is not None:
            self.window.add_itl(t, (d0 + d1) / 2, m * batch)

    # ---- workers ---------------------------------------------------------------------------

    def _new_worker(self, role: str, record: bool = True) -> SimWorker:
        prof = self.profs[role]
        w = SimWorker(f"{role}-{next(self._ids)}", role, prof, self.cfg, self, self.now)
        self.workers[w.wid] = w
        self._push(w)
        if record:
            self._record_replicas()
        return w

    def _push(self, w: SimWorker, visible: bool = True) -> None:
        """``w`` changed: its stats reach the scheduler before the next placement (changes
        between two placements coalesce into one report). ``visible=False``: nothing its
        report compares changed (so no report is due from this change), but the change
        still lets queued requests be polled, as every worker change does."""
        if visible:
            self._changed[w.wid] = w
        else:
            self._changed.setdefault(w.wid, None)
        if w.draining and w.is_idle():
            self._retire(w)

    def _flush(self) -> None:
        update, now = self.sched.update_stats, self.now
        for w in self._changed.values():
            if w is None:  # pushed only by changes the scheduler does not read
                continue
            report = w.report(now)
            if report is not None:  # None: nothing the scheduler reads has changed
                update(report)
        self._changed.clear()

    def _retire(self, w: SimWorker) -> None:
        self._changed.pop(w.wid, None)
        self.sched.remove_worker(w.wid)
        del self.workers[w.wid]
        w.alive_to = self.now
        self.retired.append(w)
        if w.move_to is not None:
            self._after(self.cfg.role_change_s, _READY, w.move_to)
        self._record_replicas()

    def held_requests(self) -> list[SimRequest]:
        """Requests the scheduler holds in its admission queue (placed ones have a worker)."""
        return [r for r in self.inflight.values() if r.decode_worker is None]

    def start_worker_later(self, role: str, delay: float) -> None:
        """A new worker of ``role`` becomes ready after ``delay`` (counted as starting)."""
        self.starting[role] += 1
        self._after(delay, _READY, role)

    def cancel_start(self, role: str) -> bool:
        """Cancel one pending start of ``role``; False if none is pending."""
        if self.starting[role] - self.cancelled_starts[role] <= 0:
            return False
        self.starting[role] -= 1
        self.cancelled_starts[role] += 1
        return True

    def _after(self, delay: float, kind: int, payload: object) -> None:
        heapq.heappush(self._heap, (self.now + delay, next(self._seq), kind, payload, 0))

    def _record_replicas(self) -> None:
        counts = {"prefill": 0, "decode": 0, "colocated": 0}
        for w in self.workers.values():
            if not w.draining:
                counts[w.role] += 1
        self.rec.replicas.append(
            (self.now, counts["prefill"], counts["decode"], counts["colocated"])
        )

    # ---- requests --------------------------------------------------------------------------

    def _hashes(self, idx: int, tr: TraceRequest) -> tuple:
        if not self._use_hashes:
            return ()
        bs = self.cfg.scheduler.block_size
        shared: list[int] = []
        if tr.prefix_group >= 0 and tr.prefix_tokens >= bs:
            shared = self._group_hashes.get(tr.prefix_group) or []
            if not shared:
                base = tr.prefix_group * 1_000_003
                shared = block_hashes(range(base, base + tr.prefix_tokens), bs)
                self._group_hashes[tr.prefix_group] = shared
        n_unique = tr.prompt_tokens // bs - len(shared)
        unique = [_UNIQUE | (idx << 20) | j for j in range(n_unique)]
        return tuple(shared) + tuple(unique)

    def _arrive(self, idx: int, tr: TraceRequest) -> None:
        hashes = self._hashes(idx, tr) if self._use_hashes else ()
        # int()/float(): a trace may hold numpy numbers, which a compiled SimRequest refuses
        r = SimRequest(idx, float(tr.arrival_s), int(tr.prompt_tokens), int(tr.output_tokens),
                       hashes)
        self._flush()
        if self.window is not None:
            self.window.add_arrival(self.now, r.prompt)
        try:
            result = self.sched.place(r.rid, r.prompt, block_hashes=r.hashes)
        except (ResourceExhaustedError, UnavailableError):
            self.rec.refused[idx] = True
            return
        self.inflight[r.rid] = r
        if isinstance(result, Placement):
            self._dispatch(result)
        else:  # Queued: in the admission queue until a poll places or refuses it
            self._queued = True

    def _dispatch(self, p: Placement) -> None:
        r = self.inflight[p.request_id]
        d = self.workers[p.decode_worker_id]
        # what the scheduler now counts as pending on each worker (its _commit)
        tokens, blocks = r.prompt - p.num_cached_tokens_expected, -(-r.prompt // self._bs)
        d.reserve(r)
        if p.prefill_worker_id is None:
            d.placed(tokens, blocks)
            d.accept_prefill(r, self.now)
            self._push(d)
        else:
            pw = self.workers[p.prefill_worker_id]
            d.placed(0, blocks)
            pw.placed(tokens, 0)
            self._changed[d.wid] = d  # = self._push(d): d holds the request, so is not idle
            pw.accept_prefill(r, self.now)
            self._push(pw)

    def _poll(self) -> None:
        self._flush()
        update = self.sched.poll_queue()
        for rid in update.refused:
            r = self.inflight.pop(rid)
            self.rec.refused[r.idx] = True
        for p in update.placed:
            self._dispatch(p)
        self._queued = self.sched.queue_length > 0

    # ---- the loop --------------------------------------------------------------------------

    def run(self) -> dict:
        """Replay the whole trace; returns the JSON-ready result (see ``result``)."""
        cfg = self.cfg
        if cfg.mode == "disaggregated":
            initial = ["prefill"] * cfg.num_prefill + ["decode"] * cfg.num_decode
        else:
            initial = ["colocated"] * cfg.num_colocated
        for role in initial:
            self._new_worker(role, record=False)
        self._record_replicas()
        if self.autoscaler is not None:
            self._after(cfg.autoscaler.interval_s, _AUTOSCALE, None)  # type: ignore[union-attr]
            self._after(cfg.gauge_interval_s, _GAUGE, None)
        with _cyclic_gc_paused():
            self._loop()
        self._record_replicas()  # closes the timeline at the end time
        return self.result()

    def _loop(self) -> None:
        """The hot loop (one pass per event): names bound locally, worker events inlined."""
        trace, n, i = self.trace, len(self.trace), 0
        heap, pop, workers, changed = self._heap, heapq.heappop, self.workers, self._changed
        arrival = float(trace[0].arrival_s) if n else math.inf  # float(): numpy in, see _arrive
        events = 0
        while True:
            if heap and heap[0][0] <= arrival:
                t, _, kind, payload, version = pop(heap)
                self.now = t
                events += 1
                if kind == _WORKER:
                    w: SimWorker = payload  # type: ignore[assignment]
                    # = w.on_event(t, version): a stale event (its segment was cut short) is
                    # dropped without a call
                    if version == w.version and w.busy:
                        visible = w.end_segment(t)
                        if w.wid in workers:  # = self._push(w, visible)
                            if visible:
                                changed[w.wid] = w
                            else:
                                changed.setdefault(w.wid, None)
                            if w.draining and w.is_idle():
                                self._retire(w)
                elif not self._on_other(kind, payload, i >= n):
                    break
            elif i < n:
                self.now = arrival
                self._arrive(i, trace[i])
                i += 1
                arrival = float(trace[i].arrival_s) if i < n else math.inf
            else:
                break
            if changed and self._queued:
                self._poll()
        self.num_events += events

    def _on_other(self, kind: int, payload: object, done: bool) -> bool:
        """Handle a non-worker event; False ends the simulation (only periodic events left)."""
        if kind == _TRANSFER:
            r: SimRequest = payload  # type: ignore[assignment]
            d = r.decode_worker
            assert d is not None
            d.receive_kv(r, self.now)  # the request moves from expected to waiting: the
            self._push(d, visible=False)  # requests held, backlog and free blocks stay
            return True
        if kind == _READY:
            role: str = payload  # type: ignore[assignment]
            if self.cancelled_starts[role] > 0:
                self.cancelled_starts[role] -= 1
            else:
                self.starting[role] -= 1
                self._new_worker(role)
            return True
        if done and not self.inflight:
            return False
        if kind == _GAUGE:
            sample_gauges(self)
            self._after(self.cfg.gauge_interval_s, _GAUGE, None)
        elif kind == _AUTOSCALE:
            autoscale(self)
            self._after(self.cfg.autoscaler.interval_s, _AUTOSCALE, None)  # type: ignore[union-attr]
        return True

    def result(self) -> dict:
        end = self.now
        busy = {"prefill": 0.0, "decode": 0.0, "colocated": 0.0}
        alive = dict(busy)
        for w in [*self.workers.values(), *self.retired]:
            busy[w.role] += w.busy_s
            alive[w.role] += min(w.alive_to, end) - w.alive_from
        roles = ("prefill", "decode") if self.cfg.mode == "disaggregated" else ("colocated",)
        span = float(self.rec.arrival[-1] - self.rec.arrival[0]) if len(self.trace) > 1 else 0.0
        summary = self.rec.summary(
            self.cfg.slo, span, {r: busy[r] for r in roles}, {r: alive[r] for r in roles}
        )
        summary["config"] = {
            "mode": self.cfg.mode,
            "gpus": self.cfg.num_gpus,
            "num_prefill": self.cfg.num_prefill,
            "num_decode": self.cfg.num_decode,
            "num_colocated": self.cfg.num_colocated,
            "policy": self.sched.policy.name,
            "profile": self.prof.name,
            "prefill_tp": self.cfg.tp_of("prefill"),
            "decode_tp": self.cfg.tp_of("decode"),
            "profiles": {role: self.profs[role].name for role in roles},
            "prefill_chunk_tokens": self.cfg.prefill_chunk_tokens,
            "colocated_chunk_tokens": self.cfg.colocated_chunk_tokens,
        }
        summary["simulated_s"] = end
        summary["events"] = self.num_events
        summary["replicas"] = [
            {"t": t, "prefill": p, "decode": d, "colocated": c} for t, p, d, c in self.rec.replicas
        ]
        summary["autoscaler_decisions"] = self.rec.decisions
        step = self.cfg.timeline_interval_s
        edges = [i * step for i in range(int(span // step) + 2)]
        summary["timeline"] = self.rec.attainment_by_window(self.cfg.slo, edges)
        return summary


@contextmanager
def _cyclic_gc_paused() -> Iterator[None]:
    """The loop allocates millions of short-lived, acyclic objects (event tuples, snapshots,
    requests: reference counting frees them) while the trace and the recorder hold millions of
    long-lived ones, which every cyclic collection pass walks again for nothing: ~6 % of a
    1,000-GPU run. So the cyclic collector is off for the loop (the loop leaves no cyclic
    garbage: tests/cluster/test_sim_speed.py) and back on, as it was, after."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def pool_profiles(cfg: SimConfig, profile: CostProfile | None = None) -> dict[str, CostProfile]:
    """The cost model of each pool the mode runs (``profile``, when given, for all)."""
    roles = ("prefill", "decode") if cfg.mode == "disaggregated" else ("colocated",)
    by_tp: dict[int, CostProfile] = {}
    for tp in {cfg.tp_of(role) for role in roles}:
        by_tp[tp] = profile or resolve_profile(cfg.hardware, cfg.model, tp)
    return {role: by_tp[cfg.tp_of(role)] for role in roles}


def transfer_profile(prefill: CostProfile, decode: CostProfile) -> CostProfile:
    """The KV link between the pools: each side's ranks ship their own heads in parallel,
    so the narrower side's aggregate bandwidth bounds the transfer."""
    if decode.transfer_bandwidth_bytes_per_s >= prefill.transfer_bandwidth_bytes_per_s:
        return prefill
    return prefill.with_(transfer_bandwidth_bytes_per_s=decode.transfer_bandwidth_bytes_per_s)


def simulate(
    cfg: SimConfig,
    trace: Sequence[TraceRequest],
    profile: CostProfile | None = None,
    policy: str | PlacementPolicy | None = None,
) -> dict:
    """Run one simulation and return its summary dict."""
    return Simulation(cfg, trace, profile, policy).run()
