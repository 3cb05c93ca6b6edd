"""Autoscaler decisions on hand-built window metrics, and its invariants under hypothesis."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cluster.autoscaler import Autoscaler, RollingWindow, WindowMetrics, weighted_percentile
from cluster.policy_config import AutoscalerConfig, SLOConfig

SLO = SLOConfig(ttft_s=0.5, itl_s=0.05)
QUIET = WindowMetrics(ttft_p=0.05, itl_p=0.01)
CALM = WindowMetrics(ttft_p=0.4, itl_p=0.04, decode_kv_usage=0.6)  # inside the hysteresis band


def make(**kw):
    base = dict(cooldown_s=60, scale_down_stable_s=120, min_prefill=1, max_prefill=8,
                min_decode=1, max_decode=8)
    base.update(kw)
    return Autoscaler(AutoscalerConfig(**base), SLO)


def test_ttft_breach_grows_prefill():
    (d,) = make().decide(0.0, WindowMetrics(ttft_p=0.9, itl_p=0.01), {"prefill": 4, "decode": 4})
    assert (d.pool, d.current, d.target, d.from_pool) == ("prefill", 4, 5, None)
    assert "TTFT" in d.reason


def test_scale_up_step_is_proportional():
    a = make(scale_up_fraction=0.5, max_prefill=64)
    (d,) = a.decide(0.0, WindowMetrics(ttft_p=2.0), {"prefill": 10, "decode": 4})
    assert d.target == 15


@pytest.mark.parametrize("metrics", [
    WindowMetrics(itl_p=0.08),
    WindowMetrics(decode_kv_usage=0.95),
    WindowMetrics(decode_queue_per_worker=10),
])
def test_decode_pressure_grows_decode(metrics):
    (d,) = make().decide(0.0, metrics, {"prefill": 2, "decode": 2})
    assert d.pool == "decode" and d.target == 3


def test_high_ttft_caused_by_full_decode_pool_does_not_grow_prefill():
    m = WindowMetrics(ttft_p=3.0, decode_kv_usage=0.97)
    decisions = make().decide(0.0, m, {"prefill": 2, "decode": 2})
    assert [d.pool for d in decisions] == ["decode"]


def test_cooldown_blocks_a_second_change_of_the_same_pool():
    a = make(scale_up_cooldown_s=60)
    hot = WindowMetrics(ttft_p=2.0)
    assert a.decide(0.0, hot, {"prefill": 2, "decode": 2})
    assert a.decide(59.0, hot, {"prefill": 3, "decode": 2}) == []
    (d,) = a.decide(60.0, hot, {"prefill": 3, "decode": 2})
    assert d.target == 4


def test_up_may_follow_up_sooner_but_down_waits_the_full_cooldown():
    a = make(cooldown_s=60, scale_up_cooldown_s=20, scale_down_stable_s=0,
             allow_role_change=False, min_decode=2)
    sizes = {"prefill": 2, "decode": 2}

    def demand(workers: int) -> WindowMetrics:  # needs ``workers`` at 70% utilisation
        return WindowMetrics(ttft_p=2.0, prefill_demand_tokens_per_s=7000 * workers,
                             prefill_tokens_per_s_per_worker=10_000)

    assert a.decide(0.0, demand(3), sizes)[0].target == 3
    sizes["prefill"] = 3
    assert a.decide(19.0, demand(4), sizes) == []
    assert a.decide(20.0, demand(4), sizes)[0].target == 4
    sizes["prefill"] = 4
    assert a.decide(40.0, WindowMetrics(ttft_p=2.0), sizes) == []  # pressure alone: 60 s
    assert a.decide(30.0, QUIET, sizes) == []  # no reversal within 60 s of the last change
    assert a.decide(79.0, QUIET, sizes) == []
    (d,) = a.decide(80.0, QUIET, sizes)
    assert (d.pool, d.target) == ("prefill", 3)


def test_measured_demand_sizes_the_prefill_pool_at_once():
    m = WindowMetrics(ttft_p=0.1, prefill_demand_tokens_per_s=100_000,
                      prefill_tokens_per_s_per_worker=10_000)  # needs 100k / (10k * 0.7) = 15
    (d,) = make(max_prefill=32).decide(0.0, m, {"prefill": 4, "decode": 4})
    assert (d.pool, d.target) == ("prefill", 15) and "measured load" in d.reason


def test_no_shrink_below_what_the_load_needs():
    a = make(cooldown_s=0, scale_down_stable_s=0, allow_role_change=False)
    busy = WindowMetrics(ttft_p=0.05, itl_p=0.01, prefill_utilization=0.6)
    assert a.decide(0.0, busy, {"prefill": 2, "decode": 1}) == []  # 0.6 * 2 / 1 > 0.7
    idle = WindowMetrics(ttft_p=0.05, itl_p=0.01, prefill_utilization=0.3)
    assert a.decide(1.0, idle, {"prefill": 2, "decode": 1})[0].target == 1


def test_scale_down_needs_low_load_held_and_respects_min():
    a = make(scale_down_stable_s=100, cooldown_s=0, allow_role_change=False)
    sizes = {"prefill": 2, "decode": 1}
    assert a.decide(0.0, QUIET, sizes) == []
    assert a.decide(99.0, QUIET, sizes) == []
    (d,) = a.decide(100.0, QUIET, sizes)
    assert (d.pool, d.target) == ("prefill", 1)  # decode already at its min
    assert a.decide(300.0, QUIET, {"prefill": 1, "decode": 1}) == []


def test_hysteresis_band_changes_nothing():
    a = make(cooldown_s=0, scale_down_stable_s=0)
    for t in range(0, 1000, 50):
        assert a.decide(float(t), CALM, {"prefill": 3, "decode": 3}) == []


def test_low_load_interrupted_restarts_the_stability_clock():
    a = make(scale_down_stable_s=100, cooldown_s=0, allow_role_change=False, min_decode=2)
    sizes = {"prefill": 3, "decode": 2}
    a.decide(0.0, QUIET, sizes)
    a.decide(50.0, CALM, sizes)  # not low: clock resets
    assert a.decide(120.0, QUIET, sizes) == []
    assert a.decide(220.0, QUIET, sizes)[0].target == 2


def test_role_change_at_the_gpu_budget():
    a = make(max_total_replicas=6)
    m = WindowMetrics(ttft_p=2.0, itl_p=0.01)  # prefill hot, decode fine
    (d,) = a.decide(0.0, m, {"prefill": 3, "decode": 3})
    assert (d.pool, d.from_pool, d.current, d.target) == ("prefill", "decode", 3, 4)
    # both pools are now in cooldown
    assert a.decide(30.0, WindowMetrics(itl_p=0.2), {"prefill": 4, "decode": 2}) == []


def test_role_change_from_an_idle_pool_without_budget():
    a = make(scale_down_stable_s=50)
    idle_decode = WindowMetrics(ttft_p=0.01, itl_p=0.005)
    a.decide(0.0, idle_decode, {"prefill": 2, "decode": 4})
    (d,) = a.decide(60.0, WindowMetrics(ttft_p=1.5, itl_p=0.005),
                    {"prefill": 2, "decode": 4})
    assert (d.pool, d.from_pool) == ("prefill", "decode")


def test_budget_without_role_change_caps_growth():
    a = make(max_total_replicas=6, allow_role_change=False)
    assert a.decide(0.0, WindowMetrics(ttft_p=2.0), {"prefill": 3, "decode": 3}) == []


def test_out_of_bounds_sizes_are_clamped_and_disabled_does_nothing():
    (d,) = make(min_decode=2).decide(0.0, CALM, {"prefill": 1, "decode": 0})
    assert (d.pool, d.target, d.reason) == ("decode", 2, "bounds")
    off = Autoscaler(AutoscalerConfig(enabled=False), SLO)
    assert off.decide(0.0, WindowMetrics(ttft_p=9.0), {"prefill": 0, "decode": 0}) == []


def test_rolling_window_percentiles_and_expiry():
    w = RollingWindow(window_s=10.0)
    for i in range(100):
        w.add_ttft(float(i) / 10, float(i))  # values 0..99 at t 0..9.9
    w.add_itl(5.0, 0.010, weight=90)
    w.add_itl(5.0, 0.100, weight=10)
    w.add_gauge("decode_kv_usage", 9.0, 0.5)
    w.add_gauge("decode_kv_usage", 9.5, 0.7)
    w.add_arrival(9.0, 1000)
    w.add_arrival(9.5, 3000)
    m = w.metrics(9.9, 90)
    assert m.prefill_demand_tokens_per_s == pytest.approx(4000 / 0.9)  # since the first arrival
    assert m.prefill_utilization is None
    assert m.ttft_p == 89.0 and m.itl_p == 0.010 and m.decode_kv_usage == pytest.approx(0.6)
    assert w.metrics(9.9, 95).itl_p == 0.100
    late = w.metrics(30.0, 90)
    assert late.ttft_p is None and late.itl_p is None and late.decode_kv_usage == 0.0
    assert weighted_percentile([], 50) is None


def test_config_rejects_inverted_bounds():
    with pytest.raises(ValueError):
        AutoscalerConfig(min_prefill=5, max_prefill=2)


# ---- properties: bounds and no flip within the cooldown --------------------------------------

metrics_st = st.builds(
    WindowMetrics,
    ttft_p=st.one_of(st.none(), st.floats(0, 5)),
    itl_p=st.one_of(st.none(), st.floats(0, 0.3)),
    prefill_queue_per_worker=st.floats(0, 20),
    decode_queue_per_worker=st.floats(0, 20),
    decode_kv_usage=st.floats(0, 1),
    prefill_utilization=st.one_of(st.none(), st.floats(0, 1)),
    prefill_demand_tokens_per_s=st.one_of(st.none(), st.floats(0, 1e5)),
    prefill_tokens_per_s_per_worker=st.one_of(st.none(), st.floats(1e3, 5e4)),
)
# random metrics are rarely all quiet: mix in the typical states so flips get a chance
any_metrics_st = st.one_of(
    st.sampled_from([QUIET, CALM, WindowMetrics(ttft_p=2.0), WindowMetrics(itl_p=0.2)]),
    metrics_st,
)


@settings(max_examples=80, deadline=None)
@given(
    steps=st.lists(st.tuples(st.floats(0.5, 40), any_metrics_st), min_size=1, max_size=40),
    stable=st.sampled_from([0.0, 20.0]),
    cooldown=st.sampled_from([0.0, 30.0, 60.0]),
    budget=st.sampled_from([0, 6, 10]),
    role_change=st.booleans(),
    start=st.tuples(st.integers(1, 5), st.integers(1, 5)),
    up=st.sampled_from([0.25, 1.0]),
)
def test_never_leaves_bounds_nor_flips_within_cooldown(
    steps, stable, cooldown, budget, role_change, start, up
):
    cfg = AutoscalerConfig(min_prefill=1, max_prefill=5, min_decode=1, max_decode=5,
                           cooldown_s=cooldown, scale_up_cooldown_s=cooldown / 3,
                           scale_down_stable_s=stable, scale_up_fraction=up,
                           max_total_replicas=budget, allow_role_change=role_change)
    a = Autoscaler(cfg, SLO)
    sizes = {"prefill": start[0], "decode": start[1]}
    last: dict[str, tuple[float, int]] = {}  # pool -> (time, direction) of its last change
    now = 0.0
    for dt, m in steps:
        now += dt
        for d in a.decide(now, m, dict(sizes)):
            changes = [(d.pool, d.target - sizes[d.pool])]
            if d.from_pool is not None:
                assert d.target == sizes[d.pool] + 1
                changes.append((d.from_pool, -1))
            for pool, delta in changes:
                if pool in last and d.reason != "bounds":
                    t_prev, delta_prev = last[pool]
                    both_up = delta > 0 and delta_prev > 0
                    gap = cooldown / 3 if both_up else cooldown
                    assert now - t_prev >= gap, "changed within the cooldown"
                    if (delta > 0) != (delta_prev > 0):
                        assert now - t_prev >= cooldown, "flipped within the cooldown"
                last[pool] = (now, delta)
                sizes[pool] += delta
            lo_hi = {"prefill": (1, 5), "decode": (1, 5)}
            for pool, (lo, hi) in lo_hi.items():
                assert lo <= sizes[pool] <= hi
            if budget and d.reason != "bounds":
                assert sizes["prefill"] + sizes["decode"] <= max(budget, sum(start))


def test_live_gauges_count_held_requests_for_the_pool_that_lacks_room():
    """Requests the scheduler holds are prefill queue while decode has KV room, and decode
    queue plus decode KV demand (their prompt blocks) once decode is nearly full: the same
    attribution as the simulator's."""
    from types import SimpleNamespace

    from cluster.autoscaling import AutoscalingLoop
    from cluster.global_scheduler import GlobalScheduler
    from cluster.policy_config import AutoscalerConfig, SchedulerConfig, SLOConfig

    def stats(role, kv_usage, used):
        return SimpleNamespace(role=role, num_waiting=1, num_running=1, kv_usage=kv_usage,
                               prefill_tokens_per_s=0.0, total_blocks=100,
                               free_blocks=100 - used)

    scheduler = GlobalScheduler(SchedulerConfig(block_size=16))
    scheduler._queue.update({  # two held requests: 33 and 16 prompt tokens -> 3 + 1 blocks
        "a": SimpleNamespace(num_prompt_tokens=33), "b": SimpleNamespace(num_prompt_tokens=16)})
    assert scheduler.queue_length == 2 and scheduler.queued_prompt_blocks() == 4
    config = AutoscalerConfig()
    for kv_usage, held_by_decode in [(0.2, False), (config.kv_usage_high, True)]:
        backend = SimpleNamespace(window=None, last_stats={
            "p0": stats("prefill", 0.0, 0), "d0": stats("decode", kv_usage, 60)})
        live = SimpleNamespace(backend=backend, scheduler=scheduler)
        loop = AutoscalingLoop(live, config, SLOConfig())
        loop._sample_gauges(0.0)
        m = loop.window.metrics(0.0, 99)
        assert m.prefill_queue_per_worker == (1 if held_by_decode else 3)
        assert m.decode_queue_per_worker == (3 if held_by_decode else 1)
        assert m.decode_demand_blocks == (64 if held_by_decode else 60)
