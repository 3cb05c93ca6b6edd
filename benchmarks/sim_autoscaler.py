"""Simulated: the SLO-driven autoscaler on a trace whose load doubles, then falls back.

Workload: synthetic conversation-like lengths (Splitwise conversation statistics), Poisson
arrivals at --rate req/s for a phase, 2x --rate for the next, --rate again for the last.
Three clusters (H100, llama-3-8b): fixed pools sized for the base load, fixed pools sized
for the peak, and the base-sized pools with the autoscaler (new workers take --startup-s
to come up). Reported: SLO attainment before / during / after the peak, serving
replica-seconds (a GPU cost), and replicas over time.

    .venv/bin/python benchmarks/sim_autoscaler.py [--rate 20] [--out results/sim_autoscaler.json]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from cluster.policy_config import AutoscalerConfig
from cluster.simulator import SimConfig, Simulation, synthetic


def replica_seconds(replicas: list[dict], end: float) -> float:
    total = 0.0
    for cur, nxt in zip(replicas, [*replicas[1:], {"t": end}], strict=True):
        total += (cur["prefill"] + cur["decode"]) * (nxt["t"] - cur["t"])
    return total


def replicas_at(replicas: list[dict], t: float) -> tuple[int, int]:
    last = replicas[0]
    for r in replicas:
        if r["t"] > t:
            break
        last = r
    return last["prefill"], last["decode"]


def run(name: str, cfg: SimConfig, trace, phase_s: float) -> dict:
    t0 = time.perf_counter()
    sim = Simulation(cfg, trace)
    res = sim.run()
    edges = [0.0, phase_s, 2 * phase_s, 3 * phase_s]
    phases = sim.rec.attainment_by_window(cfg.slo, edges)
    reps = res["replicas"]
    out = {
        "name": name,
        "phases": [
            {"phase": label, "slo_attainment": p["slo_attainment"], "requests": p["requests"],
             "ttft_p90_s": p["ttft_p90_s"]}
            for label, p in zip(("before", "during", "after"), phases, strict=True)
        ],
        "slo_attainment": res["slo_attainment"],
        "replica_seconds": replica_seconds(reps, res["simulated_s"]),
        "replicas_every_60s": [
            {"t": t, "prefill": p, "decode": d}
            for t in range(0, int(3 * phase_s) + 1, 60)
            for p, d in [replicas_at(reps, t)]
        ],
        "decisions": res["autoscaler_decisions"],
        "wall_s": time.perf_counter() - t0,
    }
    att = "  ".join(f"{p['phase']} {p['slo_attainment']:6.1%}" for p in out["phases"])
    print(f"{name:34s} {att}   replica-hours {out['replica_seconds'] / 3600:5.2f}"
          f"   ({out['wall_s']:.0f} s)")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rate", type=float, default=20.0, help="base load, req/s")
    ap.add_argument("--phase-s", type=float, default=600.0)
    ap.add_argument("--startup-s", type=float, default=60.0)
    ap.add_argument("--base-pools", default="2,2", help="prefill,decode sized for the base")
    ap.add_argument("--peak-pools", default="4,3", help="prefill,decode sized for the peak")
    ap.add_argument("--out", default="results/sim_autoscaler.json")
    args = ap.parse_args()
    phase = args.phase_s

    def rate(t: float) -> float:
        return args.rate * (2.0 if phase <= t < 2 * phase else 1.0)

    trace = synthetic(rate, 3 * phase, seed=3)
    bp, bd = (int(x) for x in args.base_pools.split(","))
    pp, pd = (int(x) for x in args.peak_pools.split(","))
    auto = AutoscalerConfig(interval_s=10, window_s=60, cooldown_s=60, scale_down_stable_s=120,
                            min_prefill=1, max_prefill=16, min_decode=1, max_decode=16)
    base = SimConfig(startup_s=args.startup_s)
    print(f"load {args.rate:g} -> {2 * args.rate:g} -> {args.rate:g} req/s, {phase:g} s per "
          f"phase, {len(trace)} requests; SLO TTFT <= {base.slo.ttft_s} s, TPOT <= "
          f"{base.slo.itl_s * 1e3:g} ms")
    runs = [
        run(f"fixed {bp}P+{bd}D (base-sized)",
            base.model_copy(update={"num_prefill": bp, "num_decode": bd}), trace, phase),
        run(f"fixed {pp}P+{pd}D (peak-sized)",
            base.model_copy(update={"num_prefill": pp, "num_decode": pd}), trace, phase),
        run(f"autoscaled from {bp}P+{bd}D",
            base.model_copy(update={"num_prefill": bp, "num_decode": bd, "autoscaler": auto}),
            trace, phase),
    ]
    print("replicas (prefill+decode) every 60 s, autoscaled:")
    print("  " + " ".join(f"{r['prefill']}+{r['decode']}" for r in runs[-1]["replicas_every_60s"]))
    report = {"rate": args.rate, "phase_s": phase, "startup_s": args.startup_s,
              "requests": len(trace), "slo": base.slo.model_dump(),
              "autoscaler": auto.model_dump(), "runs": runs}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
