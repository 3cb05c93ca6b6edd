"""`splitserve bench` features: the concurrency cap, the PNG plot, token-delivery figures
(client gaps vs decode step times) and a foreign OpenAI-compatible endpoint. No Ray."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from app.loadgen import delivery, plot, stats, workload
from app.loadgen.drivers import HttpSender, StreamEvent, measure
from app.loadgen.runner import run_workload
from app.loadgen.stats import RequestResult
from engine.worker_stats import WorkerStats

SLO_DEFAULT = stats.SLO()


class CountingSender:
    """One token every ``gap`` s for ``output_len`` tokens; records the most requests it
    ever had in flight at once."""

    def __init__(self, gap: float = 0.005) -> None:
        self.gap = gap
        self.in_flight = 0
        self.peak = 0

    async def stream(self, spec):
        self.in_flight += 1
        self.peak = max(self.peak, self.in_flight)
        try:
            for left in range(spec.output_len - 1, -1, -1):
                await asyncio.sleep(self.gap)
                yield StreamEvent(1, "length" if left == 0 else None)
        finally:
            self.in_flight -= 1


def _specs(n: int, olen: int = 4) -> list[workload.RequestSpec]:
    return [workload.RequestSpec(i, 0.0, tuple(range(10, 30)), olen) for i in range(n)]


def test_max_concurrency_bounds_requests_in_flight():
    capped = CountingSender()
    out = asyncio.run(run_workload(_specs(12), capped, timeout_s=10, progress=False,
                                   max_concurrency=3))
    assert all(r.ok for r in out.results) and capped.peak == 3
    # a capped request is sent when a slot frees, so its TTFT does not include the wait
    assert max(r.ttft_s for r in out.results) < 0.1
    assert sorted(r.sent_s for r in out.results)[3] >= 4 * capped.gap  # 4th waited a request
    free = CountingSender()
    asyncio.run(run_workload(_specs(12), free, timeout_s=10, progress=False))
    assert free.peak == 12  # without the cap, all at once (rate inf)
    with pytest.raises(ValueError, match="max_concurrency"):
        asyncio.run(run_workload(_specs(1), free, timeout_s=1, progress=False,
                                 max_concurrency=0))


def test_arrival_gaps_keep_bursts_that_itl_spreads():
    stamps = [(1.0, 2), (1.1, 1), (1.4, 3), (1.4, 0)]
    assert stats.arrival_gaps(stamps) == pytest.approx([0.0, 0.1, 0.3, 0.0, 0.0])
    assert stats.latencies(0.0, stamps)[1] == pytest.approx([0.1, 0.1, 0.1, 0.1])


def _result(i, gaps, sent=0.0, ttft=0.05) -> RequestResult:
    return RequestResult(i, 20, len(gaps) + 1, sent, ok=True, ttft_s=ttft,
                         e2e_s=ttft + sum(gaps), itl_s=list(gaps), arrival_gaps_s=list(gaps),
                         output_tokens=len(gaps) + 1, finish_reason="length")


def test_delivery_compares_client_gaps_with_the_step_median():
    steady = [_result(i, [0.010, 0.011, 0.009, 0.010]) for i in range(5)]
    d = delivery.delivery(steady, [0.010, 0.0105, 0.0095])
    assert d["client_itl_p50_ms"] == pytest.approx(10.0)
    assert d["step_p50_ms"] == pytest.approx(10.0)
    assert d["gaps_under_10pct_step"] == 0.0 and d["goal_met"]
    bursty = [_result(i, [0.0002, 0.0198, 0.0001, 0.0199]) for i in range(5)]
    b = delivery.delivery(bursty, [0.010])
    assert b["gaps_under_10pct_step"] == pytest.approx(0.5) and not b["goal_met"]
    assert "MISSED" in delivery.text(b) and "met" in delivery.text(d)
    assert delivery.delivery(steady, []) is None
    json.dumps(d, allow_nan=False)


def _stats(wid: str, role: str, step: float, running: int, ts: float) -> WorkerStats:
    return WorkerStats(wid, role, 0, running, 0, 10, 10, 16, 0.0, 0.0, timestamp=ts,
                       step_time_p50_s=step)


def test_step_probe_samples_decode_workers_once_per_report():
    class Backend:
        last_stats: dict = {}

    backend = Backend()

    async def scenario():
        probe = delivery.StepProbe(backend, interval_s=0.01)
        backend.last_stats = {"p0": _stats("p0", "prefill", 0.5, 1, 1.0),
                              "d0": _stats("d0", "decode", 0.004, 2, 1.0)}
        probe.start()
        await asyncio.sleep(0.05)  # several samples of one report: kept once
        backend.last_stats["d0"] = _stats("d0", "decode", 0.006, 0, 2.0)
        return await probe.stop()

    samples = asyncio.run(scenario())
    assert [(s.worker_id, s.step_s) for s in samples] == [("d0", 0.004), ("d0", 0.006)]
    window = (samples[0].t, samples[-1].t)
    assert delivery.steps_in_window(samples, window) == [0.004]  # idle report left out
    assert delivery.steps_in_window(samples, (0.0, samples[0].t - 1)) == []


def test_plot_writes_a_readable_png(tmp_path):
    from PIL import Image

    out = asyncio.run(run_workload(_specs(8, olen=6), CountingSender(0.003), timeout_s=10,
                                   progress=False, max_concurrency=2))
    other = [_result(i, [0.004] * 5, sent=0.01 * i) for i in range(8)]
    path = plot.write(plot.png_path(str(tmp_path / "plots"), "run"),
                      {"fake A": out.results, "fake B": other}, "test run")
    assert path == tmp_path / "plots" / "serving_run.png" and path.stat().st_size > 20_000
    img = Image.open(path).convert("RGB")
    assert img.size == (plot.SIZE_IN[0] * plot.DPI, plot.SIZE_IN[1] * plot.DPI)
    colors = img.getcolors(maxcolors=1 << 20)
    assert len(colors) > 50  # lines, text, axes: not a blank canvas
    blank = max(count for count, _ in colors) / (img.size[0] * img.size[1])
    assert blank < 0.97
    assert plot.png_path(str(tmp_path / "x.png"), "run") == tmp_path / "x.png"


def test_throughput_series_counts_every_token_once():
    results = [_result(0, [0.1] * 9, sent=0.0, ttft=0.05), _result(1, [0.1] * 9, sent=0.5)]
    xs, ys = plot.throughput_series(results, 0.5)
    assert sum(y * 0.5 for y in ys) == pytest.approx(20)
    assert xs[:3] == [0.0, 0.5, 1.0]


def _foreign_server(request: httpx.Request) -> httpx.Response:
    """An OpenAI-compatible server that is not ours: no /v1/models, no logprobs in the
    stream, no splitserve extension, usage at the end."""
    if request.url.path.endswith("/models"):
        return httpx.Response(404, json={"error": "not found"})
    body = json.loads(request.content)
    assert body["model"] == "their-model" and body["stream"] is True
    events = [{"choices": [{"text": f"t{i}", "finish_reason": None}]}
              for i in range(body["max_tokens"] - 1)]
    events.append({"choices": [{"text": "end", "finish_reason": "length"}]})
    events.append({"choices": [], "usage": {"completion_tokens": body["max_tokens"]}})
    sse = "".join(f"data: {json.dumps(e)}\n\n" for e in events) + "data: [DONE]\n\n"
    return httpx.Response(200, text=sse, headers={"content-type": "text/event-stream"})


def test_http_sender_works_with_a_foreign_openai_endpoint():
    async def scenario():
        sender = HttpSender("http://other:9/v1", model="their-model",
                            transport=httpx.MockTransport(_foreign_server))
        limits = await sender.limits()
        result = await measure(_specs(1, olen=5)[0], sender, 0.0)
        await sender.close()
        return limits, result

    limits, result = asyncio.run(scenario())
    assert limits.model == "their-model" and limits.max_model_len is None
    assert result.ok and result.output_tokens == 5 and result.timing is None

    async def nameless():
        sender = HttpSender("http://other:9/v1", transport=httpx.MockTransport(_foreign_server))
        try:
            await sender.limits()
        finally:
            await sender.close()

    with pytest.raises(Exception, match="--model-name"):
        asyncio.run(nameless())


@pytest.fixture(scope="module")
def quiet_stack(tokenizer):
    """The in-process router (fake backend, gRPC + HTTP) without prompt-keyed faults:
    random prompts could spell "fail" or "hang"."""
    from router.config import RouterConfig
    from tests.router.conftest import MAX_MODEL_LEN, Stack, make_backend

    s = Stack(make_backend(tokenizer, faults=False, step_s=0.002), tokenizer,
              RouterConfig(model_name="fake-model", max_model_len=MAX_MODEL_LEN))
    yield s
    s.close()


@pytest.mark.parametrize("api", ["grpc", "http"])
def test_bench_command_end_to_end(quiet_stack, tmp_path, api):
    from app.cli import build_parser

    target = (["--grpc", quiet_stack.grpc_address] if api == "grpc"
              else ["--http", quiet_stack.base_url + "/v1"])
    argv = ["bench", *target, "--num-requests", "6", "--rate", "inf", "--max-concurrency",
            "2", "--output-len-range", "4", "8", "--prompt-len-range", "8", "32", "--warmup",
            "1", "--no-progress", "--out", str(tmp_path / "run.json"), "--plot",
            str(tmp_path)]
    args = build_parser(argv).parse_args(argv)
    assert args.handler(args) == 0
    data = json.loads((tmp_path / "run.json").read_text())
    assert data["summary"]["completed"] == 6 and data["summary"]["length_mismatch"] == 0
    assert data["workload"]["max_concurrency"] == 2 and data["workload"]["rate"] == "inf"
    assert data["server_model"] == "fake-model"
    assert (tmp_path / "serving_server.png").stat().st_size > 20_000


def test_the_load_generator_runs_in_a_process_of_its_own(quiet_stack):
    """--launch measures from a child process; its window is on this process's clock."""
    import functools
    import time

    from app.cli import build_parser
    from app.loadgen import apart, cli

    argv = ["bench", "--grpc", quiet_stack.grpc_address, "--num-requests", "4", "--rate",
            "inf", "--output-len-range", "4", "8", "--prompt-len-range", "8", "32",
            "--warmup", "0", "--no-progress"]
    args = build_parser(argv).parse_args(argv)
    bench = apart.bench_apart(functools.partial(cli.measure_apart, args, SLO_DEFAULT, "grpc"))
    before = time.perf_counter()
    specs, record = asyncio.run(bench(apart.Endpoint(quiet_stack.grpc_address)))
    after = time.perf_counter()
    assert len(specs) == 4 and record["summary"]["completed"] == 4
    start, end = record[cli.WINDOW]
    assert before < start < end < after
    assert record[cli.RAW].results[0].ok
