"""The flags and the main function shared by ``splitserve bench`` and ``benchmarks/serving.py``.

Targets (exactly one):
  --grpc HOST:PORT | --http URL     a running server (``splitserve serve``)
  --launch                          start one configuration in-process, then measure it
  --compare                         the same workload against PxD disaggregated and against
                                    colocated clusters of --compare-colocated workers, in turn

Prints a table per configuration (and a side-by-side table with ratios for --compare) and
writes one JSON file (--out, default results/serving_<label>.json); --plot adds a PNG
(``plot``). For launched configurations each table ends with the token-delivery line: the
client's inter-token gaps against the decode workers' median step time (``delivery``).
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import math
import os
import re
import sys
import time

from app.loadgen import apart, delivery, launch, report, stats, workload
from app.loadgen.runner import run_workload, warmup

RAW = "_outcome"  # record key of the raw RunOutcome, dropped before the JSON is written
WINDOW = "_window"  # record key of the measured run's (start, end), time.perf_counter()


def add_arguments(p: argparse.ArgumentParser) -> None:
    target = p.add_argument_group("target (choose one)").add_mutually_exclusive_group(
        required=True)
    target.add_argument("--grpc", metavar="HOST:PORT", help="a running server's gRPC address")
    target.add_argument("--http", metavar="URL", help="a running server's OpenAI base URL "
                        "(…/v1)")
    target.add_argument("--launch", action="store_true", help="start a cluster in-process "
                        "(the cluster flags below) and measure it")
    target.add_argument("--compare", action="store_true", help="same workload against "
                        "--prefill/--decode disaggregated and --compare-colocated clusters")
    _add_workload_arguments(p)
    _add_cluster_arguments(p)
    g = p.add_argument_group("output and limits")
    g.add_argument("--label", help="name of this run (default: the configuration)")
    g.add_argument("--out", help="JSON file (default: results/serving_<label>.json)")
    g.add_argument("--timeout", type=float, default=600.0,
                   help="seconds the measured run may take; then it stops (default %(default)s)")
    g.add_argument("--request-timeout", type=float, default=None,
                   help="per-request deadline, seconds (default: none beyond --timeout)")
    g.add_argument("--model-name", default="", help="model name to request (default: the "
                   "server's)")
    g.add_argument("--api-key", default=None, help="API key, when the server wants one")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    g.add_argument("--plot", metavar="DIR_OR_FILE", help="also draw TTFT/ITL/E2E CDFs and "
                   "throughput over time as a PNG (a directory: <dir>/serving_<label>.png; "
                   "needs matplotlib)")


def _add_workload_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("workload")
    g.add_argument("--num-requests", type=int, default=40)
    g.add_argument("--rate", type=float, default=None, help="mean request rate, req/s "
                   "(Poisson arrivals; 'inf' sends all at once; default 2; with --trace: "
                   "rescale the trace's arrivals to this mean rate)")
    g.add_argument("--max-concurrency", type=int, default=None, metavar="N",
                   help="at most N requests in flight: a due request waits for a free slot "
                   "(with --rate inf: a closed loop of N users; default: no cap)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--prompt-len-range", type=int, nargs=2, default=(64, 512),
                   metavar=("A", "B"), help="uniform prompt lengths, tokens (inclusive)")
    g.add_argument("--output-len-range", type=int, nargs=2, default=(16, 64),
                   metavar=("A", "B"), help="uniform output lengths, tokens (inclusive)")
    g.add_argument("--trace", metavar="CSV", help="replay a trace's arrivals and lengths "
                   "(TIMESTAMP,ContextTokens,GeneratedTokens) instead")
    g.add_argument("--length-scale", type=float, default=1.0, help="trace prompt lengths x")
    g.add_argument("--output-scale", type=float, default=1.0, help="trace output lengths x")
    g.add_argument("--time-scale", type=float, default=1.0, help="trace arrival times x "
                   "(> 1 slower), unless --rate is given")
    g.add_argument("--trace-offset", type=int, default=0, help="trace rows to skip")
    g.add_argument("--vocab-size", type=int, default=None, help="prompt ids are drawn below "
                   "this (default: the server's vocabulary, else 1000)")
    g.add_argument("--warmup", type=int, default=2, help="unmeasured requests sent first, "
                   "one at a time (default %(default)s)")
    g.add_argument("--slo-ttft-ms", type=float, default=500.0)
    g.add_argument("--slo-itl-ms", type=float, default=50.0)
    g.add_argument("--slo-itl-stat", choices=stats.ITL_STATS, default="tpot",
                   help="per-request number held to --slo-itl-ms (default: tpot, the mean gap)")


def _add_cluster_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("cluster (--launch, --compare)")
    g.add_argument("--model", help="checkpoint directory (default: a generated --arch/--preset)")
    g.add_argument("--arch", default="llama", help="generated model's architecture")
    g.add_argument("--preset", default="small", help="generated model's size preset")
    g.add_argument("--config", help="pool config YAML (default: small CPU engines)")
    g.add_argument("--prefill", type=int, default=1, help="prefill workers")
    g.add_argument("--decode", type=int, default=1, help="decode workers")
    g.add_argument("--colocated", action="store_true",
                   help="--launch: colocated workers (--decode of them), no prefill pool")
    g.add_argument("--compare-colocated", type=int, nargs="+", default=[1], metavar="N",
                   help="--compare: colocated cluster sizes to run (default: 1)")
    g.add_argument("--kv-backend", choices=["torch_dist", "ray"], default=None)
    g.add_argument("--num-threads", type=int, default=1,
                   help="torch threads per worker without --config (default %(default)s)")
    g.add_argument("--api", choices=["grpc", "http"], default="grpc",
                   help="which endpoint of the launched server to drive")
    g.add_argument("--same-process", action="store_true",
                   help="run the load generator on the launched server's event loop (by "
                        "default it runs in a process of its own, as a client would)")
    g.add_argument("--rounds", type=int, default=1,
                   help="run every configuration this many times, in alternating order "
                        "(A B, B A, ...); results are pooled per configuration")


def run(args: argparse.Namespace) -> int:
    """Entry point of both commands; returns the exit status."""
    try:
        slo = stats.SLO(args.slo_ttft_ms / 1e3, args.slo_itl_ms / 1e3, args.slo_itl_stat)
        if args.max_concurrency is not None and args.max_concurrency < 1:
            raise ValueError("--max-concurrency must be at least 1")
        if args.plot:
            from app.loadgen import plot

            plot.require_matplotlib()
        if args.launch or args.compare:
            return asyncio.run(_run_launched(args, slo))
        return asyncio.run(_run_external(args, slo))
    except ValueError as exc:
        print(f"splitserve bench: {exc}", file=sys.stderr)
        return 2


# ---- one measurement against a running server --------------------------------------------

def make_workload(args: argparse.Namespace, limits, seed: int, n: int) -> list:
    vocab = args.vocab_size or limits.vocab_size or 1000
    lim = workload.LengthLimits(vocab, limits.max_model_len)
    if args.trace:
        scaling = workload.TraceScaling(args.length_scale, args.output_scale, args.time_scale,
                                        args.rate, args.trace_offset)
        return workload.from_trace(args.trace, n, scaling, lim, seed)
    rate = 2.0 if args.rate is None else args.rate
    return workload.synthetic(n, rate, tuple(args.prompt_len_range),
                              tuple(args.output_len_range), lim, seed)


def bench_fn(args: argparse.Namespace, slo: stats.SLO):
    """bench(sender, specs or None) -> (specs, record): warm up, measure, summarise."""
    async def bench(sender, specs=None):
        limits = await sender.limits()
        if specs is None:
            specs = make_workload(args, limits, args.seed, args.num_requests)
        warm = await warmup(sender, make_workload(args, limits, args.seed + 1, args.warmup)
                            if args.warmup > 0 else [])
        bad = [r.error for r in warm if not r.ok]
        if bad:
            print(f"warning: {len(bad)} warm-up request(s) failed: {bad[0]}", file=sys.stderr)
        load_before = os.getloadavg()[0]
        t0 = time.perf_counter()
        outcome = await run_workload(specs, sender, timeout_s=args.timeout,
                                     progress=not args.no_progress,
                                     max_concurrency=args.max_concurrency)
        record = {"summary": stats.summarize(outcome.results, slo, outcome.duration_s),
                  "timed_out": outcome.timed_out, "wall_s": outcome.wall_s,
                  "loadavg_1m": {"before": load_before, "after": os.getloadavg()[0],
                                 "cpus": os.cpu_count()},
                  "warmup_failed": len(bad), "server_model": limits.model,
                  "requests": report.request_records(outcome.results),
                  RAW: outcome, WINDOW: (t0, time.perf_counter())}
        return specs, record
    return bench


def measure_apart(args: argparse.Namespace, slo: stats.SLO, api: str, endpoint: str,
                  specs=None) -> tuple[list, dict]:
    """One measurement against ``endpoint`` (``bench_fn``), run in a child process by
    ``apart.bench_apart``."""
    async def main():
        sender = sender_factory(args, api)(endpoint)
        try:
            return await bench_fn(args, slo)(sender, specs)
        finally:
            await sender.close()
    return asyncio.run(main())


def sender_factory(args: argparse.Namespace, api: str):
    from app.loadgen.drivers import GrpcSender, HttpSender

    cls = GrpcSender if api == "grpc" else HttpSender
    return lambda endpoint: cls(endpoint, model=args.model_name,
                                timeout_s=args.request_timeout, api_key=args.api_key)


def _label(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "run"


def _workload_info(args: argparse.Namespace, specs) -> dict:
    info = workload.describe(specs)
    info.update(seed=args.seed, warmup=args.warmup, max_concurrency=args.max_concurrency)
    if args.trace:
        from cluster.simulator.trace import AZURE_ATTRIBUTION

        info.update(trace=args.trace, length_scale=args.length_scale,
                    output_scale=args.output_scale, time_scale=args.time_scale,
                    trace_offset=args.trace_offset,
                    rate="inf" if args.rate and math.isinf(args.rate) else args.rate,
                    attribution=AZURE_ATTRIBUTION if "azure" in args.trace.lower() else None)
    else:
        rate = 2.0 if args.rate is None else args.rate
        info.update(rate="inf" if math.isinf(rate) else rate,  # JSON has no infinity
                    prompt_len_range=list(args.prompt_len_range),
                    output_len_range=list(args.output_len_range))
    return info


def _finish(args, label: str, payload: dict, text: str, results: dict | None = None) -> None:
    """Print, write the JSON and (--plot) the PNG of ``results`` ({side label: results})."""
    trace = payload["workload"].get("trace")
    if trace:
        source = payload["workload"].get("attribution") or "see the trace's own license"
        text += f"\nworkload: lengths and arrivals from {trace}; {source}"
    print(text, flush=True)
    out = report.write_json(args.out or f"results/serving_{_label(label)}.json",
                            {"label": label, **payload, "environment": report.environment()})
    print(f"wrote {out}", flush=True)
    if args.plot and results:
        from app.loadgen import plot

        png = plot.write(plot.png_path(args.plot, _label(label)), results, label)
        print(f"wrote {png}", flush=True)


async def _run_external(args: argparse.Namespace, slo: stats.SLO) -> int:
    from app.loadgen.drivers import RequestFailed
    from engine.errors import SplitServeError

    api, endpoint = ("grpc", args.grpc) if args.grpc else ("http", args.http)
    sender = sender_factory(args, api)(endpoint)
    try:
        specs, record = await bench_fn(args, slo)(sender)
    except (SplitServeError, RequestFailed) as exc:
        print(f"splitserve bench: cannot benchmark {endpoint}: {exc} (is `splitserve serve` "
              "running there?)", file=sys.stderr)
        return 2
    finally:
        await sender.close()
    label = args.label or "server"
    outcome = record.pop(RAW)
    record.pop(WINDOW)
    record["target"] = {"api": api, "endpoint": endpoint}
    _finish(args, label, {"workload": _workload_info(args, specs), **record},
            report.table(record["summary"], label), {label: outcome.results})
    return 0 if record["summary"]["completed"] else 1


# ---- launched configurations --------------------------------------------------------------

def _sides(args: argparse.Namespace) -> list[launch.Side]:
    if args.launch:
        return [launch.colocated(args.decode) if args.colocated
                else launch.disaggregated(args.prefill, args.decode)]
    return [launch.disaggregated(args.prefill, args.decode),
            *(launch.colocated(n) for n in args.compare_colocated)]


def _configs(args: argparse.Namespace, sides, model: str) -> list:
    from cluster.config import ClusterConfig

    base = (ClusterConfig.from_yaml(args.config) if args.config
            else launch.default_config(args.num_threads))
    return [launch.side_config(base, side, model, args.kv_backend) for side in sides]


def _pool(records: list[dict], slo: stats.SLO) -> tuple[dict, list]:
    """(One side's record, its results): its only round's, or the rounds' requests pooled
    together. Each record gets its token delivery figures (``delivery``)."""
    outcomes = [r.pop(RAW) for r in records]
    steps = [delivery.steps_in_window(r.pop(launch.STEP_SAMPLES, []), r.pop(WINDOW))
             for r in records]
    for rec, outcome, st in zip(records, outcomes, steps, strict=True):
        rec["delivery"] = delivery.delivery(outcome.results, st)
    if len(records) == 1:
        return records[0], outcomes[0].results
    results = [res for o in outcomes for res in o.results]
    summary = stats.summarize(results, slo, sum(o.duration_s for o in outcomes))
    pooled = delivery.delivery(results, [x for st in steps for x in st])
    return {"summary": summary, "delivery": pooled, "rounds": records}, results


async def _run_launched(args: argparse.Namespace, slo: stats.SLO) -> int:
    from engine.make_model import ensure_model

    if args.rounds < 1:
        raise ValueError("--rounds must be at least 1")
    model = args.model or str(ensure_model(args.arch, args.preset, seed=0, progress=True))
    sides = _sides(args)
    if args.same_process:
        make_sender, bench = sender_factory(args, args.api), bench_fn(args, slo)
    else:
        make_sender = apart.Endpoint
        bench = apart.bench_apart(functools.partial(measure_apart, args, slo, args.api))
    specs, per_side = await launch.compare(sides, _configs(args, sides, model), args.api,
                                           make_sender, bench, rounds=args.rounds)
    records, results = zip(*(_pool(recs, slo) for recs in per_side), strict=True)
    summaries = [r["summary"] for r in records]
    pooled = f" ({args.rounds} rounds pooled)" if args.rounds > 1 else ""
    text = "\n\n".join(report.table(rec["summary"], side.label + pooled) + "\n"
                        + delivery.text(rec["delivery"])
                        for rec, side in zip(records, sides, strict=True))
    if args.rounds > 1:
        text += "\n\n== per round ==\n" + report.rounds_table(
            [side.label for side in sides], [rec["rounds"] for rec in records])
    payload = {"workload": _workload_info(args, specs), "model": model, "rounds": args.rounds,
               "sides": {side.label: rec for side, rec in zip(sides, records, strict=True)}}
    if len(sides) > 1:
        labels = [s.label for s in sides]
        table, data = report.comparison(labels, summaries)
        text += "\n\n== side by side (ratios: first / other; < 1 means lower) ==\n" + table
        payload["comparison"] = data
    label = args.label or ("compare" if args.compare else sides[0].label)
    _finish(args, label, payload, text,
            {side.label: res for side, res in zip(sides, results, strict=True)})
    return 0 if all(s["completed"] for s in summaries) else 1
