"""Simulated: disaggregated prefill/decode pools vs colocated chunked prefill, same GPU count.

Workload: synthetic, conversation-like lengths (log-normal, prompt median 1,020 tokens,
output median 130, after the conversation-trace statistics published by Splitwise, Patel et
al., ISCA 2024), Poisson arrivals. Cluster: --gpus H100s running llama-3-8b (spec profile).
Every prefill:decode split (prefill chunk 8,192) and every colocated chunk size is simulated
once per arrival rate; then, for each ITL SLO (tight ones: 20-40 ms per output token) with
the TTFT SLO, we report each configuration's *max goodput rate*: the highest arrival rate
(below the first failing one) at which >= 90% of requests meet both SLOs (DistServe's
definition), and the best configuration of each kind.

    .venv/bin/python benchmarks/sim_disagg_vs_colocated.py [--gpus 8] [--out results/...json]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from cluster.policy_config import SLOConfig
from cluster.simulator import SimConfig, Simulation, synthetic
from cluster.simulator.sweep import sweep_configs


def max_goodput_rate(attainment_by_rate: dict[float, float], target: float) -> float:
    best = 0.0
    for rate in sorted(attainment_by_rate):
        if attainment_by_rate[rate] < target:
            break
        best = rate
    return best


def label(cfg: SimConfig) -> str:
    if cfg.mode == "disaggregated":
        return f"disagg {cfg.num_prefill}P:{cfg.num_decode}D"
    return f"colocated chunk {cfg.colocated_chunk_tokens}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gpus", type=int, default=8)
    ap.add_argument("--rates", default="20,30,40,50,60,70,80,90,100")
    ap.add_argument("--itl-slos", default="0.02,0.03,0.04")
    ap.add_argument("--ttft-slo", type=float, default=0.5)
    ap.add_argument("--chunks", default="256,512,1024")
    ap.add_argument("--duration", type=float, default=60.0)
    ap.add_argument("--target", type=float, default=0.9, help="attainment that counts as met")
    ap.add_argument("--out", default="results/sim_disagg_vs_colocated.json")
    args = ap.parse_args()
    rates = [float(r) for r in args.rates.split(",")]
    slos = [SLOConfig(ttft_s=args.ttft_slo, itl_s=float(x)) for x in args.itl_slos.split(",")]
    base = SimConfig()
    configs = sweep_configs(base, args.gpus, colocated=False) + sweep_configs(
        base, args.gpus, [int(c) for c in args.chunks.split(",")], disaggregated=False)
    t0 = time.perf_counter()
    # attainment[slo index][config label][rate]
    attainment: list[dict[str, dict[float, float]]] = [{} for _ in slos]
    detail: dict[str, dict[str, dict]] = {}
    for rate in rates:
        trace = synthetic(rate, args.duration, seed=1)
        for cfg in configs:
            sim = Simulation(cfg, trace)
            res = sim.run()
            name = label(cfg)
            detail.setdefault(name, {})[str(rate)] = {
                "ttft_p90_s": res["ttft_s"]["p90"], "tpot_p90_s": res["tpot_s"]["p90"],
                "itl_p90_s": res["itl_s"]["p90"], "utilization": res["utilization"]}
            for i, slo in enumerate(slos):
                attainment[i].setdefault(name, {})[rate] = float(sim.rec.met_slo(slo).mean())
        print(f"rate {rate:g} req/s done ({time.perf_counter() - t0:.0f} s)", flush=True)
    report: dict = {
        "gpus": args.gpus, "profile": "H100/llama-3-8b/tp1 (spec)",
        "workload": "synthetic conversation-like lengths (Splitwise conversation stats), Poisson",
        "duration_s": args.duration, "target_attainment": args.target, "rates": rates,
        "per_slo": [], "detail": detail,
    }
    for slo, table in zip(slos, attainment, strict=True):
        rows = {name: max_goodput_rate(by_rate, args.target) for name, by_rate in table.items()}
        best_d = max((n for n in rows if n.startswith("disagg")), key=rows.__getitem__)
        best_c = max((n for n in rows if n.startswith("colocated")), key=rows.__getitem__)
        report["per_slo"].append({
            "slo": slo.model_dump(), "max_goodput_rate": rows,
            "attainment": {n: {str(r): a for r, a in t.items()} for n, t in table.items()},
            "best_disaggregated": best_d, "best_colocated": best_c,
        })
        print(f"\nSLO: TTFT <= {slo.ttft_s} s, TPOT <= {slo.itl_s * 1e3:.0f} ms "
              f"({args.gpus} x H100, llama-3-8b)")
        for name, rate in sorted(rows.items(), key=lambda kv: -kv[1]):
            mark = " <- best" if name in (best_d, best_c) else ""
            print(f"  {name:24s} max goodput rate {rate:5.0f} req/s{mark}")
    report["wall_s"] = time.perf_counter() - t0
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1))
    print(f"wrote {args.out} ({report['wall_s']:.0f} s)")


if __name__ == "__main__":
    main()
