"""Cluster simulator: cost models, calibration, traces, the analytic decode runs against a
step-by-step reference, end-to-end timings by hand, autoscaling, sweep and the CLI."""

from __future__ import annotations

import heapq
import json
import math
import random

import numpy as np
import pytest

from app.cli import main as cli_main
from cluster.global_scheduler import GlobalScheduler
from cluster.policy_config import AutoscalerConfig, SchedulerConfig, SLOConfig
from cluster.simulator import SimConfig, Simulation, simulate, synthetic
from cluster.simulator.calibrate import fit_profile
from cluster.simulator.profiles import CostProfile, resolve_profile
from cluster.simulator.sweep import sweep
from cluster.simulator.trace import (
    TraceRequest,
    load_csv,
    rescale_rate,
    with_shared_prefixes,
    write_csv,
)
from cluster.simulator.worker import SimRequest, SimWorker

H100 = CostProfile.from_spec("H100", "llama-3-8b")


# ---- cost models -----------------------------------------------------------------------------


def test_spec_profiles_are_plausible():
    assert 20_000 < H100.prefill_tokens_per_s(8192) < 40_000  # 8B prefill on one H100
    assert 0.006 < H100.decode_step_s(1, 100) < 0.012  # weight-read bound
    assert H100.kv_bytes_per_token == 131072  # 32 layers * 2 * 8 heads * 128 * 2 bytes
    h200 = CostProfile.from_spec("H200", "llama-3-8b")
    a100 = CostProfile.from_spec("A100", "llama-3-8b")
    assert h200.decode_step_s(64, 10**5) < H100.decode_step_s(64, 10**5)
    assert h200.kv_capacity_tokens > H100.kv_capacity_tokens
    assert a100.prefill_step_s(4096) > 2 * H100.prefill_step_s(4096)
    with pytest.raises(ValueError, match="raise tp"):
        CostProfile.from_spec("H100", "llama-3-70b", tp=1)
    assert CostProfile.from_spec("H100", "llama-3-70b", tp=4).kv_capacity_tokens > 0


def test_profile_json_round_trip(tmp_path):
    path = tmp_path / "p.json"
    H100.save(path)
    data = json.loads(path.read_text())
    assert data["format"] == "splitserve-sim-profile/v1"
    assert set(data["decode"]) == {"fixed_s", "per_seq_s", "per_kv_byte_s"}
    assert CostProfile.load(path) == H100
    assert resolve_profile(str(path), "ignored") == H100
    with pytest.raises(ValueError, match="format"):
        CostProfile.from_json({**data, "format": "other"})
    with pytest.raises(ValueError, match="unknown hardware"):
        resolve_profile("TPU", "llama-3-8b")


def test_calibrate_recovers_known_coefficients():
    truth = H100.with_(prefill_fixed_s=0.004, prefill_per_token_s=5e-5, decode_fixed_s=0.01,
                       decode_per_kv_byte_s=5e-13, transfer_latency_s=1e-3,
                       transfer_bandwidth_bytes_per_s=2e10)
    points = {
        "prefill": [{"num_tokens": n, "context_tokens": c, "time_s": truth.prefill_step_s(n, c)}
                    for n in (128, 1024, 4096) for c in (0, 2048)],
        "decode": [{"batch_size": b, "kv_tokens": k, "time_s": truth.decode_step_s(b, k)}
                   for b in (1, 16, 64) for k in (1000, 50_000)],
        "transfer": [{"bytes": b, "time_s": truth.transfer_latency_s
                      + b / truth.transfer_bandwidth_bytes_per_s} for b in (1e6, 1e8, 1e9)],
    }
    fit = fit_profile(points, base=H100)
    assert fit.source == "calibrated"
    for name in ("prefill_fixed_s", "prefill_per_token_s", "prefill_per_attn_pair_s",
                 "decode_fixed_s", "decode_per_seq_s", "decode_per_kv_byte_s",
                 "transfer_latency_s", "transfer_bandwidth_bytes_per_s"):
        assert getattr(fit, name) == pytest.approx(getattr(truth, name), rel=1e-6, abs=1e-12)


def test_calibrate_keeps_coefficients_non_negative():
    # timings that fall with batch size would need a negative per-sequence term
    pts = {"decode": [{"batch_size": b, "kv_tokens": 0, "time_s": 0.02 - 1e-4 * b}
                      for b in (1, 8, 64)]}
    fit = fit_profile(pts, base=H100)
    assert fit.decode_per_seq_s >= 0 and fit.decode_fixed_s > 0


# ---- traces ----------------------------------------------------------------------------------


def test_load_csv_azure_format_and_prefix_columns(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text(
        "TIMESTAMP,ContextTokens,GeneratedTokens,PrefixGroup,PrefixTokens\n"
        "2023-11-16 18:17:04.0319600,3180,8,,\n"
        "2023-11-16 18:17:03.9799600,4808,10,3,512\n"
        "2023-11-16 18:17:05.9799600,100,0,3,\n"
    )
    reqs = load_csv(path, default_prefix_tokens=64)
    assert [r.prompt_tokens for r in reqs] == [4808, 3180, 100]
    assert reqs[0].arrival_s == 0.0 and reqs[1].arrival_s == pytest.approx(0.052)
    assert (reqs[0].prefix_group, reqs[0].prefix_tokens) == (3, 512)
    assert (reqs[1].prefix_group, reqs[2].prefix_tokens, reqs[2].output_tokens) == (-1, 64, 1)
    write_csv(tmp_path / "u.csv", reqs)
    assert load_csv(tmp_path / "u.csv") == reqs


def test_synthetic_rates_burstiness_and_prefixes():
    reqs = synthetic(50, 200, seed=3)
    assert len(reqs) == pytest.approx(50 * 200, rel=0.05)
    gaps = np.diff([r.arrival_s for r in synthetic(50, 200, seed=3, burstiness=3.0)])
    assert np.std(gaps) / np.mean(gaps) > 2.0
    assert rescale_rate(reqs, 100)[-1].arrival_s == pytest.approx(reqs[-1].arrival_s / 2,
                                                                    rel=0.01)
    shared = with_shared_prefixes(reqs[:100], num_groups=4, prefix_tokens=256)
    pairs = zip(shared, reqs[:100], strict=True)
    assert all(s.prompt_tokens == r.prompt_tokens + 256 for s, r in pairs)
    assert {s.prefix_group for s in shared} <= {0, 1, 2, 3}


# ---- the analytic decode runs match a step-by-step reference ---------------------------------


class FakeHost:
    def __init__(self):
        self.heap, self.finish, self.seq = [], {}, 0

    def schedule(self, t, worker):
        self.seq += 1
        heapq.heappush(self.heap, (t, self.seq, "w", worker.version))

    def first_token(self, r, t):
        pass

    def prefill_done(self, r, t, worker):
        pass

    def finished(self, r, t):
        self.finish[r.idx] = t

    def decode_steps(self, t, d0, d1, m, batch):
        pass


def reference_decode(prof, arrivals, max_seqs):
    """One step at a time: requests join at the first step boundary at or after arrival."""
    pending = sorted(arrivals)  # (arrival, idx, prompt, output)
    batch, finish, t = [], {}, 0.0
    while pending or batch:
        if not batch and not (pending and pending[0][0] <= t):
            t = max(t, pending[0][0])
        while pending and pending[0][0] <= t and len(batch) < max_seqs:
            a, idx, prompt, out = pending.pop(0)
            batch.append([idx, prompt + 1, out - 1])
        t += prof.decode_step_s(len(batch), sum(b[1] for b in batch))
        for b in batch:
            b[1] += 1
            b[2] -= 1
            if b[2] == 0:
                finish[b[0]] = t
        batch = [b for b in batch if b[2] > 0]
    return finish


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_decode_runs_match_step_by_step_reference(seed):
    rng = random.Random(seed)
    prof = H100
    arrivals = [(rng.uniform(0, 2.0), i, rng.randint(10, 3000), rng.randint(2, 200))
                for i in range(25)]
    cfg = SimConfig(decode_max_num_seqs=8)
    host = FakeHost()
    w = SimWorker("d0", "decode", prof, cfg, host, 0.0)
    events = [(a, -1, idx, (p, o)) for a, idx, p, o in arrivals]
    heapq.heapify(events)
    while events or host.heap:
        if host.heap and (not events or host.heap[0][0] < events[0][0]):
            t, _, _, version = heapq.heappop(host.heap)
            w.on_event(t, version)
        else:
            t, _, idx, (p, o) = heapq.heappop(events)
            r = SimRequest(idx, t, p, o, ())
            w.reserve(r)
            w.receive_kv(r, t)
    ref = reference_decode(prof, arrivals, 8)
    assert set(host.finish) == set(ref)
    for idx, t in ref.items():
        assert host.finish[idx] == pytest.approx(t, rel=1e-9, abs=1e-9)
    assert w.reserved == 0 and w.is_idle()


# ---- whole simulations -----------------------------------------------------------------------


def one_request(mode, prompt=1000, output=10, **kw):
    cfg = SimConfig(mode=mode, num_prefill=1, num_decode=1, num_colocated=1, **kw)
    sim = Simulation(cfg, [TraceRequest(0.0, prompt, output)])
    return sim, sim.run()


def test_single_request_timing_by_hand_disaggregated():
    sim, res = one_request("disaggregated")
    p = sim.prof
    ttft = p.prefill_step_s(1000)
    decode = sum(p.decode_step_s(1, 1001 + j) for j in range(9))
    assert sim.rec.first_token[0] == pytest.approx(ttft)
    assert sim.rec.finish[0] == pytest.approx(ttft + p.transfer_s(1000) + decode)
    assert res["finished"] == 1 and res["slo_attainment"] == 1.0


def test_single_request_timing_by_hand_colocated_chunked():
    sim, _ = one_request("colocated", prompt=1200, output=3, colocated_chunk_tokens=512)
    p = sim.prof
    ttft = (p.prefill_step_s(512, 0) + p.prefill_step_s(512, 512) + p.prefill_step_s(176, 1024))
    assert sim.rec.first_token[0] == pytest.approx(ttft)
    decode = p.decode_step_s(1, 1201) + p.decode_step_s(1, 1202)
    assert sim.rec.finish[0] == pytest.approx(ttft + decode)


@pytest.mark.parametrize("mode", ["disaggregated", "colocated"])
def test_every_request_finishes_and_times_are_ordered(mode):
    trace = synthetic(15, 20, seed=1)
    cfg = SimConfig(mode=mode, num_prefill=1, num_decode=2, num_colocated=3)
    sim = Simulation(cfg, trace)
    res = sim.run()
    rec = sim.rec
    assert res["finished"] == len(trace) and res["refused"] == 0
    assert np.all(rec.first_token >= rec.arrival) and np.all(rec.finish >= rec.first_token)
    assert all(0 < u <= 1 for u in res["utilization"].values())
    assert all(w.reserved == 0 and w.is_idle() for w in sim.workers.values())
    assert res["events"] < sum(r.output_tokens for r in trace)  # not one event per token


def test_decode_is_advanced_in_runs_not_steps():
    trace = [TraceRequest(0.001 * i, 64, 2000) for i in range(20)]
    res = simulate(SimConfig(num_prefill=1, num_decode=1), trace)
    assert res["finished"] == 20
    assert res["events"] < 200  # 2000 decode steps in ~tens of events


def test_kv_aware_gets_prefix_hits_and_round_robin_fewer():
    trace = with_shared_prefixes(synthetic(20, 30, seed=2, prompt_median=300), 4, 1024)
    cfg = SimConfig(num_prefill=4, num_decode=2)
    kv = simulate(cfg, trace, policy="kv_aware")
    rr = simulate(cfg, trace, policy="round_robin")
    assert kv["prefix_hit_rate"] > 0.5
    assert kv["prefix_hit_rate"] > rr["prefix_hit_rate"]


def test_conditional_disaggregation_skips_the_transfer():
    sched = SchedulerConfig(local_prefill_threshold_tokens=512)
    sim, _ = one_request("disaggregated", prompt=300, output=5, scheduler=sched)
    p = sim.prof
    ttft = p.prefill_step_s(300)  # prefilled on the decode worker (colocated chunk 512)
    assert sim.rec.first_token[0] == pytest.approx(ttft)
    decode = sum(p.decode_step_s(1, 301 + j) for j in range(4))
    assert sim.rec.finish[0] == pytest.approx(ttft + decode)  # no transfer time


def test_admission_refuses_when_the_queue_overflows():
    sched = SchedulerConfig(admission_queue_size=5, admission_queue_timeout_s=1.0)
    cfg = SimConfig(num_prefill=1, num_decode=1, kv_capacity_tokens=20_000, scheduler=sched)
    trace = [TraceRequest(0.0001 * i, 4000, 500) for i in range(40)]
    res = simulate(cfg, trace)
    assert res["refused"] > 0 and res["finished"] + res["refused"] == 40


class PublicOnly:
    """Forwards only the named public methods: the simulator may use nothing else."""

    def __init__(self, target, names):
        self._target, self._names = target, set(names)

    def __getattr__(self, name):
        if name not in self._names:
            raise AssertionError(f"simulator used non-public {name!r}")
        return getattr(self._target, name)


def test_simulator_uses_only_the_public_scheduler_and_autoscaler_calls():
    auto = AutoscalerConfig(interval_s=5, window_s=20, cooldown_s=10, scale_down_stable_s=10)
    cfg = SimConfig(num_prefill=1, num_decode=1, autoscaler=auto, startup_s=5)
    sim = Simulation(cfg, synthetic(30, 40, seed=4))
    assert isinstance(sim.sched, GlobalScheduler)
    sim.sched = PublicOnly(sim.sched, {"update_stats", "remove_worker", "place", "poll_queue",
                                       "queue_length", "policy"})
    sim.autoscaler = PublicOnly(sim.autoscaler, {"decide"})
    res = sim.run()
    assert res["finished"] == len(sim.trace)


def test_autoscaler_follows_a_load_step():
    low = synthetic(8, 120, seed=5)
    high = [TraceRequest(r.arrival_s + 120, r.prompt_tokens, r.output_tokens)
            for r in synthetic(40, 240, seed=6)]
    auto = AutoscalerConfig(interval_s=5, window_s=30, cooldown_s=20, scale_down_stable_s=60,
                            max_prefill=8, max_decode=8)
    cfg = SimConfig(num_prefill=1, num_decode=1, autoscaler=auto, startup_s=10,
                    slo=SLOConfig(ttft_s=0.5, itl_s=0.05))
    res = simulate(cfg, low + high)
    peak = max(r["prefill"] for r in res["replicas"])
    assert peak >= 2
    assert all(1 <= r["prefill"] <= 8 and 1 <= r["decode"] <= 8 for r in res["replicas"])
    assert any(d["pool"] == "prefill" and d["target"] > d["current"]
               for d in res["autoscaler_decisions"])


def test_sweep_reports_every_split_and_the_best():
    trace = synthetic(10, 15, seed=7)
    out = sweep(SimConfig(), trace, total_gpus=4, chunk_sizes=[512, 2048])
    splits = {(r["mode"], r["prefill"], r["decode"], r["chunk_tokens"]) for r in out["rows"]}
    assert len(splits) == 3 * 2 + 2
    assert out["best"]["goodput_req_s"] == max(r["goodput_req_s"] for r in out["rows"])


# ---- CLI -------------------------------------------------------------------------------------


def test_cli_simulate_writes_json_and_plot(tmp_path, capsys):
    out, png = tmp_path / "r.json", tmp_path / "r.png"
    rc = cli_main(["simulate", "--synthetic", "--rate", "5", "--duration", "10",
                   "--prefill", "1", "--decode", "1", "--output", str(out), "--plot", str(png)])
    assert rc == 0
    result = json.loads(out.read_text())
    assert result["finished"] == result["requests"] > 0
    assert png.stat().st_size > 10_000
    assert "goodput" in capsys.readouterr().out


def test_cli_calibrate_writes_a_profile(tmp_path):
    pts = tmp_path / "pts.json"
    pts.write_text(json.dumps({"format": "splitserve-sim-points/v1", "transfer": [
        {"bytes": 1e6, "time_s": 0.0011}, {"bytes": 1e9, "time_s": 0.101}]}))
    prof = tmp_path / "prof.json"
    assert cli_main(["simulate", "--calibrate", str(pts), "--save-profile", str(prof)]) == 0
    loaded = CostProfile.load(prof)
    assert loaded.transfer_bandwidth_bytes_per_s == pytest.approx(1e10, rel=1e-3)
    assert math.isclose(loaded.transfer_latency_s, 0.001, rel_tol=1e-3)
