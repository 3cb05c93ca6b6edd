"""The autoscaler, live: every interval, window metrics → Autoscaler.decide → pool changes.

The decision logic is ``cluster.autoscaler.Autoscaler`` (pure, shared with the simulator);
this module only measures the live cluster and applies decisions: scale-up creates Ray
actors (on KubeRay, pending actor resources make the Ray autoscaler add GPU nodes),
scale-down drains first so no request is lost, and a role change drains a worker of one
pool and starts one in the other. A pool whose lost worker is being replaced does not grow
until the replacement is in (``Cluster.replacement_pending``).

The unit is a worker: a tensor-parallel worker of N devices is one replica of its pool and N
devices of the budget ``max_total_replicas`` (``devices_per_worker``, from the pool config).
"""

from __future__ import annotations

import asyncio
import logging
import statistics
import time
from collections.abc import Callable, Mapping

from cluster.autoscaler import Autoscaler, RollingWindow, ScalingDecision, held_for_decode
from cluster.policy_config import AutoscalerConfig, SLOConfig

log = logging.getLogger(__name__)


def devices_per_worker(cluster_config) -> dict[str, int]:
    """pool -> the devices one of its workers occupies: its tensor-parallel size (a worker
    of a TP=N pool is N GPUs, or N CPU ranks)."""
    return {role: getattr(cluster_config, role).tensor_parallel_size
            for role in ("prefill", "decode")}


class AutoscalingLoop:
    def __init__(self, cluster, config: AutoscalerConfig, slo: SLOConfig,
                 on_decision: Callable[[ScalingDecision], None] | None = None,
                 gpus_per_worker: Mapping[str, int] | None = None) -> None:
        """``gpus_per_worker``: default, ``devices_per_worker`` of the cluster's pool config
        (a stand-in cluster without one counts one device per worker)."""
        self.cluster = cluster
        self.config = config
        self.slo = slo
        cluster_config = getattr(cluster, "config", None)
        if gpus_per_worker is None and cluster_config is not None:
            gpus_per_worker = devices_per_worker(cluster_config)
        self.autoscaler = Autoscaler(config, slo, gpus_per_worker)
        self.window = RollingWindow(config.window_s)
        cluster.backend.window = self.window
        self.on_decision = on_decision
        self.history: list[tuple[float, ScalingDecision]] = []
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        if self._task is None and self.config.enabled:
            self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.config.interval_s)  # the decision period itself
            try:
                await self.tick()
            except Exception:  # a failed scale step is logged; the next tick retries
                log.exception("autoscaler tick failed")

    def sizes(self) -> dict[str, int]:
        return {p: self.cluster.replicas(p, include_starting=True) for p in ("prefill", "decode")}

    async def tick(self) -> list[ScalingDecision]:
        now = time.time()
        self._sample_gauges(now)
        metrics = self.window.metrics(now, self.slo.percentile)
        decisions = [d for d in self.autoscaler.decide(now, metrics, self.sizes())
                     if not self._held_for_replacement(d)]
        for decision in decisions:
            log.info("autoscaler: %s %d -> %d (%s)", decision.pool, decision.current,
                     decision.target, decision.reason)
            self.history.append((now, decision))
            if self.on_decision is not None:
                self.on_decision(decision)
            await self._apply(decision)
        return decisions

    def _held_for_replacement(self, decision: ScalingDecision) -> bool:
        """A pool does not grow while a lost worker of it is being replaced: the replacement
        goes first (and already counts in the pool's size)."""
        if decision.delta <= 0 or not self.cluster.replacement_pending(decision.pool):
            return False
        log.info("autoscaler: not growing %s (%s): a lost worker's replacement is pending",
                 decision.pool, decision.reason)
        return True

    async def _apply(self, decision: ScalingDecision) -> None:
        if decision.from_pool is not None:
            await self.cluster.scale(decision.from_pool, -1)
            await self.cluster.scale(decision.pool, +1)
        elif decision.delta:
            await self.cluster.scale(decision.pool, decision.delta)

    def _sample_gauges(self, now: float) -> None:
        stats = list(self.cluster.backend.last_stats.values())
        by_role = {r: [s for s in stats if s.role == r] for r in ("prefill", "decode")}
        prefill, decode = by_role["prefill"], by_role["decode"]
        # Requests the scheduler holds count for the pool that lacks room (as in the
        # simulator): decode's when its KV is nearly full, else prefill's.
        kv = statistics.fmean(s.kv_usage for s in decode) if decode else 0.0
        queued = self.cluster.scheduler.queue_length
        decode_full = bool(decode) and held_for_decode(kv, self.config)
        held_p, held_d = (0, queued) if decode_full else (queued, 0)
        w = self.window
        if prefill:
            w.add_gauge("prefill_queue_per_worker", now,
                        (sum(s.num_waiting for s in prefill) + held_p) / len(prefill))
            busy = sum(1 for s in prefill if s.num_running + s.num_waiting > 0)
            w.add_gauge("prefill_utilization", now, busy / len(prefill))
            speeds = [s.prefill_tokens_per_s for s in prefill if s.prefill_tokens_per_s > 0]
            if speeds:
                w.add_gauge("prefill_tokens_per_s_per_worker", now, statistics.fmean(speeds))
        if decode:
            w.add_gauge("decode_queue_per_worker", now,
                        (sum(s.num_waiting for s in decode) + held_d) / len(decode))
            w.add_gauge("decode_kv_usage", now, kv)
            # Demand sizing (as the simulator does): blocks in use or reserved, plus the
            # prompts held for lack of decode room.
            held_blocks = self.cluster.scheduler.queued_prompt_blocks() if decode_full else 0
            w.add_gauge("decode_demand_blocks", now,
                        sum(s.total_blocks - s.free_blocks for s in decode) + held_blocks)
            w.add_gauge("decode_blocks_per_worker", now,
                        statistics.fmean(s.total_blocks for s in decode))
