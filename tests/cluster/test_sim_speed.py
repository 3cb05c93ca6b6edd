"""What keeps the simulator fast at 1,000 workers: indexed placement and cheap snapshots.

(That the indexed placement decides exactly as the scanning one did is
``test_sim_placement_equivalence.py``.)
"""

from __future__ import annotations

import gc
import random

import pytest

from cluster import global_scheduler
from cluster.global_scheduler import GlobalScheduler, Placement
from cluster.placement import RankIndex, WorkerState
from cluster.policy_config import AutoscalerConfig, SchedulerConfig
from cluster.simulator import SimConfig, Simulation, synthetic
from cluster.simulator.trace import with_shared_prefixes
from engine.worker_stats import WorkerStats


def _stats(wid: str, role: str = "decode", **kw) -> WorkerStats:
    fields = dict(num_waiting=0, num_running=0, queued_prefill_tokens=0, free_blocks=1000,
                  total_blocks=1000, block_size=16, prefill_tokens_per_s=1000.0,
                  decode_tokens_per_s=0.0, max_num_seqs=64)
    fields.update(kw)
    return WorkerStats(wid, role, **fields)  # type: ignore[arg-type]


def test_rank_index_walks_live_workers_in_key_order():
    rng = random.Random(0)
    index = RankIndex()
    states = {f"w{i:03d}": WorkerState(_stats(f"w{i:03d}")) for i in range(60)}
    keys: dict[str, int] = {}
    for step in range(3000):
        wid = rng.choice(list(states))
        key = None if rng.random() < 0.15 else rng.randint(0, 20)  # many ties
        index.set(states[wid], key)
        if key is None:
            keys.pop(wid, None)
        else:
            keys[wid] = key
        if step % 97 == 0:
            expected = sorted(keys, key=lambda w: (keys[w], w))
            assert [w.worker_id for w in index.ordered()] == expected
            assert (index.first().worker_id if keys else None) == (
                expected[0] if expected else None)
            assert len(index) == len(keys)
    assert len(index._heap) <= 2 * len(keys) + 33  # stale entries are bounded


def _big_cluster(n: int, policy: str) -> tuple[GlobalScheduler, list[float]]:
    now = [0.0]
    sched = GlobalScheduler(SchedulerConfig(), policy=policy, clock=lambda: now[0])
    rng = random.Random(1)
    for i in range(n):
        backlog = rng.randint(0, 9000)
        sched.update_stats(_stats(f"p{i:04d}", "prefill", queued_prefill_tokens=backlog))
        sched.update_stats(_stats(f"d{i:04d}", free_blocks=rng.randint(100, 1000),
                                  num_running=rng.randint(0, 40)))
    return sched, now


@pytest.mark.parametrize("policy", ["kv_aware", "least_loaded", "round_robin"])
def test_a_placement_looks_at_a_few_workers_not_all(monkeypatch, policy):
    """1,000 prefill + 1,000 decode workers: each placement checks room on a handful."""
    checks = {"n": 0}
    for name in ("decode_room", "prefill_room"):
        real = getattr(global_scheduler, name)

        def counted(*args, _real=real):
            checks["n"] += 1
            return _real(*args)

        monkeypatch.setattr(global_scheduler, name, counted)
    sched, now = _big_cluster(1000, policy)
    rng = random.Random(2)
    placed = 0
    for i in range(300):
        now[0] += 0.01
        if i % 3 == 0:  # a worker reports in between
            k = rng.randrange(1000)
            sched.update_stats(_stats(f"d{k:04d}", free_blocks=rng.randint(100, 1000),
                                      timestamp=now[0]))
        placed += isinstance(sched.place(f"r{i}", rng.randint(10, 4000)), Placement)
    assert placed == 300
    assert checks["n"] / placed < 8  # scanning would check ~2,000 per placement


def test_simulator_snapshots_equal_validated_worker_stats():
    """The simulator's fast snapshot builds exactly the dataclass the constructor builds."""
    sim = Simulation(SimConfig(num_prefill=2, num_decode=2), synthetic(30, 5, seed=3))
    seen = []
    real = sim.sched.update_stats

    def check(stats):
        assert type(stats) is WorkerStats
        rebuilt = WorkerStats(**{k: getattr(stats, k) for k in WorkerStats.__dataclass_fields__})
        assert stats == rebuilt
        seen.append(stats)
        real(stats)

    sim.sched.update_stats = check  # type: ignore[method-assign]
    assert sim.run()["finished"] == len(sim.trace)
    assert len(seen) > 100


@pytest.mark.parametrize("kind", ["autoscaled", "saturated_with_prefixes"])
def test_the_event_loop_leaves_no_cyclic_garbage(kind):
    """``Simulation.run`` turns the cyclic collector off for the loop: that is safe only while
    the loop makes no reference cycles (each would stay in memory until the run ends)."""
    if kind == "autoscaled":
        cfg = SimConfig(num_prefill=1, num_decode=1, startup_s=2, autoscaler=AutoscalerConfig(
            interval_s=2, window_s=8, cooldown_s=4, scale_down_stable_s=4))
        trace = synthetic(40, 30, seed=5, prompt_median=400)
    else:  # queueing, refusals (exceptions caught in the loop), prefix-cache hits
        cfg = SimConfig(num_prefill=2, num_decode=2, kv_capacity_tokens=60_000,
                        scheduler=SchedulerConfig(admission_queue_size=20,
                                                  admission_queue_timeout_s=2.0))
        trace = with_shared_prefixes(synthetic(120, 10, seed=5, prompt_median=400), 4, 512,
                                     seed=3)
    sim = Simulation(cfg, trace)
    was_enabled = gc.isenabled()
    gc.collect()
    gc.freeze()  # only objects made during the run count (not other tests' leftovers)
    gc.disable()  # no automatic pass may hide a cycle made during the run
    try:
        res = sim.run()
        assert gc.collect() == 0
    finally:
        gc.unfreeze()
        if was_enabled:
            gc.enable()
    assert gc.isenabled() == was_enabled  # run() restored the collector as it found it
    assert res["finished"] > 0
    if kind == "autoscaled":
        assert res["autoscaler_decisions"]  # the scaling code ran too
    else:
        assert res["refused"] > 0 and res["prefix_hit_rate"] > 0


SKIP_CHECK_CONFIGS = {
    "disaggregated": (dict(num_prefill=3, num_decode=3), {}, 60.0),
    "saturated": (dict(num_prefill=2, num_decode=2, kv_capacity_tokens=60_000),
                  dict(admission_queue_size=40, admission_queue_timeout_s=3.0), 120.0),
    "local_prefill": (dict(num_prefill=2, num_decode=3),
                      dict(local_prefill_threshold_tokens=700), 60.0),
    "colocated": (dict(mode="colocated", num_colocated=4), {}, 40.0),
    "autoscaled": (dict(num_prefill=1, num_decode=1, startup_s=5, autoscaler=AutoscalerConfig(
        interval_s=5, window_s=20, cooldown_s=10, scale_down_stable_s=10)), {}, 50.0),
}


@pytest.mark.parametrize("name", list(SKIP_CHECK_CONFIGS))
def test_workers_flushed_without_a_report_had_nothing_to_report(name):
    """The loop skips ``report`` for workers whose change the scheduler does not read (a
    decode run cut for a joining request, KV landing): each of them, asked anyway, must
    answer None, or placement would run on stale stats."""
    cfg_kw, sched_kw, rate = SKIP_CHECK_CONFIGS[name]
    trace = with_shared_prefixes(synthetic(rate, 12, seed=11, prompt_median=400), 4, 512, seed=3)
    sim = Simulation(SimConfig(scheduler=SchedulerConfig(**sched_kw), **cfg_kw), trace)
    real_flush = sim._flush
    skipped = {"n": 0}

    def checking_flush():
        for wid, w in sim._changed.items():
            if w is None:
                skipped["n"] += 1
                assert sim.workers[wid].report(sim.now) is None, (wid, sim.now)
        real_flush()

    sim._flush = checking_flush  # type: ignore[method-assign]
    res = sim.run()
    assert res["finished"] > 0
    assert skipped["n"] > 20
