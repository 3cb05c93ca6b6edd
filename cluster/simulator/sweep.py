"""DistServe-style searches for a fixed GPU budget.

- ``sweep``: which prefill:decode split (and chunk size) at one TP size gives the most
  goodput on a trace at its own rate; colocated runs at the same budget are the baseline.
- ``sweep_tp``: which (prefill TP, decode TP, prefill workers, decode workers) sustains the
  highest request rate with the SLO percentile of requests meeting both SLOs (DistServe's
  goodput), and how much that beats the best choice with one TP size for both pools.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

from cluster.simulator.config import SimConfig
from cluster.simulator.loop import simulate
from cluster.simulator.parallel import map_in_processes
from cluster.simulator.profiles import HARDWARE, CostProfile, resolve_profile
from cluster.simulator.trace import TraceRequest, rescale_rate


def sweep_configs(
    base: SimConfig,
    total_gpus: int,
    chunk_sizes: Sequence[int] = (),
    colocated: bool = True,
    disaggregated: bool = True,
) -> list[SimConfig]:
    """Every split of ``total_gpus`` (in whole workers of ``base.tp`` GPUs) into prefill and
    decode pools, times each chunk size (the prefill workers' step budget); plus colocated
    at each chunk size (the mixed step's budget)."""
    # int(): model_copy does not validate, and the compiled simulator refuses numpy ints
    total_gpus, chunk_sizes = int(total_gpus), [int(c) for c in chunk_sizes]
    workers = total_gpus // base.tp
    if workers < 2:
        raise ValueError(f"{total_gpus} GPUs at tp={base.tp} cannot hold two pools")
    out = []
    for p in range(1, workers) if disaggregated else ():
        for chunk in chunk_sizes or (base.prefill_chunk_tokens,):
            out.append(base.model_copy(update={
                "mode": "disaggregated", "num_prefill": p, "num_decode": workers - p,
                "prefill_chunk_tokens": chunk, "autoscaler": None,
            }))
    if colocated:
        for chunk in chunk_sizes or (base.colocated_chunk_tokens,):
            out.append(base.model_copy(update={
                "mode": "colocated", "num_colocated": workers,
                "colocated_chunk_tokens": chunk, "autoscaler": None,
            }))
    return out


def row(result: dict) -> dict:
    c = result["config"]
    disagg = c["mode"] == "disaggregated"
    chunk = c["prefill_chunk_tokens"] if disagg else c["colocated_chunk_tokens"]
    return {
        "mode": c["mode"],
        "prefill": c["num_prefill"] if c["mode"] == "disaggregated" else 0,
        "decode": c["num_decode"] if c["mode"] == "disaggregated" else 0,
        "colocated": c["num_colocated"] if c["mode"] == "colocated" else 0,
        "chunk_tokens": chunk,
        "goodput_req_s": result["goodput_req_s"],
        "slo_attainment": result["slo_attainment"],
        "ttft_p90_s": result["ttft_s"]["p90"],
        "tpot_p90_s": result["tpot_s"]["p90"],
        "itl_p90_s": result["itl_s"]["p90"],
        "refused": result["refused"],
    }


def sweep(
    base: SimConfig,
    trace: list[TraceRequest],
    total_gpus: int,
    chunk_sizes: Sequence[int] = (),
    profile: CostProfile | None = None,
    policy: str | None = None,
    progress: Callable[[int, int, dict], None] | None = None,
    jobs: int = 1,
) -> dict:
    """Simulate every configuration (on up to ``jobs`` processes); ``best`` is the one with
    the highest goodput."""
    configs = sweep_configs(base, total_gpus, chunk_sizes)
    rows = map_in_processes(_split_row, [(cfg, policy) for cfg in configs], (trace, profile),
                            jobs, progress)
    best = max(rows, key=lambda r: (r["goodput_req_s"] or 0.0, r["slo_attainment"] or 0.0))
    disagg = [r for r in rows if r["mode"] == "disaggregated"]
    best_disagg = max(disagg, key=lambda r: (r["goodput_req_s"] or 0.0)) if disagg else None
    return {"gpus": int(total_gpus), "slo": base.slo.model_dump(), "rows": rows, "best": best,
            "best_disaggregated": best_disagg}


def _split_row(context: tuple[list[TraceRequest], CostProfile | None], cfg: SimConfig,
               policy: str | None) -> dict:
    trace, profile = context
    return row(simulate(cfg, trace, profile, policy))


# ---- per-phase parallelism (DistServe): (prefill TP, decode TP, prefill count, decode count) --


def tp_configs(base: SimConfig, total_gpus: int, tps: Sequence[int]) -> list[SimConfig]:
    """Every (prefill TP, decode TP, prefill workers, decode workers) whose GPUs fit
    ``total_gpus``, with as many decode workers as the rest of the budget holds (another
    worker never lowers goodput). TP sizes the model does not fit or divide are left out."""
    if base.hardware not in HARDWARE:
        raise ValueError("a TP sweep needs spec hardware (H100, H200 or A100): a profile "
                         "file describes one TP size only")
    # int(): model_copy does not validate, and the compiled simulator refuses numpy ints
    total_gpus = int(total_gpus)
    usable = [tp for tp in sorted({int(tp) for tp in tps}) if _fits(base, tp)]
    out = []
    for ptp in usable:
        for dtp in usable:
            for p in range(1, (total_gpus - dtp) // ptp + 1):
                d = (total_gpus - p * ptp) // dtp
                out.append(base.model_copy(update={
                    "mode": "disaggregated", "num_prefill": p, "num_decode": d,
                    "prefill_tp": ptp, "decode_tp": dtp, "tp": ptp, "autoscaler": None,
                }))
    if not out:
        raise ValueError(f"no TP size in {sorted(set(tps))} fits {base.model} on "
                         f"{total_gpus} x {base.hardware} with a prefill and a decode worker")
    return out


def _fits(base: SimConfig, tp: int) -> bool:
    try:
        resolve_profile(base.hardware, base.model, tp)
    except ValueError:
        return False
    return True


def max_goodput_rate(
    cfg: SimConfig,
    trace: list[TraceRequest],
    target: float,
    policy: str | None = None,
    rel_tol: float = 0.05,
    max_runs: int = 12,
) -> tuple[float, dict | None]:
    """DistServe's goodput: the highest request rate at which at least ``target`` of the
    requests meet both SLOs. The trace's arrivals are rescaled to each tried rate (same
    requests, same order); doubling from the trace's own rate until it fails, then
    bisection to ``rel_tol``. Returns (rate, the result at that rate)."""
    rate = (len(trace) - 1) / (trace[-1].arrival_s - trace[0].arrival_s)
    good, bad, best = 0.0, math.inf, None
    for _ in range(max_runs):
        res = simulate(cfg, rescale_rate(trace, rate), policy=policy)
        if (res["slo_attainment"] or 0.0) >= target:
            good, best = rate, res
        else:
            bad = rate
        if bad == math.inf:
            rate *= 2
        elif good == 0.0:
            rate /= 2
        elif bad / good <= 1 + rel_tol:
            break
        else:
            rate = (good + bad) / 2
    return good, best


def tp_row(cfg: SimConfig, rate: float, res: dict | None) -> dict:
    gpus = cfg.num_gpus
    return {
        "prefill_tp": cfg.tp_of("prefill"), "decode_tp": cfg.tp_of("decode"),
        "prefill": cfg.num_prefill, "decode": cfg.num_decode, "gpus": gpus,
        "goodput_req_s": rate, "goodput_req_s_per_gpu": rate / gpus,
        "ttft_p90_s": res["ttft_s"]["p90"] if res else None,
        "itl_p90_s": res["itl_s"]["p90"] if res else None,
        "slo_attainment": res["slo_attainment"] if res else None,
    }


def sweep_tp(
    base: SimConfig,
    trace: list[TraceRequest],
    total_gpus: int,
    tps: Sequence[int] = (1, 2, 4, 8),
    policy: str | None = None,
    progress: Callable[[int, int, dict], None] | None = None,
    jobs: int = 1,
) -> dict:
    """Goodput (``max_goodput_rate``) of every ``tp_configs`` choice, on up to ``jobs``
    processes; ``best`` overall, ``best_equal_tp`` among prefill TP == decode TP, and the gain
    of the one over the other."""
    target = base.slo.percentile / 100.0
    configs = tp_configs(base, total_gpus, tps)
    rows = map_in_processes(_tp_row, [(cfg, target, policy) for cfg in configs], trace, jobs,
                            progress)
    rows.sort(key=lambda r: (-r["goodput_req_s"], r["gpus"], r["prefill_tp"], r["decode_tp"]))
    best = rows[0]
    equal = [r for r in rows if r["prefill_tp"] == r["decode_tp"]]
    best_equal = equal[0] if equal else None
    gain = (best["goodput_req_s"] / best_equal["goodput_req_s"] - 1
            if best_equal and best_equal["goodput_req_s"] > 0 else None)
    return {"gpus": int(total_gpus), "model": base.model, "hardware": base.hardware,
            "slo": base.slo.model_dump(), "attainment_target": target, "rows": rows,
            "best": best, "best_equal_tp": best_equal, "gain_over_equal_tp": gain}


def _tp_row(trace: list[TraceRequest], cfg: SimConfig, target: float,
            policy: str | None) -> dict:
    return tp_row(cfg, *max_goodput_rate(cfg, trace, target, policy))
