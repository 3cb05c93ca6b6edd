"""Configuration of placement, admission, SLOs and autoscaling (pydantic, frozen).

Three standalone models that the pool config composes: ``SLOConfig`` (the targets),
``SchedulerConfig`` (the global scheduler) and ``AutoscalerConfig`` (pool sizing). Every
field has a default and a description; the objects are validated once and never mutated.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class SLOConfig(_Frozen):
    ttft_s: float = Field(0.5, gt=0, description="Time-to-first-token target, seconds.")
    itl_s: float = Field(0.05, gt=0, description="Inter-token latency target, seconds.")
    percentile: float = Field(
        90.0, gt=0, le=100, description="Percentile at which both targets must hold (p90)."
    )


class SchedulerConfig(_Frozen):
    policy: str = Field(
        "kv_aware",
        description="Placement policy: a name in cluster.placement.POLICIES "
        "(round_robin, least_loaded, kv_aware).",
    )
    block_size: int = Field(
        16, gt=0, description="Tokens per KV block; must equal the workers' block size."
    )
    max_queued_prefill_tokens: int = Field(
        32768,
        gt=0,
        description="A prefill worker takes a request only while its prefill backlog plus the "
        "request's uncached tokens stays under this (an idle worker takes any prompt).",
    )
    decode_free_blocks_watermark: float = Field(
        0.05,
        ge=0,
        lt=1,
        description="Fraction of a decode worker's blocks kept free for running requests' "
        "growth: placement needs prompt blocks + this headroom free.",
    )
    local_prefill_threshold_tokens: int = Field(
        0,
        ge=0,
        description="Conditional disaggregation: a prompt whose part not cached on the decode "
        "worker is at most this many tokens is prefilled there (no transfer). 0 disables.",
    )
    local_prefill_max_queued_tokens: int = Field(
        2048,
        ge=0,
        description="A decode worker prefills locally only while its own prefill backlog is "
        "at most this many tokens (protects its running decodes' ITL).",
    )
    max_decode_partners_per_prefill: int = Field(
        0,
        ge=0,
        description="Bound on distinct decode workers a prefill worker sends KV to (each pair "
        "holds an NCCL communicator). 0 = unbounded.",
    )
    admission_queue_size: int = Field(
        1024,
        ge=0,
        description="Requests that may wait in the scheduler when no placement fits; beyond "
        "this, place() refuses with ResourceExhaustedError. 0 = refuse at once.",
    )
    admission_queue_timeout_s: float = Field(
        30.0, gt=0, description="A request waiting longer than this in the queue is refused."
    )


class AutoscalerConfig(_Frozen):
    enabled: bool = Field(True, description="When false, decide() never changes anything.")
    interval_s: float = Field(10.0, gt=0, description="How often the caller runs decide().")
    window_s: float = Field(60.0, gt=0, description="Length of the rolling metrics window.")
    # In a cluster config the pools' min/max_replicas set these (ClusterConfig refuses a
    # different value written here); the simulator and the tests set them directly.
    min_prefill: int = Field(1, ge=0, description="Fewest prefill replicas.")
    max_prefill: int = Field(64, ge=0, description="Most prefill replicas.")
    min_decode: int = Field(1, ge=0, description="Fewest decode replicas.")
    max_decode: int = Field(64, ge=0, description="Most decode replicas.")
    max_total_replicas: int = Field(
        0, ge=0, description="GPU budget over both pools (0 = none); at the budget a pool can "
        "only grow by taking an idle worker from the other (role change)."
    )
    cooldown_s: float = Field(
        60.0, ge=0, description="Minimum time between two changes of the same pool, except "
        "between two scale-ups (see scale_up_cooldown_s): no decision is reversed sooner."
    )
    scale_up_cooldown_s: float = Field(
        20.0, ge=0, description="Minimum time between two demand-sized scale-ups of the same "
        "pool (capped at cooldown_s)."
    )
    target_prefill_utilization: float = Field(
        0.7, gt=0, le=1, description="Prefill busy fraction to size for: with a measured "
        "prefill demand the pool wants ceil(demand / (speed per worker * this)) workers, and "
        "it shrinks only if the projected utilisation stays under this."
    )
    target_kv_usage: float = Field(
        0.7, gt=0, le=1, description="Decode KV usage to size for (same rule as above)."
    )
    scale_down_stable_s: float = Field(
        120.0, ge=0, description="A pool shrinks only after its low-load signal held this long."
    )
    scale_up_fraction: float = Field(
        0.25, gt=0, description="A scale-up adds at least max(1, ceil(replicas * this)) "
        "replicas (more when the measured demand asks for more)."
    )
    scale_down_step: int = Field(1, ge=1, description="Replicas removed per scale-down.")
    low_watermark: float = Field(
        0.5, gt=0, lt=1, description="Hysteresis: a latency below this fraction of its SLO "
        "(and quiet queues) counts as low load; above 1.0x counts as pressure."
    )
    queue_per_worker_high: float = Field(
        4.0, ge=0, description="Waiting requests per worker that count as pressure."
    )
    kv_usage_high: float = Field(
        0.9, gt=0, le=1, description="Decode KV usage that counts as pressure."
    )
    kv_usage_low: float = Field(
        0.5, ge=0, lt=1, description="Decode KV usage below which decode may shrink."
    )
    allow_role_change: bool = Field(
        True, description="Grow a pool by draining an idle worker of the other pool when the "
        "other pool is at low load (or the budget is reached)."
    )

    @model_validator(mode="after")
    def _check_bounds(self) -> AutoscalerConfig:
        if self.min_prefill > self.max_prefill or self.min_decode > self.max_decode:
            raise ValueError("min replicas must not exceed max replicas")
        if self.kv_usage_low >= self.kv_usage_high:
            raise ValueError("kv_usage_low must be below kv_usage_high")
        return self
