"""The simulator's tensor-parallel cost model, per-pool TP sizes, and the TP sweep."""

from __future__ import annotations

import pytest

from app.cli import main as cli_main
from cluster.policy_config import SLOConfig
from cluster.simulator import SimConfig, Simulation, synthetic
from cluster.simulator.loop import simulate
from cluster.simulator.profiles import (
    HARDWARE,
    MODELS,
    CostProfile,
    Efficiency,
    allreduce_costs,
)
from cluster.simulator.sweep import max_goodput_rate, sweep_tp, tp_configs
from cluster.simulator.trace import rescale_rate


def _single_device(hardware: str, model: str) -> dict:
    """The coefficients as the model computed them before TP had a cost (a copy of it)."""
    hw, m, eff = HARDWARE[hardware], MODELS[model], Efficiency()
    flops, hbm = hw.peak_flops * eff.mfu, hw.hbm_bytes_per_s * eff.mbu
    free = hw.memory_bytes * eff.memory_utilization - m.weight_bytes
    return dict(
        kv_bytes_per_token=m.kv_bytes_per_token,
        kv_capacity_tokens=int(free // m.kv_bytes_per_token),
        prefill_fixed_s=eff.prefill_overhead_s,
        prefill_per_token_s=2 * m.params / flops,
        prefill_per_attn_pair_s=4 * m.num_layers * m.num_heads * m.head_dim / flops,
        decode_fixed_s=eff.decode_overhead_s + m.weight_bytes / hbm,
        decode_per_seq_s=2 * m.params / flops,
        decode_per_kv_byte_s=1 / hbm,
        transfer_bandwidth_bytes_per_s=hw.link_bytes_per_s * eff.link_efficiency,
        transfer_latency_s=hw.link_latency_s,
    )


@pytest.mark.parametrize("hardware", sorted(HARDWARE))
@pytest.mark.parametrize("model", ["llama-3-8b", "qwen2.5-7b"])
def test_tp1_profile_is_the_single_device_model(hardware, model):
    prof = CostProfile.from_spec(hardware, model, tp=1)
    for name, value in _single_device(hardware, model).items():
        assert getattr(prof, name) == value, name
    assert allreduce_costs(HARDWARE[hardware], MODELS[model], 1) == (0.0, 0.0)


def test_allreduce_cost_by_hand_and_growing_with_tp():
    hw, m = HARDWARE["H100"], MODELS["llama-3-70b"]
    fixed, per_token = allreduce_costs(hw, m, 2)
    assert fixed == pytest.approx(2 * 80 * 8e-6)
    assert per_token == pytest.approx(2 * 80 * (2 * 1 / 2) * 8192 * 2 / (450e9 * 0.8))
    costs = [allreduce_costs(hw, m, tp) for tp in (1, 2, 4, 8)]
    assert all(a[0] <= b[0] and a[1] < b[1] for a, b in zip(costs, costs[1:], strict=False))


def test_tp_splits_compute_and_weights_but_pays_for_the_allreduce():
    profs = [CostProfile.from_spec("H100", "llama-3-70b", tp) for tp in (2, 4, 8)]
    for a, b, tp_a, tp_b in zip(profs[:-1], profs[1:], (2, 4), (4, 8), strict=True):
        assert b.prefill_per_token_s < a.prefill_per_token_s  # faster per worker ...
        assert tp_b * b.prefill_per_token_s > tp_a * a.prefill_per_token_s  # ... less per GPU
        assert b.decode_fixed_s < a.decode_fixed_s  # weights read by more devices
        assert b.decode_per_seq_s < a.decode_per_seq_s
        assert b.kv_capacity_tokens > a.kv_capacity_tokens
        assert b.prefill_fixed_s == a.prefill_fixed_s  # 2 * layers all-reduce latencies
    single = CostProfile.from_spec("H100", "llama-3-8b", 1)
    assert CostProfile.from_spec("H100", "llama-3-8b", 2).prefill_fixed_s == pytest.approx(
        single.prefill_fixed_s + 2 * 32 * 8e-6)
    with pytest.raises(ValueError, match="does not fit"):
        CostProfile.from_spec("H100", "llama-3-70b", tp=1)
    with pytest.raises(ValueError, match="does not divide"):
        CostProfile.from_spec("H100", "llama-3-70b", tp=3)


def test_kv_heads_are_replicated_beyond_their_count():
    m = MODELS["qwen3-30b-a3b"]  # 4 KV heads
    p4, p8 = (CostProfile.from_spec("H100", "qwen3-30b-a3b", tp) for tp in (4, 8))
    assert m.kv_replication(4) == 1 and m.kv_replication(8) == 2
    free8 = 8 * 80e9 * 0.9 - m.weight_bytes
    assert p8.kv_capacity_tokens == int(free8 // (2 * m.kv_bytes_per_token))
    assert p8.decode_per_kv_byte_s == pytest.approx(p4.decode_per_kv_byte_s)  # 2x bytes, 2x HBM


def test_moe_computes_with_active_and_stores_total_parameters():
    moe = CostProfile.from_spec("H100", "mixtral-8x7b", tp=2)
    m, hw, eff = MODELS["mixtral-8x7b"], HARDWARE["H100"], Efficiency()
    _, ar = allreduce_costs(hw, m, 2)
    flops, hbm = hw.peak_flops * eff.mfu * 2, hw.hbm_bytes_per_s * eff.mbu * 2
    assert moe.prefill_per_token_s == pytest.approx(2 * 12.9e9 / flops + ar)
    assert moe.decode_fixed_s == pytest.approx(
        eff.decode_overhead_s + 46.7e9 * 2 / hbm + allreduce_costs(hw, m, 2)[0])
    assert moe.kv_capacity_tokens == int((2 * 80e9 * 0.9 - 46.7e9 * 2) // m.kv_bytes_per_token)


def test_pools_run_their_own_tp_and_count_their_gpus():
    cfg = SimConfig(model="llama-3-70b", tp=4, prefill_tp=2, decode_tp=8,
                    num_prefill=3, num_decode=1)
    assert cfg.num_gpus == 3 * 2 + 1 * 8
    sim = Simulation(cfg, synthetic(2, 10, seed=0))
    res = sim.run()
    names = {w.role: w.prof.name for w in sim.workers.values()}
    assert names == {"prefill": "H100/llama-3-70b/tp2", "decode": "H100/llama-3-70b/tp8"}
    assert res["config"]["gpus"] == 14 and res["finished"] == len(sim.trace)
    # the KV link: 2 prefill ranks' NICs bound it, not the decode worker's 8
    assert sim._transfer.transfer_bandwidth_bytes_per_s == pytest.approx(2 * 50e9 * 0.8)


def test_tp_configs_fill_the_budget_with_whole_workers():
    base = SimConfig(model="llama-3-8b")
    configs = tp_configs(base, 8, (1, 2))
    seen = {(c.prefill_tp, c.decode_tp, c.num_prefill, c.num_decode) for c in configs}
    assert len(seen) == len(configs) == 7 + 6 + 3 + 3
    assert all(c.num_gpus <= 8 and c.num_prefill >= 1 and c.num_decode >= 1 for c in configs)
    assert all(8 - c.num_gpus < c.tp_of("decode") for c in configs)  # no decode worker left out
    assert {c.prefill_tp for c in tp_configs(SimConfig(model="llama-3-70b"), 16, (1, 2, 4))} \
        == {2, 4}  # 70B does not fit one H100


def test_max_goodput_rate_is_the_edge_of_the_slo():
    cfg = SimConfig(model="llama-3-8b", num_prefill=1, num_decode=1,
                    slo=SLOConfig(ttft_s=0.3, itl_s=0.03))
    trace = synthetic(5, 30, seed=4)
    rate, res = max_goodput_rate(cfg, trace, 0.9, rel_tol=0.05)
    assert rate > 0 and res["slo_attainment"] >= 0.9
    above = simulate(cfg, rescale_rate(trace, rate * 1.3))
    assert above["slo_attainment"] < 0.9


def test_sweep_tp_reports_the_best_and_its_gain_over_one_tp_size(capsys):
    trace = synthetic(4, 25, seed=5)
    base = SimConfig(model="llama-3-8b", slo=SLOConfig(ttft_s=0.3, itl_s=0.03))
    out = sweep_tp(base, trace, 4, (1, 2))
    rows = out["rows"]
    assert len(rows) == 3 + 2 + 1 + 1
    assert out["best"]["goodput_req_s"] == max(r["goodput_req_s"] for r in rows) > 0
    equal = [r for r in rows if r["prefill_tp"] == r["decode_tp"]]
    assert out["best_equal_tp"]["goodput_req_s"] == max(r["goodput_req_s"] for r in equal)
    assert out["gain_over_equal_tp"] == pytest.approx(
        out["best"]["goodput_req_s"] / out["best_equal_tp"]["goodput_req_s"] - 1)
    assert cli_main(["simulate", "--synthetic", "--rate", "4", "--duration", "25",
                     "--seed", "5", "--sweep", "--gpus", "3", "--tp-choices", "1",
                     "--ttft-slo", "0.3", "--itl-slo", "0.03"]) == 0
    printed = capsys.readouterr().out
    assert "best: prefill TP 1" in printed and "best with one TP size: TP 1" in printed


def test_autoscaler_budget_counts_the_gpus_of_each_pools_workers():
    from cluster.autoscaler import Autoscaler, WindowMetrics
    from cluster.policy_config import AutoscalerConfig

    cfg = AutoscalerConfig(max_total_replicas=16, scale_up_fraction=10.0, max_prefill=64)
    slow_ttft = WindowMetrics(ttft_p=10.0, itl_p=0.001)
    sizes = {"prefill": 2, "decode": 2}
    # one GPU per worker: 12 GPUs left, the prefill pool may grow to 2 + 12
    (one,) = Autoscaler(cfg, SLOConfig()).decide(0.0, slow_ttft, sizes)
    assert one.target == 14
    # TP 2 prefill, TP 4 decode: 2 * 2 + 2 * 4 = 12 GPUs used, room for 2 more prefill workers
    (tp,) = Autoscaler(cfg, SLOConfig(), {"prefill": 2, "decode": 4}).decide(
        0.0, slow_ttft, sizes)
    assert (tp.pool, tp.target, tp.from_pool) == ("prefill", 4, None)
    # at the budget with unequal sizes no worker changes role (it would not be one worker)
    full = {"prefill": 4, "decode": 2}
    assert Autoscaler(cfg, SLOConfig(), {"prefill": 2, "decode": 4}).decide(
        0.0, slow_ttft, full) == []


def test_cli_simulate_takes_a_tp_size_per_pool(tmp_path):
    out = tmp_path / "r.json"
    assert cli_main(["simulate", "--synthetic", "--rate", "2", "--duration", "5",
                     "--model", "llama-3-70b", "--prefill", "2", "--decode", "1",
                     "--prefill-tp", "2", "--decode-tp", "8", "--output", str(out)]) == 0
    import json

    config = json.loads(out.read_text())["config"]
    assert config["gpus"] == 2 * 2 + 8
    assert config["profiles"] == {"prefill": "H100/llama-3-70b/tp2",
                                  "decode": "H100/llama-3-70b/tp8"}
