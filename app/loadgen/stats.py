"""Per-request latencies and the benchmark's summary: percentiles, throughput, goodput.

Definitions (client-side clocks; seconds internally, milliseconds in summaries):

- TTFT: send → first chunk carrying a token.
- ITL: every gap between consecutive tokens, pooled over all requests. The server coalesces
  tokens per engine step, so a chunk may carry k > 1 tokens; its gap since the previous chunk
  is spread evenly over its k tokens (k samples of gap / k), as SGLang's bench_serving does.
  Extra tokens in the first chunk add no sample.
- Arrival gaps: the same gaps without the spreading: a chunk of k tokens is one gap then
  k − 1 zeros (its tokens arrived together), extra tokens of the first chunk are zeros. What
  a reader of the stream sees; bursts show up here as near-zero gaps.
- TPOT: per request, (E2E − TTFT) / (output tokens − 1); requests of one token have none.
- E2E: send → final chunk.
- Throughput: completed requests (and their output tokens) / duration, where duration runs
  from the first send to the last completion.
- Goodput: requests that completed AND met both SLOs / duration. A request meets the ITL SLO
  when its ``itl_stat`` (default: TPOT, the mean gap, as DistServe defines it) is within
  ``itl_s``; one-token requests meet it trivially.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

from cluster.backend import MIGRATION_COUNT

PERCENTILES = (50, 90, 99)
ITL_STATS = ("tpot", "p90", "p99", "max")


@dataclass
class RequestResult:
    """What one request did, as the client saw it."""

    index: int  # the RequestSpec's index
    prompt_len: int  # tokens sent
    output_len: int  # tokens asked for (max_tokens, ignore_eos)
    sent_s: float  # send time, seconds after the benchmark started
    ok: bool = False  # finished with finish_reason "length" or "stop"
    error: str | None = None  # why not ok: "CODE: message", "timeout", "not sent", ...
    ttft_s: float | None = None
    e2e_s: float | None = None
    itl_s: list[float] = field(default_factory=list)  # per-token gaps, see the module doc
    arrival_gaps_s: list[float] = field(default_factory=list)  # unspread, see the module doc
    output_tokens: int = 0  # tokens received
    finish_reason: str | None = None
    timing: dict[str, float] | None = None  # the server's phase breakdown (final chunk), s

    @property
    def tpot_s(self) -> float | None:
        if self.ttft_s is None or self.e2e_s is None or self.output_tokens < 2:
            return None
        return (self.e2e_s - self.ttft_s) / (self.output_tokens - 1)


@dataclass(frozen=True)
class SLO:
    ttft_s: float = 0.5  # time-to-first-token target (the pool config's default)
    itl_s: float = 0.05  # inter-token target (the pool config's default)
    itl_stat: str = "tpot"  # the per-request number held to itl_s: one of ITL_STATS

    def __post_init__(self) -> None:
        if self.itl_stat not in ITL_STATS:
            raise ValueError(f"itl_stat must be one of {ITL_STATS}, got {self.itl_stat!r}")


def latencies(start: float, stamps: Sequence[tuple[float, int]]) -> tuple[float | None, list]:
    """(TTFT, per-token ITL gaps) from the arrival ``(time, num_tokens)`` of each chunk.

    Chunks without tokens are ignored; see the module doc for how coalesced chunks count."""
    stamps = [(t, n) for t, n in stamps if n > 0]
    if not stamps:
        return None, []
    gaps: list[float] = []
    for (prev, _), (now, n) in zip(stamps, stamps[1:], strict=False):
        gaps.extend([(now - prev) / n] * n)
    return stamps[0][0] - start, gaps


def arrival_gaps(stamps: Sequence[tuple[float, int]]) -> list[float]:
    """Per-token gaps as they arrived (see the module doc): ``output tokens - 1`` of them."""
    gaps: list[float] = []
    prev = None
    for t, n in stamps:
        if n <= 0:
            continue
        if prev is not None:
            gaps.append(t - prev)
        gaps.extend([0.0] * (n - 1))
        prev = t
    return gaps


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (0..100) with linear interpolation (numpy's default method)."""
    if not values:
        return None
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def distribution_ms(values_s: Sequence[float]) -> dict[str, float | None]:
    """Mean and percentiles of seconds, in milliseconds (None when there are no samples)."""
    out: dict[str, float | None] = {"mean": (sum(values_s) / len(values_s) * 1e3
                                            if values_s else None)}
    for q in PERCENTILES:
        p = percentile(values_s, q)
        out[f"p{q}"] = None if p is None else p * 1e3
    out["count"] = len(values_s)
    return out


def itl_value(r: RequestResult, stat: str) -> float | None:
    """The request's inter-token number that the ITL SLO is checked against."""
    if stat == "tpot":
        return r.tpot_s
    if not r.itl_s:
        return None
    return max(r.itl_s) if stat == "max" else percentile(r.itl_s, float(stat[1:]))


def meets_slo(r: RequestResult, slo: SLO) -> bool:
    if not r.ok or r.ttft_s is None or r.ttft_s > slo.ttft_s:
        return False
    itl = itl_value(r, slo.itl_stat)
    return itl is None or itl <= slo.itl_s


def duration(results: Sequence[RequestResult]) -> float:
    """First send → last completion, seconds (0 when nothing completed)."""
    done = [r.sent_s + r.e2e_s for r in results if r.e2e_s is not None]
    if not done:
        return 0.0
    return max(done) - min(r.sent_s for r in results)


def server_timing_ms(results: Sequence[RequestResult]) -> dict[str, float]:
    """Mean of each phase of the server's timing breakdown over completed requests, ms
    (``migration``: over the requests that migrated; their count is no phase)."""
    sums: Counter = Counter()
    counts: Counter = Counter()
    for r in results:
        for phase, seconds in (r.timing or {}).items() if r.ok else ():
            if phase == MIGRATION_COUNT:
                continue
            sums[phase] += seconds
            counts[phase] += 1
    return {phase: sums[phase] / counts[phase] * 1e3 for phase in sums}


def summarize(results: Sequence[RequestResult], slo: SLO,
              duration_s: float | None = None) -> dict:
    """The benchmark's numbers, JSON-ready; ``duration_s`` defaults to ``duration(results)``."""
    dur = duration(results) if duration_s is None else duration_s
    ok = [r for r in results if r.ok]
    good = [r for r in ok if meets_slo(r, slo)]
    per_s = (lambda x: x / dur) if dur > 0 else (lambda x: 0.0)
    return {
        "num_requests": len(results),
        "completed": len(ok),
        "failed": len(results) - len(ok),
        "errors": dict(Counter(r.error or "unknown" for r in results if not r.ok)),
        "length_mismatch": sum(1 for r in ok if r.output_tokens != r.output_len),
        "duration_s": dur,
        "request_throughput": per_s(len(ok)),
        "output_throughput": per_s(sum(r.output_tokens for r in ok)),
        "input_throughput": per_s(sum(r.prompt_len for r in ok)),
        "goodput": per_s(len(good)),
        "slo_attainment": len(good) / len(results) if results else 0.0,
        "slo": {"ttft_ms": slo.ttft_s * 1e3, "itl_ms": slo.itl_s * 1e3,
                "itl_stat": slo.itl_stat},
        "ttft_ms": distribution_ms([r.ttft_s for r in ok if r.ttft_s is not None]),
        "itl_ms": distribution_ms([g for r in ok for g in r.itl_s]),
        "tpot_ms": distribution_ms([r.tpot_s for r in ok if r.tpot_s is not None]),
        "e2e_ms": distribution_ms([r.e2e_s for r in ok if r.e2e_s is not None]),
        "server_timing_ms": server_timing_ms(results),
    }
