"""Applying autoscaler decisions to the simulated pools (what the live cluster's actor pool
manager does with Ray actors): add workers after a start-up delay, drain and remove the
least-loaded worker, or drain one and restart it in the other role."""

from __future__ import annotations

from typing import TYPE_CHECKING

from cluster.autoscaler import ScalingDecision, held_for_decode

if TYPE_CHECKING:
    from cluster.simulator.loop import Simulation
    from cluster.simulator.worker import SimWorker

def pool_sizes(sim: Simulation) -> dict[str, int]:
    """Replicas per pool as the autoscaler counts them: serving + starting, minus draining."""
    sizes = dict(sim.starting)
    for w in sim.workers.values():
        if not w.draining:
            sizes[w.role] += 1
    return sizes


def sample_gauges(sim: Simulation) -> None:
    """Queue lengths, decode KV usage, prefill busy fraction and speed into the
    autoscaler's rolling window (what the live cluster derives from WorkerStats)."""
    assert sim.window is not None
    pools: dict[str, list[SimWorker]] = {"prefill": [], "decode": []}
    for w in sim.workers.values():
        if w.role in pools:
            pools[w.role].append(w)
    prefills, decodes = pools["prefill"], pools["decode"]
    w_bs = sim.cfg.scheduler.block_size
    kv = (
        sum(w.reserved / w.total_blocks for w in decodes) / len(decodes) if decodes else 0.0
    )
    held = sim.sched.queue_length  # requests the scheduler could not place
    held_blocks = sum(-(-r.prompt // w_bs) for r in sim.held_requests()) if decodes else 0
    p_wait = sum(len(w.prefill_q) for w in prefills)
    d_wait = sum(len(w.decode_wait) for w in decodes)
    decode_full = held_for_decode(kv, sim.cfg.autoscaler)  # type: ignore[arg-type]
    if decodes:
        used = sum(w.reserved for w in decodes)
        sim.window.add_gauge("decode_demand_blocks", sim.now,
                             used + (held_blocks if decode_full else 0))
        sim.window.add_gauge("decode_blocks_per_worker", sim.now,
                             sum(w.total_blocks for w in decodes) / len(decodes))
    if decode_full:
        d_wait += held
    else:
        p_wait += held
    sim.window.add_gauge("prefill_queue_per_worker", sim.now, p_wait / max(len(prefills), 1))
    sim.window.add_gauge("decode_queue_per_worker", sim.now, d_wait / max(len(decodes), 1))
    sim.window.add_gauge("decode_kv_usage", sim.now, kv)
    if prefills:
        busy = sum(1 for w in prefills if w.busy) / len(prefills)
        speed = sum(w.prefill_speed for w in prefills) / len(prefills)
        sim.window.add_gauge("prefill_utilization", sim.now, busy)
        sim.window.add_gauge("prefill_tokens_per_s_per_worker", sim.now, speed)


def autoscale(sim: Simulation) -> None:
    assert sim.autoscaler is not None and sim.window is not None
    metrics = sim.window.metrics(sim.now, sim.cfg.slo.percentile)
    for decision in sim.autoscaler.decide(sim.now, metrics, pool_sizes(sim)):
        sim.rec.decisions.append(
            {"t": sim.now, "pool": decision.pool, "current": decision.current,
             "target": decision.target, "from_pool": decision.from_pool,
             "reason": decision.reason}
        )
        apply(sim, decision)


def apply(sim: Simulation, d: ScalingDecision) -> None:
    if d.from_pool is not None:
        _drain_one(sim, d.from_pool, move_to=d.pool)
        return
    for _ in range(max(0, d.delta)):
        sim.start_worker_later(d.pool, sim.cfg.startup_s)
    for _ in range(max(0, -d.delta)):
        if not sim.cancel_start(d.pool):  # a pending start goes first
            _drain_one(sim, d.pool, move_to=None)


def _drain_one(sim: Simulation, role: str, move_to: str | None) -> bool:
    candidates = [w for w in sim.workers.values() if w.role == role and not w.draining]
    if not candidates:
        return False
    w = min(candidates, key=lambda x: (x.queued_tokens + len(x.heap) + x.expecting, x.wid))
    w.draining = True
    w.move_to = move_to
    if move_to is not None:
        sim.starting[move_to] += 1  # counted in its new pool from now on
    sim._push(w)  # tells the scheduler; retires it at once if idle
    sim._record_replicas()
    return True
