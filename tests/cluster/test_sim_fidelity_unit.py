"""Pure parts of the simulator fidelity check (cluster.simulator.cpu_profile): no engine, no
live cluster."""

from __future__ import annotations

import math

import pytest

from cluster.policy_config import SchedulerConfig
from cluster.simulator.config import SimConfig
from cluster.simulator.cpu_profile import (
    LiveSemanticsSimulation,
    fit_cpu_profile,
    fit_error,
    trace_from_requests,
    ttft_samples,
    with_overheads,
    zero_profile,
)
from cluster.simulator.loop import Simulation

KV = 2048  # bytes per token of the hand-made model


def _points(pf=2e-3, pt=3e-4, pa=2e-7, df=8e-3, ds=4e-4, dk=1e-9):
    prefill = [{"num_tokens": n, "context_tokens": c, "time_s": pf + pt * n + pa * n * (c + n / 2)}
               for n, c in ((32, 0), (128, 0), (256, 0), (512, 0), (512, 512))]
    decode = [{"batch_size": b, "kv_tokens": b * c, "time_s": df + ds * b + dk * b * c * KV}
              for b in (1, 4, 16) for c in (64, 512)]
    return {"format": "splitserve-sim-points/v1", "prefill": prefill, "decode": decode}


def test_fit_recovers_hand_made_coefficients():
    prof = fit_cpu_profile(_points(), "cpu", KV, 65536)
    assert prof.source == "calibrated" and prof.kv_bytes_per_token == KV
    assert prof.prefill_fixed_s == pytest.approx(2e-3, rel=1e-6)
    assert prof.prefill_per_token_s == pytest.approx(3e-4, rel=1e-6)
    assert prof.prefill_per_attn_pair_s == pytest.approx(2e-7, rel=1e-6)
    assert prof.decode_fixed_s == pytest.approx(8e-3, rel=1e-6)
    assert prof.decode_per_seq_s == pytest.approx(4e-4, rel=1e-6)
    assert prof.decode_per_kv_byte_s == pytest.approx(1e-9, rel=1e-6)
    errs = fit_error(_points(), prof)
    assert errs["prefill"]["max_rel_err"] < 1e-6 and errs["decode"]["points"] == 6


def test_fit_transfer_and_flat_transfer_fallback():
    pts = _points()
    pts["transfer"] = [{"bytes": b, "time_s": 5e-3 + b / 200e6} for b in (1e5, 5e5, 1e6)]
    prof = fit_cpu_profile(pts, "cpu", KV, 65536)
    assert prof.transfer_latency_s == pytest.approx(5e-3, rel=1e-6)
    assert prof.transfer_bandwidth_bytes_per_s == pytest.approx(200e6, rel=1e-6)
    pts["transfer"] = [{"bytes": b, "time_s": t} for b, t in ((1e5, 0.012), (1e6, 0.010),
                                                               (5e5, 0.011))]
    flat = fit_cpu_profile(pts, "cpu", KV, 65536)
    assert flat.transfer_latency_s == pytest.approx(0.011)
    assert flat.transfer_s(1000) == pytest.approx(0.011, rel=1e-6)


def test_with_overheads_clamps_at_zero():
    prof = fit_cpu_profile(_points(), "cpu", KV, 65536)
    assert with_overheads(prof, 1e-3).decode_fixed_s == pytest.approx(9e-3)
    assert with_overheads(prof, -1.0).decode_fixed_s == 0.0
    assert zero_profile("z", KV, 10).transfer_s(100) < 1e-9


def test_live_semantics_ttft_adds_transfer_and_overhead():
    prof = fit_cpu_profile(_points(), "cpu", KV, 65536).with_(
        transfer_latency_s=0.01, transfer_bandwidth_bytes_per_s=1e18)
    trace = trace_from_requests([(5.0, 256, 8), (0.0, 128, 8)])
    assert [r.arrival_s for r in trace] == [0.0, 5.0]
    cfg = SimConfig(num_prefill=1, num_decode=1, prefill_chunk_tokens=512,
                    decode_max_num_seqs=32, kv_capacity_tokens=65536,
                    scheduler=SchedulerConfig())
    plain = Simulation(cfg, trace, prof)
    plain.run()
    live = LiveSemanticsSimulation(cfg, trace, prof, ttft_overhead_s=0.05)
    live.run()
    base, shifted = ttft_samples(plain), ttft_samples(live)
    # idle cluster: prefill alone, then the transfer (latency only) and the fixed overhead
    assert base[0] == pytest.approx(prof.prefill_step_s(128))
    for a, b in zip(base, shifted, strict=True):
        assert not math.isnan(b)
        assert b == pytest.approx(a + 0.01 + 0.05)
