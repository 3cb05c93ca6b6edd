"""Simulator speed at cluster scale: 10 minutes at 2,000 req/s on 512 prefill + 512 decode
H100 workers (llama-3-8b, TP=1).

Goal: under 60 s on the development machine (2 shared CPU cores). The simulator is
event-driven (arrivals, prefill steps, transfers, one event per decode *run* between batch
changes), and the global scheduler it drives ranks workers through indexes (heaps keyed by the
policy's order, lazily invalidated), so an event costs O(log workers), not O(workers): the
per-request CPU cost printed below grows only slowly with the cluster (compare ``--rate 200
--prefill 64 --decode 64``). The constant per event is kept small too: a worker sends a
snapshot only when something placement reads changed, and the cyclic garbage collector is off
during the loop (``loop._cyclic_gc_paused``). Workload: synthetic conversation-like lengths
(Splitwise conversation statistics), Poisson arrivals. Wall time depends on what else the
machine runs: the CPU time and the load average are printed too.

The simulator's hot modules run compiled with mypyc (``cluster.compiled``; built on first use,
about 30 s, not counted). ``--interpreted`` runs them as plain Python; ``--compare`` runs the
same workload interpreted afterwards, in a fresh process, and prints the ratio.

    .venv/bin/python benchmarks/sim_scale.py [--rate 2000] [--duration 600] \
        [--prefill 512] [--decode 512] [--compare] [--out results/sim_scale.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from cluster import compiled


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rate", type=float, default=2000.0)
    ap.add_argument("--duration", type=float, default=600.0)
    ap.add_argument("--prefill", type=int, default=512)
    ap.add_argument("--decode", type=int, default=512)
    ap.add_argument("--policy", default="kv_aware")
    ap.add_argument("--goal-s", type=float, default=60.0, help="wall-time goal to check")
    ap.add_argument("--interpreted", action="store_true",
                    help="run the simulator as plain Python (not compiled with mypyc)")
    ap.add_argument("--compare", action="store_true",
                    help="then run the same workload interpreted and print the ratio")
    ap.add_argument("--out", default="results/sim_scale.json")
    args = ap.parse_args()
    compiled.use_unless_interpreted(args.interpreted, print)
    from cluster.simulator import SimConfig, Simulation, synthetic  # after activate()

    t0 = time.perf_counter()
    trace = synthetic(args.rate, args.duration, seed=1)
    gen_s = time.perf_counter() - t0
    cfg = SimConfig(num_prefill=args.prefill, num_decode=args.decode)
    t1, c1 = time.perf_counter(), time.process_time()
    sim = Simulation(cfg, trace, policy=args.policy)
    res = sim.run()
    wall, cpu = time.perf_counter() - t1, time.process_time() - c1
    load = os.getloadavg()  # 1, 5, 15 min: other work on the machine inflates the wall time
    tokens = sum(r.output_tokens for r in trace)
    report = {
        "requests": len(trace), "rate": args.rate, "duration_s": args.duration,
        "prefill": args.prefill, "decode": args.decode, "policy": args.policy,
        "trace_generation_s": gen_s, "simulation_wall_s": wall, "simulation_cpu_s": cpu,
        "events": res["events"], "events_per_s": res["events"] / wall,
        "us_per_request": 1e6 * cpu / max(len(trace), 1), "output_tokens": tokens,
        "goal_wall_s": args.goal_s, "goal_met": wall < args.goal_s, "load_average": load,
        "compiled": compiled.active_build() is not None,
        "ttft_s": res["ttft_s"], "itl_s": res["itl_s"], "slo_attainment": res["slo_attainment"],
        "utilization": res["utilization"],
    }
    print(f"{len(trace):,} requests ({args.rate:g} req/s x {args.duration:g} s) on "
          f"{args.prefill}P + {args.decode}D H100, "
          f"{'compiled' if report['compiled'] else 'interpreted'}: simulated in {wall:.1f} s wall "
          f"({cpu:.1f} s CPU; goal < {args.goal_s:g} s wall: "
          f"{'met' if report['goal_met'] else 'NOT met'}; load average {load[0]:.2f})")
    print(f"{res['events']:,} events ({report['events_per_s']:,.0f}/s), "
          f"{report['us_per_request']:.0f} us CPU per request, {tokens:,} output tokens")
    print(f"TTFT p90 {res['ttft_s']['p90'] * 1e3:.0f} ms, ITL p90 "
          f"{res['itl_s']['p90'] * 1e3:.1f} ms, SLO attainment {res['slo_attainment']:.1%}, "
          f"utilisation {json.dumps({k: round(v, 3) for k, v in res['utilization'].items()})}")
    if args.compare and report["compiled"]:
        report["interpreted"] = interpreted = _run_interpreted(args)
        same = all(interpreted[k] == report[k] for k in ("events", "ttft_s", "itl_s"))
        report["interpreted_over_compiled"] = ratio = interpreted["simulation_wall_s"] / wall
        print(f"interpreted: {interpreted['simulation_wall_s']:.1f} s wall, {ratio:.2f}x the "
              f"compiled time; same events and latencies: {same}")
        if not same:
            raise SystemExit("the interpreted run differs from the compiled one")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1))
    print(f"wrote {args.out}")


def _run_interpreted(args: argparse.Namespace) -> dict:
    """The same workload in a fresh process that does not compile (so both start clean)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "interpreted.json"
        cmd = [sys.executable, __file__, "--interpreted", "--rate", str(args.rate),
               "--duration", str(args.duration), "--prefill", str(args.prefill),
               "--decode", str(args.decode), "--policy", args.policy,
               "--goal-s", str(args.goal_s), "--out", str(out)]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        return json.loads(out.read_text())


if __name__ == "__main__":
    main()
