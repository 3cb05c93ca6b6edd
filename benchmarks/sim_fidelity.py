"""Simulator fidelity: predicted vs measured median TTFT and ITL on the local 1P+1D cluster.

    python benchmarks/sim_fidelity.py                     # 40 requests, 2 req/s, seed 0
    python benchmarks/sim_fidelity.py --num-requests 40 --rate 1.5 --tolerance 0.25

In one run:

1. Offline CPU profile: ``Engine.step`` timed in this process with the live workers' engine
   options (``launch.default_config``: block 16, 512-token steps, 32 sequences, 2048-token
   context, ``--num-threads`` torch threads, 1 by default: on a 2-core box the router, the
   prefill and the decode process share the cores, so each engine gets about one), fitted
   with ``calibrate.fit_profile`` (prefill and decode sections).
2. Live: a fresh in-process 1P+1D cluster (pools pinned at 1 replica, autoscaler off, so the
   cluster keeps the shape the simulation has). On it, first a *calibration* phase on the
   idle cluster: ``--calib-requests`` requests sent one at a time (their own seed, not the
   measured workload), from whose server timing breakdown come the terms no offline engine
   measurement gives: the KV transfer (``kv_transfer`` vs bytes -> transfer section), a fixed
   per-request TTFT overhead (client TTFT minus modelled prefill + transfer: router placement,
   the reserve / prefill / start RPCs, gRPC) and a per-decode-step overhead (the decode
   worker's loop beyond ``Engine.step``: client-seen ITL minus the modelled step). Then the
   measured workload: Poisson arrivals, uniform lengths, fixed seed (app/loadgen).
3. The SAME requests (arrival times and lengths taken from the specs the load generator
   sent) replayed by the simulator on 1P+1D with the calibrated profile and the cluster's
   scheduler config, twice: with the offline profile only ("offline"), and with the live
   overhead terms and the live TTFT semantics ("full": the first token reaches the client
   after the KV push, see ``cluster.simulator.cpu_profile``).
4. Predicted vs measured medians (and p90) with relative errors; pass/fail of the full model
   against ``--tolerance`` on the medians; JSON to ``results/sim_fidelity.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from pathlib import Path

# Python puts this folder first on sys.path, where benchmarks/kv_transfer.py would shadow the
# kv_transfer package that the cluster imports: look modules up from the repository root.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [str(_HERE.parent)] + [p for p in sys.path if Path(p or ".").resolve() != _HERE]

import numpy as np  # noqa: E402

ENGINE_KEYS = ("block_size", "max_num_batched_tokens", "max_num_seqs", "max_model_len",
               "num_threads")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--num-requests", type=int, default=40)
    p.add_argument("--rate", type=float, default=2.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--prompt-len-range", type=int, nargs=2, default=(64, 512))
    p.add_argument("--output-len-range", type=int, nargs=2, default=(16, 64))
    p.add_argument("--num-threads", type=int, default=1)
    p.add_argument("--calib-requests", type=int, default=8,
                   help="idle-cluster calibration requests, sent one at a time")
    p.add_argument("--reps", type=int, default=5, help="repetitions per offline point")
    p.add_argument("--idle-prefill", action="store_true",
                   help="time the prefill points on an idle CPU (default: next to a busy "
                        "decode process, as the live prefill worker runs)")
    p.add_argument("--tolerance", type=float, default=0.25)
    p.add_argument("--timeout", type=float, default=150.0, help="live run time limit, s")
    p.add_argument("--out", default="results/sim_fidelity.json")
    return p.parse_args(argv)


# ---- 2. live ---------------------------------------------------------------------------------

async def run_live(args, config, model: str) -> dict:
    from app.loadgen import launch, stats, workload
    from app.loadgen.drivers import GrpcSender
    from app.loadgen.runner import run_workload, warmup

    side = launch.disaggregated(1, 1)

    async def bench(sender, _specs=None):
        limits = await sender.limits()
        lim = workload.LengthLimits(limits.vocab_size, limits.max_model_len)
        specs = workload.synthetic(args.num_requests, args.rate, tuple(args.prompt_len_range),
                                   tuple(args.output_len_range), lim, args.seed)
        await warmup(sender, workload.synthetic(2, 1.0, (64, 128), (4, 8), lim, args.seed + 1))
        calib_specs = workload.synthetic(args.calib_requests, 1.0,
                                         tuple(args.prompt_len_range), (12, 16), lim,
                                         args.seed + 1000)
        calib = await warmup(sender, calib_specs)
        load_before = os.getloadavg()[0]
        outcome = await run_workload(specs, sender, timeout_s=args.timeout, progress=False)
        return specs, {"specs": specs, "calib": calib, "outcome": outcome,
                       "summary": stats.summarize(outcome.results, stats.SLO(),
                                                  outcome.duration_s),
                       "loadavg_1m": [load_before, os.getloadavg()[0]]}

    _, record = await launch.bench_launched(side, config, "grpc",
                                            lambda ep: GrpcSender(ep), bench)
    return record


# ---- 3. simulation ---------------------------------------------------------------------------

def live_terms(calib, prof) -> dict:
    """Transfer points and the two overheads from the idle-cluster calibration requests."""
    ok = [r for r in calib if r.ok and r.timing and r.ttft_s is not None]
    if not ok:
        raise RuntimeError("no calibration request succeeded")
    transfer = [{"bytes": r.prompt_len * prof.kv_bytes_per_token,
                 "time_s": r.timing["kv_transfer"]} for r in ok if "kv_transfer" in r.timing]
    return {"transfer": transfer, "requests": ok}


def overheads(ok, prof) -> dict:
    ttft_over = [r.ttft_s - prof.prefill_step_s(r.prompt_len) - prof.transfer_s(r.prompt_len)
                 for r in ok]
    step_over = []
    for r in ok:
        if len(r.itl_s) < 2:
            continue
        ctx = r.prompt_len + r.output_tokens // 2
        step_over.append(statistics.median(r.itl_s) - prof.decode_step_s(1, ctx))
    return {"ttft_overhead_s": statistics.median(ttft_over),
            "decode_step_overhead_s": statistics.median(step_over) if step_over else 0.0,
            "ttft_overhead_samples_ms": [round(x * 1e3, 2) for x in ttft_over],
            "decode_step_overhead_samples_ms": [round(x * 1e3, 2) for x in step_over]}


def simulate(trace, prof, config, ttft_overhead_s: float | None) -> dict:
    from cluster.simulator.config import SimConfig
    from cluster.simulator.cpu_profile import LiveSemanticsSimulation, ttft_samples
    from cluster.simulator.loop import Simulation

    eng = config.decode.engine
    cfg = SimConfig(mode="disaggregated", num_prefill=1, num_decode=1,
                    prefill_chunk_tokens=config.prefill.engine.max_num_batched_tokens,
                    colocated_chunk_tokens=eng.max_num_batched_tokens,
                    decode_max_num_seqs=eng.max_num_seqs,
                    prefill_max_num_seqs=config.prefill.engine.max_num_seqs,
                    kv_capacity_tokens=prof.kv_capacity_tokens, scheduler=config.scheduler,
                    autoscaler=None, slo=config.slo)
    if ttft_overhead_s is None:
        sim = Simulation(cfg, trace, prof)
    else:
        sim = LiveSemanticsSimulation(cfg, trace, prof, ttft_overhead_s=ttft_overhead_s)
    res = sim.run()
    ttft = ttft_samples(sim)
    ttft = ttft[~np.isnan(ttft)]
    return {"ttft_ms": {"p50": float(np.percentile(ttft, 50)) * 1e3,
                        "p90": float(np.percentile(ttft, 90)) * 1e3},
            "itl_ms": {"p50": res["itl_s"]["p50"] * 1e3, "p90": res["itl_s"]["p90"] * 1e3},
            "finished": res["finished"], "refused": res["refused"]}


# ---- main ------------------------------------------------------------------------------------

def main(argv=None) -> int:
    args = parse_args(argv)
    from app.loadgen import launch
    from cluster.simulator.cpu_profile import (
        fit_cpu_profile,
        fit_error,
        measure_points,
        trace_from_requests,
        with_overheads,
    )
    from engine.make_model import ensure_model

    t_start = time.perf_counter()
    model = str(ensure_model("llama", "small", seed=0))
    side = launch.disaggregated(1, 1)
    config = launch.side_config(launch.default_config(args.num_threads), side, model, None)
    # pin the shape: the simulation is 1P+1D throughout, so the live cluster must be too
    config = config.with_overrides(**{"prefill.max_replicas": 1, "decode.max_replicas": 1,
                                      "autoscaler.enabled": False})
    engine_opts = {k: v for k, v in config.decode.engine.model_dump().items()
                   if k in ENGINE_KEYS and v is not None}

    print(f"== 1. offline CPU profile ({engine_opts}) ==", flush=True)
    points = measure_points(model, engine_opts, reps=args.reps,
                            prefill_neighbour=not args.idle_prefill)
    offline = fit_cpu_profile(points, "cpu/llama-small/offline", points["kv_bytes_per_token"],
                              points["kv_capacity_tokens"])
    fitted = offline.to_json()
    print(f"  fit: prefill {json.dumps(fitted['prefill'])} decode {json.dumps(fitted['decode'])}")
    print(f"  fit error on its points: {fit_error(points, offline)}", flush=True)

    print("== 2. live 1P+1D: idle calibration, then the measured workload ==", flush=True)
    rec = asyncio.run(run_live(args, config, model))
    specs = rec["specs"]
    live = rec["summary"]
    if live["completed"] < len(specs):
        print(f"warning: {live['failed']} live request(s) failed: {live['errors']}")

    # the calibration requests ran on an idle cluster: their overheads are taken against
    # the idle prefill profile; the simulation of the loaded run uses ``points["prefill"]``
    idle = fit_cpu_profile({"format": points["format"], "prefill": points["prefill_idle"],
                            "decode": points["decode"]}, "cpu/llama-small/idle",
                           points["kv_bytes_per_token"], points["kv_capacity_tokens"])
    terms = live_terms(rec["calib"], idle)
    calibrated_pts = {k: points[k] for k in ("format", "prefill", "decode")}
    calibrated_pts["transfer"] = terms["transfer"]
    with_transfer = fit_cpu_profile(calibrated_pts, "cpu/llama-small/calibrated",
                                    points["kv_bytes_per_token"], points["kv_capacity_tokens"])
    over = overheads(terms["requests"], fit_cpu_profile(
        {"format": points["format"], "prefill": points["prefill_idle"],
         "decode": points["decode"], "transfer": terms["transfer"]}, "idle+transfer",
        points["kv_bytes_per_token"], points["kv_capacity_tokens"]))
    full = with_overheads(with_transfer, over["decode_step_overhead_s"])

    print("== 3. simulation of the same requests ==", flush=True)
    trace = trace_from_requests([(s.arrival_s, s.prompt_len, s.output_len) for s in specs])
    sim_offline = simulate(trace, idle, config, None)  # idle offline profile, plain simulator
    sim_loaded = simulate(trace, offline, config, None)  # + prefill next to busy decode
    sim_full = simulate(trace, full, config, over["ttft_overhead_s"])

    rows = []
    for metric in ("ttft_ms", "itl_ms"):
        for q in ("p50", "p90"):
            m = live[metric][q]
            rows.append({"metric": f"{metric[:-3].upper()} {q}", "measured_ms": m,
                         "loaded_prefill_only_ms": sim_loaded[metric][q],
                         "offline_ms": sim_offline[metric][q], "full_ms": sim_full[metric][q],
                         "offline_rel_err": (sim_offline[metric][q] - m) / m,
                         "full_rel_err": (sim_full[metric][q] - m) / m})
    passed = all(abs(r["full_rel_err"]) <= args.tolerance for r in rows if "p50" in r["metric"])

    print("\n== 4. predicted vs measured (1P+1D, "
          f"{len(specs)} requests, {args.rate} req/s, seed {args.seed}) ==")
    print(f"{'metric':10s} {'measured':>10s} {'sim offline':>12s} {'err':>7s} "
          f"{'sim full':>10s} {'err':>7s}")
    for r in rows:
        print(f"{r['metric']:10s} {r['measured_ms']:9.1f}ms {r['offline_ms']:10.1f}ms "
              f"{r['offline_rel_err']:+7.1%} {r['full_ms']:8.1f}ms {r['full_rel_err']:+7.1%}")
    print(f"model terms: ttft_overhead {over['ttft_overhead_s'] * 1e3:.1f} ms, decode step "
          f"overhead {over['decode_step_overhead_s'] * 1e3:+.2f} ms, transfer latency "
          f"{with_transfer.transfer_latency_s * 1e3:.2f} ms + "
          f"{with_transfer.transfer_bandwidth_bytes_per_s / 1e6:.0f} MB/s")
    print(f"live server timing (mean ms): "
          f"{ {k: round(v, 1) for k, v in live['server_timing_ms'].items()} }")
    verdict = "PASS" if passed else "FAIL"
    print(f"{verdict}: full-model medians within {args.tolerance:.0%} of measured"
          if passed else f"{verdict}: a full-model median is off by more than "
          f"{args.tolerance:.0%}")

    out = {
        "args": vars(args), "engine_options": engine_opts, "offline_points": points,
        "profile_offline": offline.to_json(), "profile_full": full.to_json(),
        "live_terms": {k: v for k, v in over.items()} | {"transfer_points": terms["transfer"]},
        "measured": {k: live[k] for k in ("ttft_ms", "itl_ms", "tpot_ms", "server_timing_ms",
                                          "completed", "failed", "duration_s")},
        "loadavg_1m": rec["loadavg_1m"], "cpus": os.cpu_count(),
        "simulated_offline": sim_offline, "simulated_loaded_prefill_only": sim_loaded,
        "profile_idle": idle.to_json(), "simulated_full": sim_full, "rows": rows,
        "tolerance": args.tolerance, "pass": passed,
        "wall_s": time.perf_counter() - t_start,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2, default=float) + "\n")
    print(f"wrote {args.out}")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
