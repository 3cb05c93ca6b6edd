"""Global scheduler, placement policies, prefix index and prefix hashes, on fake stats."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cluster.global_scheduler import GlobalScheduler, Placement, Queued
from cluster.placement import POLICIES, PrefixIndex, make_policy
from cluster.policy_config import SchedulerConfig
from engine.errors import ResourceExhaustedError, UnavailableError
from engine.prefix_hash import ROOT_HASH, block_hashes, hash_block
from engine.worker_stats import WorkerStats

BS = 16


def stats(wid, role, *, queued=0, free=1000, total=1000, running=0, waiting=0, speed=10000.0,
          added=(), evicted=(), t=0.0, draining=False, max_seqs=0, snapshot=False):
    return WorkerStats(wid, role, waiting, running, queued, free, total, BS, speed, 0.0,
                       tuple(added), tuple(evicted), t, draining, max_seqs, snapshot)


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def make(policy="kv_aware", n_prefill=2, n_decode=2, clock=None, **cfg):
    s = GlobalScheduler(SchedulerConfig(block_size=BS, **cfg), policy=policy,
                        clock=clock or Clock())
    for i in range(n_prefill):
        s.update_stats(stats(f"p{i}", "prefill"))
    for i in range(n_decode):
        s.update_stats(stats(f"d{i}", "decode"))
    return s


# ---- prefix hashes ---------------------------------------------------------------------------


def test_block_hashes_are_chained_and_skip_the_partial_block():
    ids = list(range(50))
    hs = block_hashes(ids, BS)
    assert len(hs) == 3
    assert hs[0] == hash_block(ROOT_HASH, ids[:16])
    assert hs[1] == hash_block(hs[0], ids[16:32])
    assert hs[2] == hash_block(hs[1], ids[32:48])
    # a change in block 0 changes every later hash; a change in block 2 only block 2
    changed = block_hashes([999] + ids[1:], BS)
    assert all(a != b for a, b in zip(hs, changed, strict=True))
    late = block_hashes(ids[:40] + [7] + ids[41:], BS)
    assert late[:2] == hs[:2] and late[2] != hs[2]
    assert block_hashes(ids[:15], BS) == []
    assert all(0 <= h < 2**64 for h in hs)


def test_block_hashes_are_stable_across_processes():
    code = "from engine.prefix_hash import block_hashes; print(block_hashes(list(range(64)), 16))"
    outs = {
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                       env={"PYTHONHASHSEED": seed}).stdout
        for seed in ("1", "2")
    }
    assert len(outs) == 1
    assert outs.pop().strip() == str(block_hashes(list(range(64)), 16))


def test_block_hashes_rejects_bad_block_size():
    with pytest.raises(ValueError):
        block_hashes([1, 2], 0)


# ---- prefix index ----------------------------------------------------------------------------


def test_prefix_index_longest_prefix_per_worker():
    idx = PrefixIndex()
    hs = block_hashes(list(range(64)), BS)  # 4 blocks
    idx.add("a", hs[:3])
    idx.add("b", hs[:1])
    idx.add("c", hs[1:])  # no block 0: matches nothing
    assert idx.match(hs) == {"a": 3, "b": 1}
    idx.evict("a", hs[2:3])
    assert idx.match(hs) == {"a": 2, "b": 1}
    idx.reset("b", hs)
    assert idx.match(hs) == {"a": 2, "b": 4}
    idx.remove_worker("a")
    assert idx.match(hs) == {"b": 4}
    assert idx.match([]) == {}


# ---- policies --------------------------------------------------------------------------------


def test_registry_lists_the_three_policies():
    assert set(POLICIES) == {"round_robin", "least_loaded", "kv_aware"}
    with pytest.raises(ValueError, match="unknown placement policy"):
        make_policy("nope")


def test_round_robin_cycles_in_id_order():
    s = make("round_robin", n_prefill=3, n_decode=2)
    got = [s.place(f"r{i}", 32) for i in range(6)]
    assert [p.prefill_worker_id for p in got] == ["p0", "p1", "p2", "p0", "p1", "p2"]
    assert [p.decode_worker_id for p in got] == ["d0", "d1", "d0", "d1", "d0", "d1"]


def test_least_loaded_picks_smallest_backlog_and_fewest_requests():
    s = make("least_loaded")
    s.update_stats(stats("p0", "prefill", queued=5000))
    s.update_stats(stats("p1", "prefill", queued=100))
    s.update_stats(stats("d0", "decode", running=3))
    s.update_stats(stats("d1", "decode", running=7))
    p = s.place("r", 64)
    assert (p.prefill_worker_id, p.decode_worker_id) == ("p1", "d0")


def test_kv_aware_prefers_the_cached_prefix_and_the_faster_worker():
    s = make("kv_aware")
    prompt = list(range(2048))
    hs = block_hashes(prompt, BS)
    # p1 holds the whole prompt's prefix but has a little more backlog
    s.update_stats(stats("p0", "prefill", queued=100))
    s.update_stats(stats("p1", "prefill", queued=500, added=hs))
    p = s.place("r1", len(prompt), prompt_token_ids=prompt)
    assert p.prefill_worker_id == "p1"
    assert p.num_cached_tokens_expected == 2047  # at least one token is always computed
    # no cache anywhere: the faster worker wins despite a larger backlog
    s2 = make("kv_aware")
    s2.update_stats(stats("p0", "prefill", queued=1000, speed=1000.0))
    s2.update_stats(stats("p1", "prefill", queued=4000, speed=20000.0))
    assert s2.place("r2", 100).prefill_worker_id == "p1"


def test_kv_aware_decode_prefers_free_blocks_and_small_batch():
    s = make("kv_aware")
    s.update_stats(stats("d0", "decode", free=200, running=10, max_seqs=64))
    s.update_stats(stats("d1", "decode", free=900, running=10, max_seqs=64))
    assert s.place("r", 64).decode_worker_id == "d1"


def test_evicted_hashes_stop_attracting_requests():
    s = make("kv_aware")
    prompt = list(range(1024))
    hs = block_hashes(prompt, BS)
    s.update_stats(stats("p1", "prefill", queued=300, added=hs))
    s.update_stats(stats("p1", "prefill", queued=300, evicted=hs, t=1.0))
    p = s.place("r", len(prompt), block_hashes=hs)
    assert p.prefill_worker_id == "p0" and p.num_cached_tokens_expected == 0


def test_cache_snapshot_replaces_what_the_scheduler_knew():
    s = make("kv_aware")
    a, b = block_hashes(list(range(256)), BS), block_hashes(list(range(1000, 1256)), BS)
    s.update_stats(stats("p1", "prefill", added=a))
    s.update_stats(stats("p1", "prefill", added=b, snapshot=True, t=1.0))
    assert s.place("ra", 256, block_hashes=a).num_cached_tokens_expected == 0


def test_pending_load_spreads_a_burst_between_reports():
    s = make("kv_aware", n_prefill=4, n_decode=4)
    got = {s.place(f"r{i}", 4096).prefill_worker_id for i in range(4)}
    assert got == {"p0", "p1", "p2", "p3"}


def test_a_newer_report_replaces_pending_load():
    clock = Clock()
    s = make("least_loaded", clock=clock)
    clock.t = 1.0
    assert s.place("r0", 4096).prefill_worker_id == "p0"
    assert s.place("r1", 4096).prefill_worker_id == "p1"  # p0 carries r0 as pending
    s.update_stats(stats("p0", "prefill", queued=0, t=2.0))  # p0 already finished r0
    clock.t = 3.0
    assert s.place("r2", 4096).prefill_worker_id == "p0"


# ---- conditional disaggregation, partners, draining ------------------------------------------


def test_short_uncached_prompt_is_prefilled_on_the_decode_worker():
    s = make("kv_aware", local_prefill_threshold_tokens=256)
    short = s.place("short", 200)
    assert short.prefill_worker_id is None and short.decode_worker_id in {"d0", "d1"}
    long = s.place("long", 2000)
    assert long.prefill_worker_id is not None


def test_decode_only_cluster_with_local_prefill_but_long_prompt_waits():
    s = GlobalScheduler(SchedulerConfig(block_size=BS, local_prefill_threshold_tokens=128),
                        clock=Clock())
    s.update_stats(stats("d0", "decode"))
    assert isinstance(s.place("short", 100), Placement)
    assert isinstance(s.place("long", 1000), Queued)


def test_partner_bound_limits_decode_workers_per_prefill_worker():
    s = make("round_robin", n_prefill=2, n_decode=4, max_decode_partners_per_prefill=2)
    pairs = [s.place(f"r{i}", 32) for i in range(16)]
    for pid in ("p0", "p1"):
        partners = {p.decode_worker_id for p in pairs if p.prefill_worker_id == pid}
        assert len(partners) <= 2
        assert partners == set(s.partners(pid))


def test_partner_bound_falls_back_to_the_next_prefill_worker():
    s = make("kv_aware", n_prefill=2, n_decode=2, max_decode_partners_per_prefill=1)
    s.update_stats(stats("p1", "prefill", queued=10_000))
    assert s.place("r0", 32).decode_worker_id == "d0"  # p0 -> d0 partnership
    s.update_stats(stats("d0", "decode", free=0))  # d0 full: p0 cannot reach d1
    p = s.place("r1", 32)
    assert (p.prefill_worker_id, p.decode_worker_id) == ("p1", "d1")


def test_draining_and_removed_workers_get_nothing():
    s = make("round_robin")
    s.update_stats(stats("p0", "prefill", draining=True))
    s.remove_worker("d0")
    for i in range(4):
        p = s.place(f"r{i}", 32)
        assert (p.prefill_worker_id, p.decode_worker_id) == ("p1", "d1")
    assert s.worker_ids("decode") == ["d1"]


def test_colocated_workers_place_on_one_worker():
    s = GlobalScheduler(SchedulerConfig(block_size=BS), clock=Clock())
    s.update_stats(stats("c0", "colocated", queued=5000))
    s.update_stats(stats("c1", "colocated"))
    p = s.place("r", 100)
    assert p == Placement("r", None, "c1", 0)


# ---- admission control -----------------------------------------------------------------------


def test_no_workers_is_unavailable():
    s = GlobalScheduler(SchedulerConfig(block_size=BS), clock=Clock())
    with pytest.raises(UnavailableError, match="retry"):
        s.place("r", 10)
    s.update_stats(stats("p0", "prefill"))
    with pytest.raises(UnavailableError):
        s.place("r", 10)


def test_full_cluster_queues_then_places_in_order_then_refuses():
    clock = Clock()
    s = make("kv_aware", n_prefill=1, n_decode=1, clock=clock, admission_queue_size=2,
             admission_queue_timeout_s=10.0)
    s.update_stats(stats("d0", "decode", free=10))  # 10 blocks: nothing of 512 tokens fits
    assert s.place("a", 512) == Queued("a", 0)
    assert s.place("b", 16) == Queued("b", 1)  # fits, but may not overtake "a"
    with pytest.raises(ResourceExhaustedError, match="retry later"):
        s.place("c", 16)
    assert s.poll_queue().placed == []
    s.update_stats(stats("d0", "decode", free=1000, t=1.0))
    clock.t = 1.0
    update = s.poll_queue()
    assert [p.request_id for p in update.placed] == ["a", "b"] and s.queue_length == 0


def test_queued_requests_time_out_and_can_be_cancelled():
    clock = Clock()
    s = make(n_prefill=1, n_decode=1, clock=clock, admission_queue_timeout_s=5.0)
    s.update_stats(stats("d0", "decode", free=0))
    s.place("a", 100)
    s.place("b", 100)
    assert s.cancel("b") and not s.cancel("b")
    clock.t = 6.0
    assert s.poll_queue().refused == ["a"]


def test_block_size_mismatch_is_a_clear_error():
    s = GlobalScheduler(SchedulerConfig(block_size=32), clock=Clock())
    with pytest.raises(ValueError, match="block_size"):
        s.update_stats(stats("p0", "prefill"))


def test_worker_stats_validate():
    with pytest.raises(ValueError, match="role"):
        stats("x", "both")
    with pytest.raises(ValueError, match="exceeds"):
        stats("x", "decode", free=10, total=5)
    assert stats("x", "decode", free=250, total=1000).kv_usage == 0.75


# ---- property: never a placement on a worker without room -----------------------------------

worker_st = st.fixed_dictionaries({
    "queued": st.integers(0, 40_000),
    "free": st.integers(0, 300),
    "running": st.integers(0, 8),
    "draining": st.booleans(),
    "max_seqs": st.sampled_from([0, 4, 8]),
})


@settings(max_examples=60, deadline=None)
@given(
    prefills=st.lists(worker_st, min_size=1, max_size=4),
    decodes=st.lists(worker_st, min_size=1, max_size=4),
    prompts=st.lists(st.integers(1, 3000), min_size=1, max_size=12),
    policy=st.sampled_from(sorted(POLICIES)),
    local=st.sampled_from([0, 256]),
    bound=st.sampled_from([0, 1, 2]),
)
def test_never_places_on_a_worker_without_room(prefills, decodes, prompts, policy, local, bound):
    cfg = SchedulerConfig(block_size=BS, max_queued_prefill_tokens=8192,
                          local_prefill_threshold_tokens=local,
                          max_decode_partners_per_prefill=bound)
    s = GlobalScheduler(cfg, policy=policy, clock=Clock())
    model = {}  # worker id -> [queued tokens, free blocks, requests, draining, max_seqs, total]
    for role, specs in (("prefill", prefills), ("decode", decodes)):
        for i, w in enumerate(specs):
            wid = f"{role[0]}{i}"
            s.update_stats(stats(wid, role, queued=w["queued"], free=w["free"], total=300,
                                 running=w["running"], draining=w["draining"],
                                 max_seqs=w["max_seqs"]))
            model[wid] = [w["queued"], w["free"], w["running"], w["draining"], w["max_seqs"]]
    headroom = math.ceil(cfg.decode_free_blocks_watermark * 300)
    for i, n in enumerate(prompts):
        result = s.place(f"r{i}", n)
        if not isinstance(result, Placement):
            continue
        need = math.ceil(n / BS)
        d = model[result.decode_worker_id]
        assert not d[3] and d[1] >= need + headroom and (not d[4] or d[2] < d[4])
        prefiller = model[result.prefill_worker_id or result.decode_worker_id]
        assert not prefiller[3]
        if result.prefill_worker_id is None:
            assert local and n <= local
        else:
            assert prefiller[0] == 0 or prefiller[0] + n <= cfg.max_queued_prefill_tokens
        prefiller[0] += n
        d[1] -= need
        d[2] += 1
    for pid in s.worker_ids("prefill"):
        assert not bound or len(s.partners(pid)) <= bound
