"""Token delivery: do clients see tokens at the pace the decode workers make them?

A decode worker makes one token per running request per engine step, so a reader of one
stream should see a gap of about one step between consecutive tokens. Tokens held back and
delivered together show up as near-zero gaps (bursts) and a median gap well below a step.
For a launched cluster (``--launch``, ``--compare``) the benchmark puts side by side, on
the same run:

- the decode workers' median step cadence: ``WorkerStats.step_interval_p50_s`` (the median
  time from one engine step's start to the next's, weighted by decoding streams, over each
  worker's last 512 steps: what a stream's gap should be; ``step_time_p50_s``, the step's own
  compute, leaves out the loop's work between steps), sampled by ``StepProbe`` from the
  router's newest stats
  (``ClusterBackend.last_stats``, refreshed every 0.5 s) while the measured requests run; the
  median of those samples;
- the client's inter-token gaps as they arrived (``RequestResult.arrival_gaps_s``: tokens of
  one chunk count as zero gaps), their median and the fraction under 10 % of a step.

The probe only reads what the router already collected: calling a worker's ``stats`` itself
would take the prefix-cache events the global scheduler is owed.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Sequence
from dataclasses import dataclass

from app.loadgen.stats import RequestResult, percentile

BURST_FRACTION_OF_STEP = 0.1  # a gap under this fraction of a step is a burst
GOAL_RATIO = 0.2  # goal: client ITL p50 within 20 % of the step median
GOAL_BURSTS = 0.05  # goal: fewer than 5 % of gaps are bursts
STEPPING_ROLES = ("decode", "colocated")


@dataclass(frozen=True)
class StepSample:
    """One decode worker's report, as the probe read it."""

    t: float  # time.perf_counter() when read
    worker_id: str
    step_s: float  # the worker's step_time_p50_s
    running: int  # requests in its running batch then


class StepProbe:
    """Samples the decode workers' median step time from ``backend.last_stats`` (any object
    with a ``last_stats`` dict of WorkerStats) every ``interval_s`` until stopped; a report
    is kept once (by its timestamp)."""

    def __init__(self, backend, interval_s: float = 0.25) -> None:
        self.backend = backend
        self.interval_s = interval_s
        self.samples: list[StepSample] = []
        self._seen: set[tuple[str, float]] = set()
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> list[StepSample]:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self.sample()  # the newest report too
        return self.samples

    async def _run(self) -> None:
        while True:
            self.sample()
            await asyncio.sleep(self.interval_s)

    def sample(self) -> None:
        now = time.perf_counter()
        for wid, st in list(self.backend.last_stats.items()):
            key = (wid, st.timestamp)
            if st.role in STEPPING_ROLES and key not in self._seen:
                self._seen.add(key)
                step = st.step_interval_p50_s or st.step_time_p50_s
                self.samples.append(StepSample(now, wid, step, st.num_running))


def steps_in_window(samples: Sequence[StepSample], window: tuple[float, float]) -> list[float]:
    """The step medians reported inside ``window`` (perf_counter seconds) by a worker that
    was decoding (some request running, at least one step made)."""
    lo, hi = window
    return [s.step_s for s in samples if lo <= s.t <= hi and s.running > 0 and s.step_s > 0]


def delivery(results: Sequence[RequestResult], steps_s: Sequence[float]) -> dict | None:
    """Client gaps vs the workers' step time (JSON-ready); None without step samples."""
    step = percentile(steps_s, 50)
    gaps = [g for r in results if r.ok for g in r.arrival_gaps_s]
    if not step or not gaps:
        return None
    itl = percentile(gaps, 50)
    bursts = sum(1 for g in gaps if g < BURST_FRACTION_OF_STEP * step) / len(gaps)
    ratio = itl / step
    return {
        "step_p50_ms": step * 1e3,
        "step_samples": len(steps_s),
        "client_itl_p50_ms": itl * 1e3,
        "client_itl_p90_ms": percentile(gaps, 90) * 1e3,
        "itl_over_step": ratio,
        "gaps": len(gaps),
        "gaps_under_10pct_step": bursts,
        "goal": f"ratio within 1 +- {GOAL_RATIO:g}, under {GOAL_BURSTS:.0%} of gaps < "
                f"{BURST_FRACTION_OF_STEP:.0%} of a step",
        "goal_met": abs(ratio - 1) <= GOAL_RATIO and bursts < GOAL_BURSTS,
    }


def text(d: dict | None) -> str:
    """One line for the report table."""
    if d is None:
        return "token delivery: no decode step times reported during the run"
    return (f"token delivery: client ITL p50 {d['client_itl_p50_ms']:.2f} ms vs decode step "
            f"p50 {d['step_p50_ms']:.2f} ms (ratio {d['itl_over_step']:.2f}); "
            f"{d['gaps_under_10pct_step'] * 100:.1f}% of {d['gaps']} gaps < 10% of a step "
            f"(goal: {d['goal']}: {'met' if d['goal_met'] else 'MISSED'})")
