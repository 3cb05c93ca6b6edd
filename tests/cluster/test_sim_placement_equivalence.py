"""The indexed placement makes exactly the decisions the scan-every-worker placement made.

``test_sim_placement_fixture.json`` was recorded from the scanning code (commit 37d0226, before
the index) by running this file as a script::

    .venv/bin/python tests/cluster/test_sim_placement_equivalence.py --record

Two kinds of seeded workloads, each on a small cluster:
- direct ``GlobalScheduler`` workloads: random stats (ties, speeds 0 and unequal, draining,
  seq caps, prefix hashes added / evicted / snapshotted, stale timestamps), placements, queue
  polls, cancels and removals, for every policy and with local prefill / partner bounds /
  colocated workers;
- whole simulations (prefix groups, saturation with queueing and refusals, autoscaling), whose
  every placement and summary figures must be the same.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import pytest

from cluster.global_scheduler import GlobalScheduler, Placement
from cluster.policy_config import AutoscalerConfig, SchedulerConfig
from cluster.simulator import SimConfig, Simulation, synthetic
from cluster.simulator.trace import with_shared_prefixes
from engine.errors import ResourceExhaustedError, UnavailableError
from engine.worker_stats import WorkerStats

FIXTURE = Path(__file__).with_name("test_sim_placement_fixture.json")

# (policy, scheduler config overrides, prefill ids, decode ids, colocated ids)
DIRECT = {
    "kv_aware": ("kv_aware", {}, 5, 5, 0),
    "least_loaded": ("least_loaded", {}, 5, 5, 0),
    "round_robin": ("round_robin", {}, 5, 5, 0),
    "kv_aware_local": ("kv_aware", {"local_prefill_threshold_tokens": 600}, 4, 5, 0),
    "kv_aware_partners": ("kv_aware", {"max_decode_partners_per_prefill": 2}, 5, 6, 0),
    "least_loaded_partners": ("least_loaded", {"max_decode_partners_per_prefill": 1}, 4, 6, 0),
    "kv_aware_colocated": ("kv_aware", {}, 0, 0, 6),
    "least_loaded_mixed": ("least_loaded", {"local_prefill_threshold_tokens": 300}, 3, 3, 3),
    "round_robin_mixed": ("round_robin", {}, 2, 3, 3),
}


def _prefix_pool(rng: random.Random) -> list[list[int]]:
    """Chained-looking hash sequences: 4 groups sharing a stem, 8 blocks each."""
    return [[1000 * g + j for j in range(8)] for g in range(4)]


def _random_stats(rng, wid, role, now, prefixes, total=512) -> WorkerStats:
    free = rng.choice([0, 3, 60, 200, 400, 500, 512, 512])
    group = rng.choice(prefixes)
    added = tuple(group[: rng.randint(0, 8)])
    evicted = tuple(rng.sample(group, rng.randint(0, 2))) if rng.random() < 0.3 else ()
    snapshot = rng.random() < 0.1
    return WorkerStats(
        wid, role, rng.randint(0, 4), rng.randint(0, 6),
        rng.choice([0, 0, 0, 100, 500, 500, 2000, 30000]), free, total, 16,
        rng.choice([0.0, 1000.0, 1000.0, 2000.0, 1500.0]), 0.0,
        added, () if snapshot else evicted, now - rng.choice([0.0, 0.05, 0.5]),
        rng.random() < 0.08, rng.choice([0, 4, 8, 8]), snapshot,
    )


def _record_placement(out: list[str], p) -> None:
    if isinstance(p, Placement):
        out.append(f"P {p.request_id} {p.prefill_worker_id} {p.decode_worker_id} "
                   f"{p.num_cached_tokens_expected}")
    else:
        out.append(f"Q {p.request_id} {p.position}")


def direct_workload(name: str, seed: int, steps: int = 400) -> list[str]:
    policy, overrides, n_p, n_d, n_c = DIRECT[name]
    rng = random.Random(f"{name}-{seed}")
    now = [0.0]
    cfg = SchedulerConfig(admission_queue_size=6, admission_queue_timeout_s=2.0,
                          max_queued_prefill_tokens=4000, **overrides)
    sched = GlobalScheduler(cfg, policy=policy, clock=lambda: now[0])
    workers = ([(f"p{i}", "prefill") for i in range(n_p)]
               + [(f"d{i}", "decode") for i in range(n_d)]
               + [(f"c{i}", "colocated") for i in range(n_c)])
    prefixes = _prefix_pool(rng)
    for wid, role in workers:
        sched.update_stats(_random_stats(rng, wid, role, now[0], prefixes))
    out: list[str] = []
    queued: list[str] = []
    for step in range(steps):
        now[0] += rng.choice([0.0, 0.01, 0.1, 0.3])
        op = rng.random()
        if op < 0.35:
            wid, role = rng.choice(workers)
            sched.update_stats(_random_stats(rng, wid, role, now[0], prefixes))
        elif op < 0.37:
            wid, _ = rng.choice(workers)
            sched.remove_worker(wid)
            out.append(f"R {wid}")
        elif op < 0.39 and queued:
            rid = rng.choice(queued)
            out.append(f"C {rid} {sched.cancel(rid)}")
        elif op < 0.5:
            update = sched.poll_queue()
            for p in update.placed:
                _record_placement(out, p)
            out.append(f"poll refused {update.refused} queue {sched.queue_length} "
                       f"{sched.queued_prompt_blocks()}")
        else:
            rid = f"r{step}"
            n = rng.choice([1, 15, 16, 40, 130, 300, 900, 3000, 5000])
            group = rng.choice(prefixes)
            hashes = tuple(group[: min(n // 16, rng.randint(0, 8))]) if rng.random() < 0.6 else ()
            try:
                p = sched.place(rid, n, block_hashes=hashes)
            except (ResourceExhaustedError, UnavailableError) as e:
                out.append(f"E {rid} {type(e).__name__}")
                continue
            _record_placement(out, p)
            if not isinstance(p, Placement):
                queued.append(rid)
    for role in ("prefill", "decode", "colocated"):
        out.append(f"ids {role} {sched.worker_ids(role)}")
    out.append(f"partners {[sched.partners(f'p{i}') for i in range(n_p)]}")
    return out


SIMS = {
    "kv_aware_prefix": ("kv_aware", {}, dict(num_prefill=4, num_decode=3), 60.0, 4),
    "least_loaded_prefix": ("least_loaded", {}, dict(num_prefill=4, num_decode=3), 60.0, 4),
    "round_robin_prefix": ("round_robin", {}, dict(num_prefill=4, num_decode=3), 60.0, 4),
    "kv_aware_saturated": (
        "kv_aware", {"admission_queue_size": 40, "admission_queue_timeout_s": 3.0},
        dict(num_prefill=2, num_decode=2, kv_capacity_tokens=60_000), 120.0, 0),
    "kv_aware_local_partners": (
        "kv_aware", {"local_prefill_threshold_tokens": 700, "max_decode_partners_per_prefill": 2},
        dict(num_prefill=3, num_decode=4), 60.0, 3),
    "kv_aware_colocated": (
        "kv_aware", {}, dict(mode="colocated", num_colocated=5), 40.0, 4),
    "kv_aware_autoscaled": (
        "kv_aware", {}, dict(num_prefill=1, num_decode=1, startup_s=5, autoscaler=AutoscalerConfig(
            interval_s=5, window_s=20, cooldown_s=10, scale_down_stable_s=10)), 50.0, 0),
}


def sim_workload(name: str) -> tuple[list[str], dict]:
    policy, sched_kw, cfg_kw, rate, groups = SIMS[name]
    trace = synthetic(rate, 12, seed=11, prompt_median=400)
    if groups:
        trace = with_shared_prefixes(trace, groups, 512, seed=3)
    cfg = SimConfig(scheduler=SchedulerConfig(**sched_kw), **cfg_kw)
    sim = Simulation(cfg, trace, policy=policy)
    out: list[str] = []
    place, poll = sim.sched.place, sim.sched.poll_queue

    def recording_place(*args, **kw):
        p = place(*args, **kw)
        _record_placement(out, p)
        return p

    def recording_poll():
        update = poll()
        for p in update.placed:
            _record_placement(out, p)
        if update.refused:
            out.append(f"refused {update.refused}")
        return update

    sim.sched.place = recording_place  # type: ignore[method-assign]
    sim.sched.poll_queue = recording_poll  # type: ignore[method-assign]
    res = sim.run()
    figures = {
        "events": res["events"], "finished": res["finished"], "refused": res["refused"],
        "ttft_p90": res["ttft_s"]["p90"], "itl_p90": res["itl_s"]["p90"],
        "goodput": res["goodput_req_s"], "hit_rate": res["prefix_hit_rate"],
        "replicas": len(res["replicas"]),
    }
    return out, figures


def record() -> None:
    data = {
        "direct": {f"{name}/{seed}": direct_workload(name, seed) for name in DIRECT
                   for seed in range(3)},
        "sims": {},
    }
    for name in SIMS:
        decisions, figures = sim_workload(name)
        data["sims"][name] = {"decisions": decisions, "figures": figures}
    FIXTURE.write_text(json.dumps(data, separators=(",", ":")) + "\n")
    print(f"wrote {FIXTURE} ({FIXTURE.stat().st_size} bytes)")


def _first_difference(got: list[str], expected: list[str]) -> str | None:
    for i, (a, b) in enumerate(zip(got, expected, strict=False)):
        if a != b:
            return f"line {i}: got {a!r}, expected {b!r}"
    if len(got) != len(expected):
        return f"{len(got)} lines, expected {len(expected)}"
    return None


@pytest.fixture(scope="module")
def recorded() -> dict:
    return json.loads(FIXTURE.read_text())


@pytest.mark.parametrize("name", list(DIRECT))
def test_direct_scheduler_workloads_place_as_the_scanning_code_did(recorded, name):
    for seed in range(3):
        expected = recorded["direct"][f"{name}/{seed}"]
        got = direct_workload(name, seed)
        assert sum(line.startswith("P ") for line in got) > 30  # the workload places a lot
        assert _first_difference(got, expected) is None, f"{name}/{seed}"


@pytest.mark.parametrize("name", list(SIMS))
def test_simulations_place_as_the_scanning_code_did(recorded, name):
    expected = recorded["sims"][name]
    decisions, figures = sim_workload(name)
    assert _first_difference(decisions, expected["decisions"]) is None, name
    assert figures == pytest.approx(expected["figures"], rel=1e-9)


if __name__ == "__main__" and "--record" in sys.argv:
    record()
