"""A DistServe-style TP sweep on one core and on several, side by side.

`splitserve simulate --sweep` searches (prefill TP, decode TP, prefill workers, decode
workers) for a GPU budget; each choice is simulated (a goodput search: several simulations)
independently of the others, so the sweep runs them in processes of their own (``--jobs``,
default every core). This runs the same sweep with 1 process and with ``--jobs`` processes
on one trace, checks that both give the same rows, and prints both wall times and their
ratio. Default: the issue's sweep (llama-3-70b, 16 H100s, TP 2/4/8, TTFT 1 s, ITL 50 ms).
The simulator runs compiled with mypyc (``cluster.compiled``), as ``splitserve simulate``
runs it, unless ``--interpreted``.

    .venv/bin/python benchmarks/sim_sweep.py [--jobs N] [--rate 10] [--duration 60] \
        [--out results/sim_sweep.json]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from cluster import compiled


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jobs", type=int, default=None, help="default: every usable core")
    ap.add_argument("--model", default="llama-3-70b")
    ap.add_argument("--gpus", type=int, default=16)
    ap.add_argument("--tp-choices", default="2,4,8")
    ap.add_argument("--rate", type=float, default=10.0)
    ap.add_argument("--duration", type=float, default=60.0)
    ap.add_argument("--ttft-slo", type=float, default=1.0)
    ap.add_argument("--itl-slo", type=float, default=0.05)
    ap.add_argument("--interpreted", action="store_true", help="do not compile the simulator")
    ap.add_argument("--out", default="results/sim_sweep.json")
    args = ap.parse_args()
    compiled.use_unless_interpreted(args.interpreted, print)
    # after activate(): the processes the sweep starts inherit the compiled build
    from cluster.policy_config import SLOConfig
    from cluster.simulator import SimConfig, synthetic
    from cluster.simulator.parallel import default_jobs
    from cluster.simulator.sweep import sweep_tp

    if args.jobs is None:
        args.jobs = default_jobs()
    trace = synthetic(args.rate, args.duration, seed=0)
    base = SimConfig(model=args.model, slo=SLOConfig(ttft_s=args.ttft_slo, itl_s=args.itl_slo))
    tps = [int(t) for t in args.tp_choices.split(",")]
    walls, results = {}, {}
    for jobs in (1, args.jobs):
        t0 = time.perf_counter()
        results[jobs] = sweep_tp(base, trace, args.gpus, tps, jobs=jobs)
        walls[jobs] = time.perf_counter() - t0
    same = results[1] == results[args.jobs]
    best = results[1]["best"]
    report = {
        "model": args.model, "gpus": args.gpus, "tp_choices": tps, "rate": args.rate,
        "duration_s": args.duration, "requests": len(trace),
        "configurations": len(results[1]["rows"]), "jobs": args.jobs,
        "cores_usable": default_jobs(), "wall_s_1_process": walls[1],
        "wall_s_jobs": walls[args.jobs], "speedup": walls[1] / walls[args.jobs],
        "same_rows": same, "best": best, "load_average": os.getloadavg(),
        "compiled": compiled.active_build() is not None,
    }
    print(f"{report['configurations']} configurations of {args.model} on {args.gpus} GPUs, "
          f"{len(trace)} requests: 1 process {walls[1]:.1f} s, {args.jobs} processes "
          f"{walls[args.jobs]:.1f} s: {report['speedup']:.2f}x "
          f"({'same rows' if same else 'ROWS DIFFER'}; load average "
          f"{report['load_average'][0]:.2f})")
    print(f"best: prefill TP {best['prefill_tp']} x {best['prefill']}, decode TP "
          f"{best['decode_tp']} x {best['decode']}: {best['goodput_req_s']:.2f} req/s")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1))
    print(f"wrote {args.out}")
    if not same:
        raise SystemExit("the parallel sweep's rows differ from the serial sweep's")


if __name__ == "__main__":
    main()
