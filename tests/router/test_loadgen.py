"""The load generator's pure parts: arrivals, lengths, trace replay, latency bookkeeping,
percentiles, goodput, the open-loop runner against a fake sender. No server."""

from __future__ import annotations

import asyncio
import json
import random

import numpy as np
import pytest

from app.loadgen import report, stats, workload
from app.loadgen.drivers import RequestFailed, StreamEvent, _sse_event, measure
from app.loadgen.runner import NOT_SENT_ERROR, TIMEOUT_ERROR, run_workload
from app.loadgen.stats import SLO, RequestResult
from engine.errors import ResourceExhaustedError

LIMITS = workload.LengthLimits(vocab_size=500, max_model_len=None)


# ---- arrivals and lengths -----------------------------------------------------------------

def test_poisson_arrivals_have_the_right_mean_and_exponential_gaps():
    times = workload.poisson_arrivals(20001, 4.0, random.Random(1))
    gaps = np.diff(times)
    assert times[0] == 0.0 and np.all(gaps >= 0)
    assert gaps.mean() == pytest.approx(0.25, rel=0.03)
    assert gaps.std() == pytest.approx(0.25, rel=0.05)  # exponential: std == mean
    # Poisson counts per unit time: mean == variance == rate
    counts = np.bincount(np.floor(times).astype(int))[:-1]
    assert counts.mean() == pytest.approx(4.0, rel=0.03)
    assert counts.var() == pytest.approx(4.0, rel=0.1)


def test_poisson_arrivals_edge_cases():
    assert workload.poisson_arrivals(0, 1.0, random.Random(0)) == []
    assert workload.poisson_arrivals(3, float("inf"), random.Random(0)) == [0.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="rate"):
        workload.poisson_arrivals(3, 0.0, random.Random(0))


def test_synthetic_workload_is_seeded_and_respects_ranges():
    a = workload.synthetic(100, 2.0, (64, 512), (16, 64), LIMITS, seed=7)
    b = workload.synthetic(100, 2.0, (64, 512), (16, 64), LIMITS, seed=7)
    c = workload.synthetic(100, 2.0, (64, 512), (16, 64), LIMITS, seed=8)
    assert a == b and a != c
    assert all(64 <= s.prompt_len <= 512 and 16 <= s.output_len <= 64 for s in a)
    assert all(workload.FIRST_TOKEN_ID <= t < 500 for s in a for t in s.prompt_token_ids)
    assert [s.index for s in a] == list(range(100))
    assert len({s.prompt_token_ids[:8] for s in a}) == 100  # no accidental shared prefixes
    with pytest.raises(ValueError, match="prompt length range"):
        workload.synthetic(2, 1.0, (0, 5), (1, 2), LIMITS)


def test_lengths_are_cut_to_the_model_length():
    assert workload.fit_lengths(900, 100, workload.LengthLimits(500, 512)) == (412, 100)
    assert workload.fit_lengths(0, 0, workload.LengthLimits(500, 512)) == (1, 1)
    with pytest.raises(ValueError, match="max_model_len"):
        workload.fit_lengths(10, 600, workload.LengthLimits(500, 512))


# ---- trace replay -------------------------------------------------------------------------

TRACE = """TIMESTAMP,ContextTokens,GeneratedTokens
2023-11-16 18:17:03.9799600,4808,10
2023-11-16 18:17:04.4799600,3180,8
2023-11-16 18:17:05.9799600,110,27
2023-11-16 18:17:07.9799600,7433,14
"""


@pytest.fixture
def trace_csv(tmp_path):
    path = tmp_path / "trace.csv"
    path.write_text(TRACE)
    return str(path)


def test_trace_replay_scales_lengths_and_time(trace_csv):
    scaling = workload.TraceScaling(length_scale=0.125, output_scale=2.0, time_scale=2.0)
    specs = workload.from_trace(trace_csv, 4, scaling, LIMITS)
    assert [s.arrival_s for s in specs] == pytest.approx([0.0, 1.0, 4.0, 8.0])
    assert [s.prompt_len for s in specs] == [601, 398, 14, 929]  # round(x * 0.125)
    assert [s.output_len for s in specs] == [20, 16, 54, 28]


def test_trace_replay_rescales_to_a_rate_and_skips_rows(trace_csv):
    specs = workload.from_trace(trace_csv, 3, workload.TraceScaling(rate=4.0, offset=1),
                                workload.LengthLimits(500, 1000))
    assert [s.arrival_s for s in specs] == pytest.approx([0.0, 1.5 / 7, 0.5])
    assert workload.describe(specs)["offered_rate_req_s"] == pytest.approx(4.0)
    assert specs[0].prompt_len == 1000 - 8  # 3180 cut to max_model_len - output
    with pytest.raises(ValueError, match="cannot take 5"):
        workload.from_trace(trace_csv, 5, workload.TraceScaling(), LIMITS)


# ---- latencies, percentiles, goodput ------------------------------------------------------

def test_latencies_spread_coalesced_chunks_over_their_tokens():
    ttft, gaps = stats.latencies(10.0, [(10.1, 1), (10.2, 1), (10.2, 0), (10.5, 3), (10.6, 1)])
    assert ttft == pytest.approx(0.1)
    assert gaps == pytest.approx([0.1, 0.1, 0.1, 0.1, 0.1])
    assert stats.latencies(0.0, [(1.0, 0)]) == (None, [])


def test_percentile_matches_numpy_linear():
    assert stats.percentile([4, 1, 3, 2], 50) == 2.5
    assert stats.percentile([1, 2, 3, 4], 90) == pytest.approx(3.7)
    assert stats.percentile([5.0], 99) == 5.0
    assert stats.percentile([], 50) is None
    xs = np.random.default_rng(0).exponential(size=101).tolist()
    for q in (0, 50, 90, 99, 100):
        assert stats.percentile(xs, q) == pytest.approx(np.percentile(xs, q))


def _result(i, ttft, gaps, ok=True, error=None, timing=None, sent=0.0) -> RequestResult:
    e2e = None if ttft is None else ttft + sum(gaps)
    return RequestResult(i, 100, len(gaps) + 1, sent, ok=ok, error=error, ttft_s=ttft,
                         e2e_s=e2e, itl_s=list(gaps), output_tokens=len(gaps) + 1 if ok else 0,
                         finish_reason="length" if ok else None, timing=timing)


def test_summary_goodput_and_percentiles_on_hand_made_requests():
    results = [
        _result(0, 0.1, [0.02] * 4, timing={"prefill_compute": 0.04, "decode": 0.08}),
        _result(1, 0.2, [0.03] * 4, timing={"prefill_compute": 0.06, "decode": 0.12}),
        _result(2, 0.9, [0.02] * 4),  # TTFT misses the 500 ms SLO
        _result(3, 0.1, [0.08] * 4),  # TPOT misses the 50 ms SLO
        _result(4, None, [], ok=False, error="RESOURCE_EXHAUSTED: full"),
    ]
    s = stats.summarize(results, SLO(0.5, 0.05), duration_s=10.0)
    assert (s["completed"], s["failed"]) == (4, 1)
    assert s["errors"] == {"RESOURCE_EXHAUSTED: full": 1}
    assert s["goodput"] == pytest.approx(0.2)  # 2 good requests / 10 s
    assert s["request_throughput"] == pytest.approx(0.4)
    assert s["output_throughput"] == pytest.approx(2.0)  # 4 x 5 tokens / 10 s
    assert s["input_throughput"] == pytest.approx(40.0)
    assert s["slo_attainment"] == pytest.approx(0.4)
    assert s["ttft_ms"]["p50"] == pytest.approx(150.0)
    assert s["ttft_ms"]["count"] == 4 and s["itl_ms"]["count"] == 16
    assert s["itl_ms"]["p50"] == pytest.approx(25.0)
    assert s["tpot_ms"]["mean"] == pytest.approx(37.5)
    assert s["server_timing_ms"] == pytest.approx({"prefill_compute": 50.0, "decode": 100.0})
    json.dumps(s, allow_nan=False)


def test_a_migration_count_is_no_phase_in_milliseconds():
    results = [_result(0, 0.1, [0.02], timing={"kv_transfer": 0.002}),
               _result(1, 0.1, [0.02], timing={"kv_transfer": 0.004, "migrations": 1.0,
                                                "migration": 2.5})]
    assert stats.server_timing_ms(results) == pytest.approx(
        {"kv_transfer": 3.0, "migration": 2500.0})  # migration: over the migrated one
    rows = report.request_records(results)
    assert [row["migrations"] for row in rows] == [0, 1]
    assert rows[1]["server_timing_ms"] == {"kv_transfer": 4.0, "migration": 2500.0}


def test_itl_slo_statistic_choice():
    spiky = _result(0, 0.1, [0.01] * 9 + [0.2])  # mean gap 29 ms, one 200 ms stall
    assert stats.meets_slo(spiky, SLO(0.5, 0.05, "tpot"))
    assert not stats.meets_slo(spiky, SLO(0.5, 0.05, "max"))
    assert stats.meets_slo(_result(1, 0.1, []), SLO(0.5, 0.05, "p99"))  # one token: no gaps
    with pytest.raises(ValueError, match="itl_stat"):
        SLO(itl_stat="median")


def test_duration_runs_from_first_send_to_last_completion():
    results = [_result(0, 0.1, [0.1], sent=1.0), _result(1, 0.5, [0.5], sent=2.0),
               _result(2, None, [], ok=False, sent=5.0)]
    assert stats.duration(results) == pytest.approx(2.0)  # 1.0 -> 2.0 + 1.0


def test_comparison_ratios():
    a = stats.summarize([_result(0, 0.1, [0.02] * 3)], SLO(), 1.0)
    b = stats.summarize([_result(0, 0.2, [0.04] * 3)], SLO(), 1.0)
    text, data = report.comparison(["1P+1D", "colo x1"], [a, b])
    assert data["TTFT p50 ms"]["ratios"]["1P+1D/colo x1"] == pytest.approx(0.5)
    assert "TTFT p99 ms" in text and "goodput req/s" in text
    assert "TTFT" in report.table(a, "x")


# ---- drivers and runner with a fake sender ------------------------------------------------

class FakeSender:
    """Streams ``output_len`` tokens in chunks of two, ``gap`` seconds apart; prompts of
    length 13 are refused."""

    def __init__(self, gap: float) -> None:
        self.gap = gap

    async def stream(self, spec):
        if spec.prompt_len == 13:
            raise ResourceExhaustedError("every pool is full")
        left = spec.output_len
        while left > 0:
            await asyncio.sleep(self.gap)
            n = min(2, left)
            left -= n
            yield StreamEvent(n, "length" if left == 0 else None,
                              {"decode": 0.01} if left == 0 else None)


def _spec(i, arrival, plen=20, olen=6):
    return workload.RequestSpec(i, arrival, tuple(range(10, 10 + plen)), olen)


def test_measure_records_tokens_and_failures():
    r = asyncio.run(measure(_spec(0, 0.0), FakeSender(0.01), start=0.0))
    assert r.ok and r.output_tokens == 6 and r.finish_reason == "length"
    assert len(r.itl_s) == 4 and r.ttft_s >= 0.01 and r.timing == {"decode": 0.01}
    bad = asyncio.run(measure(_spec(1, 0.0, plen=13), FakeSender(0.01), start=0.0))
    assert not bad.ok and bad.error.startswith("RESOURCE_EXHAUSTED")


def test_runner_is_open_loop_and_stops_at_the_time_limit():
    specs = [_spec(0, 0.0), _spec(1, 0.05, olen=2), _spec(2, 0.1, olen=200), _spec(3, 5.0)]
    out = asyncio.run(run_workload(specs, FakeSender(0.01), timeout_s=0.4, progress=False))
    assert [r.ok for r in out.results] == [True, True, False, False]
    assert out.results[1].sent_s == pytest.approx(0.05, abs=0.03)  # sent on time
    assert out.results[2].error == TIMEOUT_ERROR and out.results[3].error == NOT_SENT_ERROR
    assert out.timed_out and out.wall_s < 1.0


def test_sse_lines():
    line = ('data: {"choices": [{"text": "ab", "finish_reason": "length", "logprobs": '
            '{"tokens": ["a", "b"]}}], "splitserve": {"timing": {"decode": 0.5}}}')
    assert _sse_event(line) == StreamEvent(2, "length", {"decode": 0.5}, None)
    assert _sse_event('data: {"choices": [], "usage": {"completion_tokens": 7}}') == \
        StreamEvent(0, completion_tokens=7)
    assert _sse_event("data: [DONE]") is None and _sse_event("") is None
    with pytest.raises(RequestFailed, match="boom"):
        _sse_event('data: {"error": {"message": "boom", "type": "x"}}')


def test_bench_command_is_registered():
    from app.cli import build_parser

    args = build_parser(["bench"]).parse_args(["bench", "--grpc", "127.0.0.1:1", "--rate",
                                                "3"])
    assert args.grpc == "127.0.0.1:1" and args.rate == 3.0 and callable(args.handler)


def test_compare_rounds_alternate_their_order():
    from app.loadgen.launch import run_order

    assert run_order(2, 1) == [(0, 0), (0, 1)]
    assert run_order(2, 3) == [(0, 0), (0, 1), (1, 1), (1, 0), (2, 0), (2, 1)]
    assert run_order(3, 2) == [(0, 0), (0, 1), (0, 2), (1, 2), (1, 1), (1, 0)]
