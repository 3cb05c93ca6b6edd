"""DistServe-style search: for a fixed GPU budget, which prefill:decode split (and chunk
size) gives the most goodput under the SLOs? Colocated runs at the same budget are included
as the baseline."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from cluster.simulator.config import SimConfig
from cluster.simulator.loop import simulate
from cluster.simulator.profiles import CostProfile
from cluster.simulator.trace import TraceRequest


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
) -> dict:
    """Simulate every configuration; ``best`` is the one with the highest goodput."""
    configs = sweep_configs(base, total_gpus, chunk_sizes)
    rows = []
    for i, cfg in enumerate(configs):
        rows.append(row(simulate(cfg, trace, profile, policy)))
        if progress is not None:
            progress(i + 1, len(configs), rows[-1])
    best = max(rows, key=lambda r: (r["goodput_req_s"] or 0.0, r["slo_attainment"] or 0.0))
    disagg = [r for r in rows if r["mode"] == "disaggregated"]
    best_disagg = max(disagg, key=lambda r: (r["goodput_req_s"] or 0.0)) if disagg else None
    return {"gpus": total_gpus, "slo": base.slo.model_dump(), "rows": rows, "best": best,
            "best_disaggregated": best_disagg}
