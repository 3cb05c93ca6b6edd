"""Fit a ``CostProfile`` to measured timings (our own benchmark JSON).

Input (``splitserve-sim-points/v1``; any section may be missing, its coefficients then come
from the base profile)::

    {
      "format": "splitserve-sim-points/v1",
      "prefill":  [{"num_tokens": 2048, "context_tokens": 0, "time_s": 0.071}, ...],
      "decode":   [{"batch_size": 32, "kv_tokens": 65536, "time_s": 0.013}, ...],
      "transfer": [{"bytes": 268435456, "time_s": 0.0062}, ...]
    }

Each section is a linear model in its coefficients (see ``profiles``), fitted by
non-negative least squares: an ordinary fit, and if a coefficient comes out negative, the
best fit over subsets of coefficients held at zero (at most three coefficients: exhaustive).
"""

from __future__ import annotations

import itertools
from dataclasses import replace

import numpy as np

from cluster.simulator.profiles import CostProfile

POINTS_FORMAT = "splitserve-sim-points/v1"


def nnls_small(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Non-negative least squares for a few columns, by trying every support set."""
    best, best_err = np.zeros(a.shape[1]), float(np.sum(b**2))
    for k in range(1, a.shape[1] + 1):
        for cols in itertools.combinations(range(a.shape[1]), k):
            x, *_ = np.linalg.lstsq(a[:, cols], b, rcond=None)
            if np.any(x < 0):
                continue
            err = float(np.sum((a[:, cols] @ x - b) ** 2))
            if err < best_err:
                best_err, best = err, np.zeros(a.shape[1])
                best[list(cols)] = x
    return best


def _fit(rows: list[list[float]], times: list[float]) -> np.ndarray:
    return nnls_small(np.asarray(rows, dtype=float), np.asarray(times, dtype=float))


def fit_profile(points: dict, base: CostProfile, name: str | None = None) -> CostProfile:
    """``base`` with every section that has points replaced by a fit to them."""
    fmt = points.get("format", POINTS_FORMAT)
    if fmt != POINTS_FORMAT:
        raise ValueError(f"expected {POINTS_FORMAT} points, got format {fmt!r}")
    prof = base
    if points.get("prefill"):
        pts = points["prefill"]
        rows = []
        for p in pts:
            n, ctx = p["num_tokens"], p.get("context_tokens", 0)
            rows.append([1.0, n, n * (ctx + n / 2)])
        f, t, a = _fit(rows, [p["time_s"] for p in pts])
        prof = replace(prof, prefill_fixed_s=f, prefill_per_token_s=t, prefill_per_attn_pair_s=a)
    if points.get("decode"):
        pts = points["decode"]
        rows = [[1.0, p["batch_size"], p["kv_tokens"] * prof.kv_bytes_per_token] for p in pts]
        f, s, k = _fit(rows, [p["time_s"] for p in pts])
        prof = replace(prof, decode_fixed_s=f, decode_per_seq_s=s, decode_per_kv_byte_s=k)
    if points.get("transfer"):
        pts = points["transfer"]
        lat, per_byte = _fit([[1.0, p["bytes"]] for p in pts], [p["time_s"] for p in pts])
        if per_byte <= 0:
            raise ValueError("transfer points do not grow with bytes: cannot fit a bandwidth")
        prof = replace(
            prof, transfer_latency_s=lat, transfer_bandwidth_bytes_per_s=1.0 / per_byte
        )
    return replace(prof, name=name or f"{base.name}/calibrated", source="calibrated")
