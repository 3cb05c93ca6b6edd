"""What the simulator records and how it is summarised.

Per request: arrival, first token, finish, cached prompt tokens, refused. Per decode run:
the first and last step durations, the number of steps and the batch size (a run of ``m``
steps over ``B`` sequences is ``m * B`` inter-token latencies, linear in between). Per
worker: busy and alive time. Summary: TTFT / ITL / TPOT / E2E percentiles, SLO attainment
and goodput, prefix hit rate, utilisation per pool, replicas over time.

A request *meets the SLOs* when TTFT <= ``slo.ttft_s`` and its mean time per output token
after the first (TPOT; the gap that includes the KV transfer counts) <= ``slo.itl_s``.
Refused and unfinished requests miss. Goodput = requests meeting both / trace span.
"""

from __future__ import annotations

from array import array

import numpy as np

from cluster.policy_config import SLOConfig

PCTS = (50, 90, 99)


def weighted_percentiles(values: np.ndarray, weights: np.ndarray, pcts=PCTS) -> dict:
    if values.size == 0:
        return {f"p{p}": None for p in pcts} | {"mean": None}
    order = np.argsort(values)
    v, w = values[order], weights[order]
    total = w.sum()
    cum = np.cumsum(w)
    cum /= total  # in place: the ITL arrays have millions of points
    out = {f"p{p}": float(v[min(np.searchsorted(cum, p / 100.0), v.size - 1)]) for p in pcts}
    out["mean"] = float(np.sum(v * w) / total)
    return out


def percentiles(values: np.ndarray) -> dict:
    values = values[~np.isnan(values)]
    return weighted_percentiles(values, np.ones_like(values))


class Recorder:
    def __init__(self, arrivals: np.ndarray, prompts: np.ndarray, outputs: np.ndarray):
        n = arrivals.size
        self.arrival, self.prompt, self.output = arrivals, prompts, outputs
        self.first_token = np.full(n, np.nan)
        self.finish = np.full(n, np.nan)
        self.cached = np.zeros(n)
        self.refused = np.zeros(n, dtype=bool)
        self.runs = array("d")
        """Per decode run, four numbers (``decode_run``): first and last step durations (s),
        steps, batch. A flat array of doubles, not a list of tuples: a 1,000-GPU run records
        millions of runs, and this is a tenth of the memory and turns into numpy at once."""
        self.replicas: list[tuple[float, int, int, int]] = []  # (t, prefill, decode, colocated)
        self.decisions: list[dict] = []

    def decode_run(self, d0: float, d1: float, m: int, batch: int) -> None:
        self.runs.extend((d0, d1, m, batch))

    def itl_samples(self) -> tuple[np.ndarray, np.ndarray]:
        """Four points per run, evenly over its step durations, weighted m * B / 4."""
        if not self.runs:
            return np.zeros(0), np.zeros(0)
        runs = np.frombuffer(self.runs, dtype=float).reshape(-1, 4).copy()  # copy: unpins
        d0, d1, m, b = runs.T
        frac = np.array([0.0, 1 / 3, 2 / 3, 1.0])
        values = d0[:, None] + (d1 - d0)[:, None] * frac[None, :]
        weights = np.repeat((m * b / 4.0)[:, None], 4, axis=1)
        return values.ravel(), weights.ravel()

    def met_slo(self, slo: SLOConfig) -> np.ndarray:
        ttft = self.first_token - self.arrival
        steps = np.maximum(self.output - 1, 1)
        tpot = np.where(self.output > 1, (self.finish - self.first_token) / steps, 0.0)
        with np.errstate(invalid="ignore"):
            return (ttft <= slo.ttft_s) & (tpot <= slo.itl_s) & ~np.isnan(self.finish)

    def attainment_by_window(self, slo: SLOConfig, edges: list[float]) -> list[dict]:
        """SLO attainment of the requests arriving in each [edges[i], edges[i+1])."""
        met = self.met_slo(slo)
        out = []
        for lo, hi in zip(edges[:-1], edges[1:], strict=True):
            sel = (self.arrival >= lo) & (self.arrival < hi)
            ttft = self.first_token[sel] - self.arrival[sel]
            out.append({
                "start_s": lo, "end_s": hi, "requests": int(sel.sum()),
                "slo_attainment": float(met[sel].mean()) if sel.any() else None,
                "ttft_p90_s": percentiles(ttft)["p90"],
            })
        return out

    def summary(self, slo: SLOConfig, span_s: float, pool_busy: dict, pool_alive: dict) -> dict:
        done = ~np.isnan(self.finish)
        ttft = self.first_token - self.arrival
        tpot = (self.finish - self.first_token) / np.maximum(self.output - 1, 1)
        tpot = np.where(self.output > 1, tpot, np.nan)
        itl_v, itl_w = self.itl_samples()
        met = self.met_slo(slo)
        n = self.arrival.size
        return {
            "requests": int(n),
            "finished": int(done.sum()),
            "refused": int(self.refused.sum()),
            "span_s": span_s,
            "throughput_req_s": float(done.sum() / span_s) if span_s > 0 else None,
            "ttft_s": percentiles(ttft),
            "itl_s": weighted_percentiles(itl_v, itl_w),
            "tpot_s": percentiles(tpot),
            "e2e_s": percentiles(self.finish - self.arrival),
            "slo": slo.model_dump(),
            "slo_attainment": float(met.mean()) if n else None,
            "ttft_attainment": float(np.mean(ttft <= slo.ttft_s)) if n else None,
            "goodput_req_s": float(met.sum() / span_s) if span_s > 0 else None,
            "prefix_hit_rate": float(self.cached.sum() / self.prompt.sum()) if n else None,
            "utilization": {
                role: (pool_busy[role] / pool_alive[role]) if pool_alive[role] > 0 else None
                for role in pool_busy
            },
        }
