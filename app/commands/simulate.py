"""`splitserve simulate`: replay a trace on a simulated cluster (same scheduler and autoscaler
code as the live one) and report TTFT / ITL / goodput.

    splitserve simulate --trace /work/shared/traces/azure_llm_code_2023.csv --rate 20
    splitserve simulate --synthetic --rate 200 --duration 600 --prefill 64 --decode 64
    splitserve simulate --config sim.yaml --synthetic --plot out.png --output out.json
    splitserve simulate --synthetic --rate 40 --sweep --gpus 8 --chunks 512,2048,8192
    splitserve simulate --synthetic --rate 10 --duration 60 --model llama-3-70b --sweep \
        --gpus 16 --tp-choices 2,4,8 --ttft-slo 1.0 --itl-slo 0.05
    splitserve simulate --calibrate points.json --hardware H100 --save-profile my.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from cluster import compiled  # standard library only: cheap for every command's start


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "simulate",
        help="simulate a disaggregated (or colocated) cluster on a trace",
        description="Discrete-event simulation of prefill/decode pools running the real global "
        "scheduler and autoscaler against cost models (H100/H200/A100 specs or a calibrated "
        "profile JSON).",
    )
    src = p.add_argument_group("workload")
    src.add_argument("--trace", help="CSV: TIMESTAMP,ContextTokens,GeneratedTokens"
                     "[,PrefixGroup[,PrefixTokens]]")
    src.add_argument("--synthetic", action="store_true",
                     help="Poisson (or --burstiness) arrivals, conversation-like lengths")
    src.add_argument("--rate", type=float, default=None,
                     help="req/s (synthetic; for --trace: rescale arrivals to this mean rate)")
    src.add_argument("--duration", type=float, default=120.0, help="synthetic seconds")
    src.add_argument("--burstiness", type=float, default=1.0,
                     help="coefficient of variation of inter-arrivals (1 = Poisson)")
    src.add_argument("--prefix-groups", type=int, default=0,
                     help="synthetic: give prompts a shared prefix from N groups (Zipf)")
    src.add_argument("--prefix-tokens", type=int, default=1024, help="shared prefix length")
    src.add_argument("--seed", type=int, default=0)
    cl = p.add_argument_group("cluster (override --config)")
    cl.add_argument("--config", help="SimConfig YAML/JSON")
    cl.add_argument("--mode", choices=("disaggregated", "colocated"))
    cl.add_argument("--prefill", type=int, help="prefill workers")
    cl.add_argument("--decode", type=int, help="decode workers")
    cl.add_argument("--colocated", type=int, help="colocated workers")
    cl.add_argument("--hardware", help="H100 | H200 | A100 | path to a profile JSON")
    cl.add_argument("--model", help="model spec (llama-3-8b, llama-3-70b, qwen2.5-7b, "
                    "mixtral-8x7b, qwen3-30b-a3b)")
    cl.add_argument("--tp", type=int, help="GPUs per worker (tensor parallel)")
    cl.add_argument("--prefill-tp", type=int, help="GPUs per prefill worker (default --tp)")
    cl.add_argument("--decode-tp", type=int, help="GPUs per decode worker (default --tp)")
    cl.add_argument("--policy", help="placement policy (round_robin, least_loaded, kv_aware)")
    cl.add_argument("--ttft-slo", type=float, help="seconds")
    cl.add_argument("--itl-slo", type=float, help="seconds")
    out = p.add_argument_group("output")
    out.add_argument("--output", help="write the result JSON here")
    out.add_argument("--plot", help="write a PNG here")
    sw = p.add_argument_group("sweep")
    sw.add_argument("--sweep", action="store_true",
                    help="search (prefill TP, decode TP, prefill workers, decode workers) on "
                    "--gpus for the highest rate meeting the SLOs (DistServe goodput); with "
                    "--chunks: every prefill:decode split at --tp and chunk size instead")
    sw.add_argument("--gpus", type=int, default=8, help="GPU budget of the sweep")
    sw.add_argument("--tp-choices", default="1,2,4,8", help="TP sizes the sweep tries")
    sw.add_argument("--chunks", default="", help="comma-separated chunk sizes to sweep")
    sw.add_argument("--jobs", type=int, default=None,
                    help="simulations run at once, one process each (default: every core "
                    "this process may use); each process holds a copy of the trace")
    p.add_argument("--interpreted", action="store_true",
                   help="run the simulator as plain Python instead of compiled with mypyc "
                   "(same results, about 2x slower; the compile runs once per source change)")
    cal = p.add_argument_group("calibration")
    cal.add_argument("--calibrate", help="measured points JSON (splitserve-sim-points/v1)")
    cal.add_argument("--save-profile", help="write the (calibrated) profile JSON here")
    p.set_defaults(handler=run)


def build_config(args: argparse.Namespace):
    from cluster.simulator.config import SimConfig

    base = SimConfig.load(args.config) if args.config else SimConfig()
    data = base.model_dump()
    for flag, key in (("mode", "mode"), ("prefill", "num_prefill"), ("decode", "num_decode"),
                      ("colocated", "num_colocated"), ("hardware", "hardware"),
                      ("model", "model"), ("tp", "tp"), ("prefill_tp", "prefill_tp"),
                      ("decode_tp", "decode_tp")):
        if getattr(args, flag) is not None:
            data[key] = getattr(args, flag)
    if args.policy:
        data["scheduler"]["policy"] = args.policy
    if args.ttft_slo:
        data["slo"]["ttft_s"] = args.ttft_slo
    if args.itl_slo:
        data["slo"]["itl_s"] = args.itl_slo
    return SimConfig.model_validate(data)


def build_trace(args: argparse.Namespace):
    from cluster.simulator import trace as tr

    if args.trace:
        reqs = tr.load_csv(args.trace, default_prefix_tokens=args.prefix_tokens)
        if args.rate:
            reqs = tr.rescale_rate(reqs, args.rate)
        if "azure" in args.trace.lower():
            print(f"trace: {tr.AZURE_ATTRIBUTION}")
    elif args.synthetic:
        reqs = tr.synthetic(args.rate or 10.0, args.duration, seed=args.seed,
                            burstiness=args.burstiness)
    else:
        raise SystemExit("splitserve simulate: give --trace FILE or --synthetic")
    if args.prefix_groups:
        reqs = tr.with_shared_prefixes(reqs, args.prefix_groups, args.prefix_tokens, args.seed)
    if not reqs:
        raise SystemExit("splitserve simulate: the workload is empty")
    return reqs


def _calibrate(args: argparse.Namespace, cfg) -> int:
    from cluster.simulator.calibrate import fit_profile
    from cluster.simulator.profiles import resolve_profile

    with open(args.calibrate) as f:
        points = json.load(f)
    prof = fit_profile(points, resolve_profile(cfg.hardware, cfg.model, cfg.tp))
    text = json.dumps(prof.to_json(), indent=2)
    if args.save_profile:
        prof.save(args.save_profile)
        print(f"profile written to {args.save_profile}")
    print(text)
    return 0


def print_summary(r: dict) -> None:
    c = r["config"]
    pools = (f"{c['num_prefill']} prefill + {c['num_decode']} decode"
             if c["mode"] == "disaggregated" else f"{c['num_colocated']} colocated")
    print(f"{c['mode']}: {pools} ({c['gpus']} GPUs, {c['profile']}, policy {c['policy']})")
    print(f"requests {r['requests']}  finished {r['finished']}  refused {r['refused']}  "
          f"span {r['span_s']:.0f} s")
    for name in ("ttft_s", "itl_s", "tpot_s", "e2e_s"):
        v = r[name]
        if v["p50"] is not None:
            print(f"  {name[:-2]:5s} p50 {v['p50'] * 1e3:9.1f} ms   p90 {v['p90'] * 1e3:9.1f} ms"
                  f"   p99 {v['p99'] * 1e3:9.1f} ms")
    slo = r["slo"]
    print(f"SLO (TTFT <= {slo['ttft_s']} s, TPOT <= {slo['itl_s'] * 1e3:g} ms): attainment "
          f"{r['slo_attainment']:.1%}, goodput {r['goodput_req_s']:.2f} req/s")
    util = ", ".join(f"{k} {v:.0%}" for k, v in r["utilization"].items() if v is not None)
    print(f"GPU utilisation: {util}; prefix hit rate {r['prefix_hit_rate']:.1%}")


def print_tp_sweep(result: dict, top: int = 10) -> None:
    slo = result["slo"]
    print(f"{result['model']} on {result['gpus']} x {result['hardware']}: highest rate with "
          f"{result['attainment_target']:.0%} of requests within TTFT {slo['ttft_s']} s and "
          f"TPOT {slo['itl_s'] * 1e3:g} ms")
    print(" P TP  D TP   P   D  GPUs  goodput req/s  per GPU  TTFT p90 ms  ITL p90 ms")
    for r in result["rows"][:top]:
        ttft = f"{r['ttft_p90_s'] * 1e3:11.0f}" if r["ttft_p90_s"] is not None else " " * 11
        itl = f"{r['itl_p90_s'] * 1e3:10.1f}" if r["itl_p90_s"] is not None else " " * 10
        print(f"{r['prefill_tp']:5d} {r['decode_tp']:5d} {r['prefill']:3d} {r['decode']:3d} "
              f"{r['gpus']:5d} {r['goodput_req_s']:14.2f} {r['goodput_req_s_per_gpu']:8.3f} "
              f"{ttft}  {itl}")
    best, equal = result["best"], result["best_equal_tp"]
    print(f"best: prefill TP {best['prefill_tp']} x {best['prefill']}, decode TP "
          f"{best['decode_tp']} x {best['decode']}: {best['goodput_req_s']:.2f} req/s")
    if equal is not None:
        gain = result["gain_over_equal_tp"]
        print(f"best with one TP size: TP {equal['prefill_tp']}, {equal['prefill']} prefill + "
              f"{equal['decode']} decode: {equal['goodput_req_s']:.2f} req/s"
              + (f"; gain {gain:+.0%}" if gain is not None else ""))


def _log(line: str) -> None:
    print(f"splitserve simulate: {line}", file=sys.stderr)


def run(args: argparse.Namespace) -> int:
    if not args.calibrate:  # before the simulator's modules are imported
        compiled.use_unless_interpreted(args.interpreted, _log)
    from cluster.simulator.loop import Simulation
    from cluster.simulator.parallel import SimulationProcessDied, default_jobs
    from cluster.simulator.sweep import sweep, sweep_tp

    cfg = build_config(args)
    if args.calibrate:
        return _calibrate(args, cfg)
    reqs = build_trace(args)
    if args.sweep:
        jobs = args.jobs if args.jobs is not None else default_jobs()
        if jobs < 1:
            raise SystemExit(f"splitserve simulate: --jobs must be at least 1, not {jobs}")
        progress = lambda i, n, row: print(f"[{i}/{n}] {row}", file=sys.stderr)  # noqa: E731
        chunks = [int(c) for c in args.chunks.split(",") if c.strip()]
        tps = [int(t) for t in args.tp_choices.split(",") if t.strip()]
        try:
            if chunks:
                result = sweep(cfg, reqs, args.gpus, chunks, policy=args.policy,
                               progress=progress, jobs=jobs)
            else:
                result = sweep_tp(cfg, reqs, args.gpus, tps, policy=args.policy,
                                  progress=progress, jobs=jobs)
        except (ValueError, SimulationProcessDied) as e:
            raise SystemExit(f"splitserve simulate --sweep: {e}") from None
        if chunks:
            print(json.dumps(result["best"], indent=2))
        else:
            print_tp_sweep(result)
    else:
        t0 = time.perf_counter()
        sim = Simulation(cfg, reqs, policy=args.policy)
        result = sim.run()
        result["wall_s"] = time.perf_counter() - t0
        print_summary(result)
        how = "compiled with mypyc" if compiled.active_build() is not None else "interpreted"
        print(f"simulated {result['simulated_s']:.0f} s in {result['wall_s']:.1f} s ({how})")
        if args.plot:
            from cluster.simulator.plot import plot_simulation

            plot_simulation(sim, result, args.plot)
            print(f"plot written to {args.plot}")
    if args.output:
        with open(args.output, "w") as f:
            json.dump(result, f, indent=1)
        print(f"result written to {args.output}")
    return 0
