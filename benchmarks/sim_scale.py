"""Simulator speed: a 10-minute trace at 200 req/s on 64 prefill + 64 decode H100 workers.

The requirement is that this simulates in under 60 s on a development machine (2 shared CPU
cores): the simulator is event-driven (arrivals, prefill steps, transfers, and one event per
decode *run* between batch-membership changes), never a tick per GPU per step. Workload:
synthetic conversation-like lengths (Splitwise conversation statistics), Poisson arrivals.

    .venv/bin/python benchmarks/sim_scale.py [--rate 200] [--duration 600] [--out ...json]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from cluster.simulator import SimConfig, Simulation, synthetic


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rate", type=float, default=200.0)
    ap.add_argument("--duration", type=float, default=600.0)
    ap.add_argument("--prefill", type=int, default=64)
    ap.add_argument("--decode", type=int, default=64)
    ap.add_argument("--policy", default="kv_aware")
    ap.add_argument("--out", default="results/sim_scale.json")
    args = ap.parse_args()
    t0 = time.perf_counter()
    trace = synthetic(args.rate, args.duration, seed=1)
    gen_s = time.perf_counter() - t0
    cfg = SimConfig(num_prefill=args.prefill, num_decode=args.decode)
    t1, c1 = time.perf_counter(), time.process_time()
    sim = Simulation(cfg, trace, policy=args.policy)
    res = sim.run()
    wall, cpu = time.perf_counter() - t1, time.process_time() - c1
    tokens = sum(r.output_tokens for r in trace)
    report = {
        "requests": len(trace), "rate": args.rate, "duration_s": args.duration,
        "prefill": args.prefill, "decode": args.decode, "policy": args.policy,
        "trace_generation_s": gen_s, "simulation_wall_s": wall, "simulation_cpu_s": cpu,
        "events": res["events"], "output_tokens": tokens,
        "ttft_s": res["ttft_s"], "itl_s": res["itl_s"], "slo_attainment": res["slo_attainment"],
        "utilization": res["utilization"],
    }
    print(f"{len(trace)} requests ({args.rate:g} req/s x {args.duration:g} s) on "
          f"{args.prefill}P + {args.decode}D H100: simulated in {wall:.1f} s wall "
          f"({cpu:.1f} s CPU), {res['events']:,} events for {tokens:,} output tokens")
    print(f"TTFT p90 {res['ttft_s']['p90'] * 1e3:.0f} ms, ITL p90 "
          f"{res['itl_s']['p90'] * 1e3:.1f} ms, SLO attainment {res['slo_attainment']:.1%}, "
          f"utilisation {json.dumps({k: round(v, 3) for k, v in res['utilization'].items()})}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
