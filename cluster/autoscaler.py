"""SLO-driven sizing of the prefill and decode pools.

Pure Python (no torch, no ray). The caller (the live cluster, or the simulator) feeds a
``RollingWindow`` with TTFT and ITL samples and queue / KV-usage gauges, and every
``AutoscalerConfig.interval_s`` calls::

    decisions = autoscaler.decide(now, window.metrics(now, slo.percentile), pool_sizes)

Signals per pool (thresholds from ``AutoscalerConfig`` and ``SLOConfig``):

  prefill  pressure: TTFT pXX > SLO (unless decode is the bottleneck), or waiting requests
                     per prefill worker > queue_per_worker_high
           low load: TTFT pXX < low_watermark * SLO (or no samples) and < 1 waiting / worker
  decode   pressure: ITL pXX > SLO, or KV usage > kv_usage_high, or waiting per decode
                     worker (including requests the scheduler holds for lack of decode room)
                     > queue_per_worker_high
           low load: ITL pXX < low_watermark * SLO (or no samples), KV usage < kv_usage_low,
                     < 1 waiting / worker

Sizing from measured load (when the caller measures it): the prefill pool needs
``ceil(prompt tokens/s arriving / (one worker's prefill speed * target_prefill_utilization))``
workers, the decode pool ``ceil(KV blocks needed / (blocks per worker * target_kv_usage))``.
A pool below that grows to it at once; a pool never shrinks below it. Latency or queue
pressure without such a measurement grows a pool by ``scale_up_fraction`` per cooldown.

Rules that keep it from flapping:
  - after any change a pool waits ``cooldown_s`` before changing again, except that a
    demand-sized scale-up may follow a scale-up after ``scale_up_cooldown_s`` (catching up
    with a surge); so no decision is ever reversed within ``cooldown_s``;
  - growing needs pressure (or measured need) now; shrinking needs low load held for
    ``scale_down_stable_s`` and a projected utilisation under target after the shrink;
    between the two thresholds (hysteresis band) nothing happens;
  - targets stay within [min, max] of each pool and under ``max_total_replicas``.

Role change: when one pool is under pressure and the other has held low load (or the GPU
budget is reached and the other pool is not under pressure), one worker moves: a single
``ScalingDecision`` with ``from_pool`` set, meaning "drain one worker of ``from_pool``, then
restart it in ``pool``" (``from_pool`` shrinks by one, ``pool`` grows by one).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass

from cluster.policy_config import AutoscalerConfig, SLOConfig

POOLS = ("prefill", "decode")


@dataclass(frozen=True)
class WindowMetrics:
    """What the autoscaler sees of the last ``window_s`` seconds."""

    ttft_p: float | None = None
    """TTFT at the SLO percentile, seconds (None: no request got its first token)."""
    itl_p: float | None = None
    """Inter-token latency at the SLO percentile, seconds (None: no tokens)."""
    prefill_queue_per_worker: float = 0.0
    """Mean requests waiting to start prefill, per prefill worker."""
    decode_queue_per_worker: float = 0.0
    """Mean requests waiting for a decode slot (on decode workers, or held by the scheduler
    for lack of decode room), per decode worker."""
    decode_kv_usage: float = 0.0
    """Mean fraction of decode KV blocks in use or reserved, in [0, 1]."""
    prefill_utilization: float | None = None
    """Mean fraction of prefill workers busy, in [0, 1] (None: not measured)."""
    prefill_demand_tokens_per_s: float | None = None
    """Prompt tokens arriving per second (None: not measured)."""
    prefill_tokens_per_s_per_worker: float | None = None
    """Measured prefill speed of one worker (None: not measured)."""
    decode_demand_blocks: float | None = None
    """KV blocks decode needs: used + reserved on decode workers, plus the prompt blocks of
    requests waiting for decode room (None: not measured)."""
    decode_blocks_per_worker: float | None = None
    """KV blocks of one decode worker (None: not measured)."""


@dataclass(frozen=True)
class ScalingDecision:
    pool: str
    """"prefill" or "decode": the pool whose size changes."""
    current: int
    """Replicas the pool had when deciding."""
    target: int
    """Replicas wanted; within [min, max] of the pool."""
    reason: str
    """Human-readable cause (logged and exported as a metric label)."""
    from_pool: str | None = None
    """Set for a role change: ``target == current + 1`` and the replica comes from draining
    one worker of ``from_pool`` (which shrinks by one) instead of a new one."""

    @property
    def delta(self) -> int:
        return self.target - self.current


def held_for_decode(decode_kv_usage: float, config: AutoscalerConfig) -> bool:
    """Whether requests the scheduler holds (no placement fits) are decode demand: when
    decode KV is within 5 points of ``kv_usage_high`` the missing room is decode's, else
    prefill's. The live loop and the simulator attribute held requests with this."""
    return decode_kv_usage >= config.kv_usage_high - 0.05


class RollingWindow:
    """Time-stamped samples over the last ``window_s`` seconds; weighted percentiles."""

    GAUGES = (
        "prefill_queue_per_worker", "decode_queue_per_worker", "decode_kv_usage",
        "prefill_utilization", "prefill_tokens_per_s_per_worker", "decode_demand_blocks",
        "decode_blocks_per_worker",
    )
    OPTIONAL = GAUGES[3:]  # None when never sampled

    def __init__(self, window_s: float, rate_window_s: float = 15.0) -> None:
        self.window_s = window_s
        self.rate_window_s = min(rate_window_s, window_s)
        """Arrival rates (prefill demand) are measured over this shorter, more recent span."""
        self._ttft: deque[tuple[float, float, float]] = deque()
        self._itl: deque[tuple[float, float, float]] = deque()
        self._gauges: dict[str, deque[tuple[float, float, float]]] = {
            g: deque() for g in self.GAUGES
        }
        self._demand: deque[tuple[float, float, float]] = deque()
        self._first_t: float | None = None

    def add_ttft(self, t: float, value: float) -> None:
        self._ttft.append((t, value, 1.0))

    def add_itl(self, t: float, value: float, weight: float = 1.0) -> None:
        """An inter-token latency seen ``weight`` times (e.g. one decode step of a batch)."""
        self._itl.append((t, value, weight))

    def add_gauge(self, name: str, t: float, value: float) -> None:
        self._gauges[name].append((t, value, 1.0))

    def add_arrival(self, t: float, prompt_tokens: int) -> None:
        """A request arrived (its prompt tokens count toward the prefill demand)."""
        if self._first_t is None:
            self._first_t = t
        self._demand.append((t, float(prompt_tokens), 1.0))

    def _prune(self, now: float) -> None:
        horizon = now - self.window_s
        for q in (self._ttft, self._itl, self._demand, *self._gauges.values()):
            while q and q[0][0] < horizon:
                q.popleft()

    def metrics(self, now: float, percentile: float) -> WindowMetrics:
        self._prune(now)
        gauges: dict[str, float | None] = {}
        for name, q in self._gauges.items():
            default = None if name in self.OPTIONAL else 0.0
            gauges[name] = sum(v for _, v, _ in q) / len(q) if q else default
        demand = None
        if self._first_t is not None:
            span = min(self.rate_window_s, now - self._first_t)
            recent = sum(v for t, v, _ in self._demand if t >= now - span)
            demand = recent / span if span > 0 else None
        return WindowMetrics(
            ttft_p=weighted_percentile(self._ttft, percentile),
            itl_p=weighted_percentile(self._itl, percentile),
            prefill_demand_tokens_per_s=demand,
            **gauges,  # type: ignore[arg-type]
        )


def weighted_percentile(
    samples: deque[tuple[float, float, float]] | list[tuple[float, float, float]], pct: float
) -> float | None:
    """Percentile of (time, value, weight) samples: the smallest value whose cumulative
    weight reaches ``pct`` percent of the total. None when empty."""
    if not samples:
        return None
    ordered = sorted((v, w) for _, v, w in samples)
    total = sum(w for _, w in ordered)
    goal = total * pct / 100.0
    acc = 0.0
    for v, w in ordered:
        acc += w
        if acc >= goal:
            return v
    return ordered[-1][0]


class Autoscaler:
    def __init__(
        self,
        config: AutoscalerConfig | None = None,
        slo: SLOConfig | None = None,
        gpus_per_worker: Mapping[str, int] | None = None,
    ):
        self.config = config or AutoscalerConfig()
        self.slo = slo or SLOConfig()
        self.gpus_per_worker = {p: 1 for p in POOLS} | dict(gpus_per_worker or {})
        """GPUs one worker of each pool takes (its tensor-parallel size): pools are sized in
        workers, the budget ``max_total_replicas`` counts GPUs; a role change moves a worker
        only between pools of one size."""
        self._last_change: dict[str, tuple[float, bool]] = {}  # pool -> (time, was a scale-up)
        self._low_since: dict[str, float | None] = {p: None for p in POOLS}

    def _bounds(self, pool: str) -> tuple[int, int]:
        c = self.config
        return (c.min_prefill, c.max_prefill) if pool == "prefill" else (c.min_decode, c.max_decode)

    def _signals(self, m: WindowMetrics) -> dict[str, tuple[str | None, bool]]:
        """pool -> (pressure reason or None, low load now)."""
        c, slo, low = self.config, self.slo, self.config.low_watermark
        d_reason = None
        if m.itl_p is not None and m.itl_p > slo.itl_s:
            d_reason = f"ITL p{slo.percentile:g} {m.itl_p * 1e3:.0f} ms > {slo.itl_s * 1e3:.0f} ms"
        elif m.decode_kv_usage > c.kv_usage_high:
            d_reason = f"decode KV usage {m.decode_kv_usage:.0%} > {c.kv_usage_high:.0%}"
        elif m.decode_queue_per_worker > c.queue_per_worker_high:
            d_reason = f"{m.decode_queue_per_worker:.1f} waiting per decode worker"
        p_reason = None
        if m.prefill_queue_per_worker > c.queue_per_worker_high:
            p_reason = f"{m.prefill_queue_per_worker:.1f} waiting per prefill worker"
        elif m.ttft_p is not None and m.ttft_p > slo.ttft_s and d_reason is None:
            p_reason = f"TTFT p{slo.percentile:g} {m.ttft_p:.2f} s > {slo.ttft_s:.2f} s"
        p_low = (m.ttft_p is None or m.ttft_p < low * slo.ttft_s) and (
            m.prefill_queue_per_worker < 1.0
        )
        d_low = (
            (m.itl_p is None or m.itl_p < low * slo.itl_s)
            and m.decode_kv_usage < c.kv_usage_low
            and m.decode_queue_per_worker < 1.0
        )
        return {"prefill": (p_reason, p_low), "decode": (d_reason, d_low)}

    def _needed(self, m: WindowMetrics, sizes: dict[str, int]) -> dict[str, int | None]:
        """Replicas the measured load needs at the target utilisation (None: unknown)."""
        c = self.config
        prefill = None
        if m.prefill_demand_tokens_per_s is not None and m.prefill_tokens_per_s_per_worker:
            per_worker = m.prefill_tokens_per_s_per_worker * c.target_prefill_utilization
            prefill = math.ceil(m.prefill_demand_tokens_per_s / per_worker)
        decode = None
        if m.decode_demand_blocks is not None and m.decode_blocks_per_worker:
            per_worker = m.decode_blocks_per_worker * c.target_kv_usage
            decode = math.ceil(m.decode_demand_blocks / per_worker)
        return {"prefill": prefill, "decode": decode}

    def _ready(self, pool: str, now: float, up: bool) -> bool:
        """Cooldown: ``scale_up_cooldown_s`` between two scale-ups, ``cooldown_s`` otherwise."""
        last = self._last_change.get(pool)
        if last is None:
            return True
        t, was_up = last
        c = self.config
        gap = min(c.scale_up_cooldown_s, c.cooldown_s) if (up and was_up) else c.cooldown_s
        return now - t >= gap

    def _low_held(self, pool: str, now: float) -> bool:
        since = self._low_since[pool]
        return since is not None and now - since >= self.config.scale_down_stable_s

    def decide(
        self, now: float, window_metrics: WindowMetrics, pool_sizes: Mapping[str, int]
    ) -> list[ScalingDecision]:
        """Decisions to apply now (empty: keep sizes). ``pool_sizes`` counts each pool's
        replicas including ones starting up, excluding ones draining away."""
        if not self.config.enabled:
            return []
        m = window_metrics
        signals = self._signals(m)
        for pool, (reason, low) in signals.items():
            if reason is not None or not low:
                self._low_since[pool] = None
            elif self._low_since[pool] is None:
                self._low_since[pool] = now
        sizes = {p: int(pool_sizes.get(p, 0)) for p in POOLS}
        decisions = self._clamp(sizes, now)
        if decisions:
            return decisions
        needed = self._needed(m, sizes)
        for pool, other in (("prefill", "decode"), ("decode", "prefill")):
            reason, want = signals[pool][0], needed[pool]
            if want is not None and want > sizes[pool] and self._ready(pool, now, up=True):
                # measured demand: may follow a scale-up after scale_up_cooldown_s
                reason = f"measured load needs {want} {pool} workers" + (
                    f" ({reason})" if reason else "")
            elif reason is None or not self._ready(pool, now, up=False):
                continue  # latency/queue pressure alone waits the full cooldown (backlogs
                # outlive the start-up of workers already added)
            else:
                want = None
            decision = self._grow(pool, other, reason, sizes, signals, want, now)
            if decision is not None:
                return [decision]
        for pool in POOLS:
            decision = self._shrink(pool, m, sizes, needed[pool], now)
            if decision is not None:
                return [decision]
        return []

    def _shrink(
        self, pool: str, m: WindowMetrics, sizes: dict[str, int], want: int | None, now: float
    ) -> ScalingDecision | None:
        c, cur = self.config, sizes[pool]
        lo, _ = self._bounds(pool)
        if cur <= lo or not self._low_held(pool, now) or not self._ready(pool, now, up=False):
            return None
        target = max(lo, cur - c.scale_down_step)
        if want is not None and want > target:
            return None  # the smaller pool could not carry the measured load
        if pool == "prefill" and m.prefill_utilization is not None:
            if m.prefill_utilization * cur / target > c.target_prefill_utilization:
                return None
        return self._record(ScalingDecision(pool, cur, target, "low load"), now)

    def _clamp(self, sizes: dict[str, int], now: float) -> list[ScalingDecision]:
        out = []
        for pool in POOLS:
            lo, hi = self._bounds(pool)
            if not lo <= sizes[pool] <= hi:
                target = min(max(sizes[pool], lo), hi)
                out.append(self._record(ScalingDecision(pool, sizes[pool], target, "bounds"), now))
        return out

    def _grow(
        self,
        pool: str,
        other: str,
        reason: str,
        sizes: dict[str, int],
        signals: dict[str, tuple[str | None, bool]],
        want: int | None,
        now: float,
    ) -> ScalingDecision | None:
        c = self.config
        cur = sizes[pool]
        _, hi = self._bounds(pool)
        if cur >= hi:
            return None
        step = max(1, math.ceil(cur * c.scale_up_fraction))
        target = min(hi, max(cur + step, want or 0))
        g = self.gpus_per_worker
        room = (
            (c.max_total_replicas - sizes[other] * g[other] - cur * g[pool]) // g[pool]
            if c.max_total_replicas else None
        )
        other_lo, _ = self._bounds(other)
        can_move = (
            c.allow_role_change
            and g[pool] == g[other]
            and sizes[other] > other_lo
            and self._ready(other, now, up=False)
            and signals[other][0] is None
        )
        if can_move and (self._low_held(other, now) or (room is not None and room <= 0)):
            decision = ScalingDecision(pool, cur, cur + 1, f"{reason}; moved from {other}", other)
            return self._record(decision, now)
        if room is not None:
            target = min(target, cur + room)
            if target <= cur:
                return None
        return self._record(ScalingDecision(pool, cur, target, reason), now)

    def _record(self, decision: ScalingDecision, now: float) -> ScalingDecision:
        self._last_change[decision.pool] = (now, decision.target > decision.current)
        self._low_since[decision.pool] = None
        if decision.from_pool is not None:
            self._last_change[decision.from_pool] = (now, False)
            self._low_since[decision.from_pool] = None
        return decision
