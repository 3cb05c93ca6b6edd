"""What a benchmark sends: arrival times, prompt and output lengths, random prompts.

A workload is a list of ``RequestSpec``, made once from a seed and replayed unchanged against
every configuration under comparison. Two sources:

- ``synthetic``: Poisson arrivals at ``rate`` req/s (exponential gaps), prompt and output
  lengths uniform in inclusive ranges.
- ``from_trace``: a CSV trace (``TIMESTAMP,ContextTokens,GeneratedTokens``, e.g. the Azure LLM
  inference trace 2023, CC-BY, Patel et al., "Splitwise", ISCA 2024): its lengths times
  ``length_scale`` / ``output_scale``, its arrival times either stretched by ``time_scale`` or
  rescaled to a mean ``rate``.

Prompts are random token ids in ``[FIRST_TOKEN_ID, vocab_size)`` (the generated tokenizers
keep 0..4 for special tokens), distinct per request, so no prefix is shared by accident.
Outputs are sent with ``ignore_eos`` so each request produces exactly ``output_len`` tokens.
Pure Python (random, math): no torch, no grpc.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

FIRST_TOKEN_ID = 10  # prompts avoid the lowest ids, where tokenizers keep special tokens


@dataclass(frozen=True)
class RequestSpec:
    """One request of a workload."""

    index: int  # position in the workload (0-based)
    arrival_s: float  # send time, seconds after the benchmark starts
    prompt_token_ids: tuple[int, ...]  # the prompt, [prompt_len] token ids
    output_len: int  # max_tokens, exact because ignore_eos is set

    @property
    def prompt_len(self) -> int:
        return len(self.prompt_token_ids)


@dataclass(frozen=True)
class LengthLimits:
    """Bounds a server puts on one request; prompts are cut so prompt + output fits."""

    vocab_size: int  # prompt ids are drawn below this
    max_model_len: int | None = None  # longest prompt + output the server accepts


def poisson_arrivals(n: int, rate: float, rng: random.Random) -> list[float]:
    """``n`` arrival times of a Poisson process of ``rate`` per second; the first is at 0.

    Gaps are exponential with mean ``1 / rate``; ``rate = inf`` sends everything at once."""
    if n <= 0:
        return []
    if rate <= 0:
        raise ValueError(f"the request rate must be > 0 (got {rate})")
    times, t = [0.0], 0.0
    for _ in range(n - 1):
        t += 0.0 if math.isinf(rate) else rng.expovariate(rate)
        times.append(t)
    return times


def fit_lengths(prompt_len: int, output_len: int, limits: LengthLimits) -> tuple[int, int]:
    """(prompt, output) lengths cut to the server's limits: at least 1 token each, and the
    prompt shortened (never the output) so that prompt + output <= max_model_len."""
    prompt_len, output_len = max(1, prompt_len), max(1, output_len)
    if limits.max_model_len is not None:
        if output_len >= limits.max_model_len:
            raise ValueError(f"an output of {output_len} tokens cannot fit the server's "
                             f"max_model_len {limits.max_model_len}; lower the output lengths")
        prompt_len = min(prompt_len, limits.max_model_len - output_len)
    return prompt_len, output_len


def random_prompt(length: int, vocab_size: int, rng: random.Random) -> tuple[int, ...]:
    if vocab_size <= FIRST_TOKEN_ID:
        raise ValueError(f"vocab_size {vocab_size} leaves no ids above {FIRST_TOKEN_ID}")
    return tuple(rng.randrange(FIRST_TOKEN_ID, vocab_size) for _ in range(length))


def build(arrivals: Sequence[float], lengths: Sequence[tuple[int, int]],
          limits: LengthLimits, seed: int) -> list[RequestSpec]:
    """Specs from arrival times and (prompt, output) lengths, cut to ``limits``."""
    rng = random.Random(seed ^ 0x5EED)
    specs = []
    for i, (t, (plen, olen)) in enumerate(zip(arrivals, lengths, strict=True)):
        plen, olen = fit_lengths(plen, olen, limits)
        specs.append(RequestSpec(i, t, random_prompt(plen, limits.vocab_size, rng), olen))
    return specs


def synthetic(n: int, rate: float, prompt_range: tuple[int, int],
              output_range: tuple[int, int], limits: LengthLimits,
              seed: int = 0) -> list[RequestSpec]:
    """Poisson arrivals at ``rate`` req/s; lengths uniform in the inclusive ranges."""
    for name, (lo, hi) in (("prompt", prompt_range), ("output", output_range)):
        if not 1 <= lo <= hi:
            raise ValueError(f"{name} length range must satisfy 1 <= A <= B (got {lo} {hi})")
    rng = random.Random(seed)
    arrivals = poisson_arrivals(n, rate, rng)
    lengths = [(rng.randint(*prompt_range), rng.randint(*output_range)) for _ in range(n)]
    return build(arrivals, lengths, limits, seed)


@dataclass(frozen=True)
class TraceScaling:
    """How a trace is shrunk to what the server under test can take."""

    length_scale: float = 1.0  # prompt lengths are multiplied by this (rounded, >= 1)
    output_scale: float = 1.0  # output lengths are multiplied by this (rounded, >= 1)
    time_scale: float = 1.0  # arrival offsets are multiplied by this (> 1: slower)
    rate: float | None = None  # if set: arrivals rescaled to this mean rate (wins over time_scale)
    offset: int = 0  # rows skipped from the start of the trace


def scale_trace(rows: Sequence[tuple[float, int, int]], n: int,
                scaling: TraceScaling) -> tuple[list[float], list[tuple[int, int]]]:
    """Arrivals (relative to the first kept row) and (prompt, output) lengths of ``n`` rows
    of a trace given as (arrival_s, prompt_tokens, output_tokens), sorted by arrival."""
    kept = list(rows[scaling.offset:scaling.offset + n])
    if len(kept) < n:
        raise ValueError(f"the trace has {len(rows)} rows; cannot take {n} from row "
                         f"{scaling.offset}")
    t0 = kept[0][0] if kept else 0.0
    arrivals = [t - t0 for t, _, _ in kept]
    factor = scaling.time_scale
    if scaling.rate is not None and len(kept) > 1 and arrivals[-1] > 0:
        factor = (len(kept) - 1) / scaling.rate / arrivals[-1]  # mean gap becomes 1 / rate
    lengths = [(max(1, round(p * scaling.length_scale)), max(1, round(o * scaling.output_scale)))
               for _, p, o in kept]
    return [a * factor for a in arrivals], lengths


def from_trace(path: str, n: int, scaling: TraceScaling, limits: LengthLimits,
               seed: int = 0) -> list[RequestSpec]:
    """``n`` requests replaying a CSV trace's arrivals and lengths, scaled."""
    from cluster.simulator.trace import load_csv  # the project's one trace reader

    rows = [(r.arrival_s, r.prompt_tokens, r.output_tokens) for r in load_csv(path)]
    arrivals, lengths = scale_trace(rows, n, scaling)
    return build(arrivals, lengths, limits, seed)


def describe(specs: Sequence[RequestSpec]) -> dict:
    """Totals and means of a workload, for reports."""
    if not specs:
        return {"num_requests": 0}
    span = specs[-1].arrival_s - specs[0].arrival_s
    return {
        "num_requests": len(specs),
        "arrival_span_s": span,
        "offered_rate_req_s": (len(specs) - 1) / span if span > 0 else None,
        "prompt_tokens_total": sum(s.prompt_len for s in specs),
        "output_tokens_total": sum(s.output_len for s in specs),
        "prompt_len_mean": sum(s.prompt_len for s in specs) / len(specs),
        "output_len_mean": sum(s.output_len for s in specs) / len(specs),
    }
