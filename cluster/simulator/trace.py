"""Workloads for the simulator: CSV traces and synthetic generators.

CSV format (the Azure LLM inference trace's, plus two optional columns)::

    TIMESTAMP,ContextTokens,GeneratedTokens[,PrefixGroup[,PrefixTokens]]

``TIMESTAMP`` is a datetime (``2023-11-16 18:17:03.9799600``) or seconds; arrivals are made
relative to the first row. ``PrefixGroup`` (an int, empty or -1 for none) marks requests that
share their first ``PrefixTokens`` prompt tokens (default: ``default_prefix_tokens``) with
every other request of the group (a system prompt, a shared document).

Bundled real trace: ``azure_llm_code_2023.csv`` (Azure Public Dataset, CC-BY; Patel et al.,
"Splitwise: Efficient generative LLM inference using phase splitting", ISCA 2024). Keep this
attribution wherever results from it are shown.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path

import numpy as np

AZURE_ATTRIBUTION = (
    "Azure LLM inference trace 2023 (Azure Public Dataset, CC-BY); Patel et al., "
    '"Splitwise: Efficient generative LLM inference using phase splitting", ISCA 2024'
)


@dataclass(frozen=True)
class TraceRequest:
    arrival_s: float
    prompt_tokens: int
    output_tokens: int
    prefix_group: int = -1  # -1: shares nothing
    prefix_tokens: int = 0  # leading prompt tokens shared with its group


def _parse_time(text: str) -> float | datetime:
    try:
        return float(text)
    except ValueError:
        # Python's fromisoformat takes at most 6 fractional digits; the Azure trace has 7.
        if "." in text:
            head, frac = text.split(".", 1)
            text = f"{head}.{frac[:6]}"
        return datetime.fromisoformat(text)


def _relative_seconds(times: list) -> list[float]:
    """Seconds after the earliest time (datetimes subtracted exactly, not via epoch floats)."""
    t0 = min(times)
    if isinstance(t0, datetime):
        return [(t - t0).total_seconds() for t in times]
    return [t - t0 for t in times]


def load_csv(path: str | Path, default_prefix_tokens: int = 1024) -> list[TraceRequest]:
    out: list[TraceRequest] = []
    times = []
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            times.append(_parse_time(row["TIMESTAMP"]))
            group_text = (row.get("PrefixGroup") or "").strip()
            group = int(group_text) if group_text else -1
            prompt = max(1, int(row["ContextTokens"]))
            shared = 0
            if group >= 0:
                shared_text = (row.get("PrefixTokens") or "").strip()
                shared = int(shared_text) if shared_text else default_prefix_tokens
                shared = min(shared, prompt)
            out.append(
                TraceRequest(
                    0.0,
                    prompt,
                    max(1, int(row["GeneratedTokens"])),
                    group,
                    shared,
                )
            )
    if not out:
        return []
    out = [replace(r, arrival_s=t) for r, t in zip(out, _relative_seconds(times), strict=True)]
    out.sort(key=lambda r: r.arrival_s)
    return out


def write_csv(path: str | Path, requests: Sequence[TraceRequest]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["TIMESTAMP", "ContextTokens", "GeneratedTokens", "PrefixGroup", "PrefixTokens"])
        for r in requests:
            w.writerow([f"{r.arrival_s:.6f}", r.prompt_tokens, r.output_tokens,
                        r.prefix_group, r.prefix_tokens])


def rescale_rate(requests: Sequence[TraceRequest], rate: float) -> list[TraceRequest]:
    """Stretch or squeeze arrival times so the mean rate is ``rate`` req/s."""
    if len(requests) < 2:
        return list(requests)
    span = requests[-1].arrival_s - requests[0].arrival_s
    factor = (len(requests) - 1) / rate / span
    return [replace(r, arrival_s=r.arrival_s * factor) for r in requests]


def arrivals(rate_fn, duration_s: float, rng: np.random.Generator, burstiness: float = 1.0):
    """Arrival times of a (possibly time-varying) renewal process: gamma inter-arrivals with
    coefficient of variation ``burstiness`` (1.0 = Poisson, > 1 = bursty), thinned to
    ``rate_fn(t)``. ``rate_fn`` may be a constant."""
    fn = rate_fn if callable(rate_fn) else (lambda t, r=float(rate_fn): r)
    peak = max(fn(t) for t in np.linspace(0, duration_s, 257))
    shape = 1.0 / burstiness**2
    n_guess = int(peak * duration_s * 1.2) + 16
    times: list[float] = []
    t = 0.0
    while True:
        gaps = rng.gamma(shape, 1.0 / (peak * shape), size=n_guess)
        for g in gaps:
            t += g
            if t >= duration_s:
                return np.asarray(times)
            if rng.random() * peak <= fn(t):
                times.append(t)


def lognormal_lengths(
    rng: np.random.Generator, n: int, median: float, sigma: float, lo: int, hi: int
) -> np.ndarray:
    return np.clip(np.round(rng.lognormal(np.log(median), sigma, n)), lo, hi).astype(int)


def synthetic(
    rate,
    duration_s: float,
    seed: int = 0,
    prompt_median: float = 1020,
    prompt_sigma: float = 1.0,
    output_median: float = 130,
    output_sigma: float = 1.0,
    burstiness: float = 1.0,
    max_prompt: int = 8192,
    max_output: int = 2048,
) -> list[TraceRequest]:
    """Synthetic trace. Defaults: a conversation-like mix (prompt median ~1k, output median
    ~130 tokens, log-normal), after the conversation-trace statistics Splitwise published."""
    rng = np.random.default_rng(seed)
    times = arrivals(rate, duration_s, rng, burstiness)
    prompts = lognormal_lengths(rng, len(times), prompt_median, prompt_sigma, 1, max_prompt)
    outputs = lognormal_lengths(rng, len(times), output_median, output_sigma, 1, max_output)
    rows = zip(times, prompts, outputs, strict=True)
    return [TraceRequest(float(t), int(p), int(o)) for t, p, o in rows]


def with_shared_prefixes(
    requests: Sequence[TraceRequest],
    num_groups: int,
    prefix_tokens: int,
    seed: int = 0,
    zipf_a: float = 1.2,
) -> list[TraceRequest]:
    """Prepend a shared prefix of ``prefix_tokens`` tokens to each prompt, from one of
    ``num_groups`` groups (Zipf-popular): e.g. a system prompt or a document per tenant."""
    rng = np.random.default_rng(seed)
    ranks = np.arange(1, num_groups + 1, dtype=float)
    weights = ranks**-zipf_a
    groups = rng.choice(num_groups, size=len(requests), p=weights / weights.sum())
    return [
        replace(r, prefix_group=int(g), prefix_tokens=prefix_tokens,
                prompt_tokens=prefix_tokens + r.prompt_tokens)
        for r, g in zip(requests, groups, strict=True)
    ]
