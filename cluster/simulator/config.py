"""``SimConfig``: the simulated cluster (pydantic, frozen; loadable from YAML or JSON)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

from cluster.policy_config import AutoscalerConfig, SchedulerConfig, SLOConfig


class SimConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    mode: Literal["disaggregated", "colocated"] = Field(
        "disaggregated",
        description="disaggregated: prefill and decode pools with KV transfer; colocated: "
        "every worker runs chunked prefill and decode in one batch (the baseline).",
    )
    num_prefill: int = Field(2, ge=0, description="Prefill workers at start (disaggregated).")
    num_decode: int = Field(2, ge=0, description="Decode workers at start (disaggregated).")
    num_colocated: int = Field(4, ge=0, description="Workers at start (colocated).")
    hardware: str = Field(
        "H100", description="H100 | H200 | A100 (profile from specs) or a profile JSON path."
    )
    model: str = Field("llama-3-8b", description="Model spec name (see profiles.MODELS).")
    tp: int = Field(1, ge=1, description="GPUs per worker (tensor parallel), for pools "
                    "without their own size below.")
    prefill_tp: int | None = Field(
        None, ge=1, description="GPUs per prefill worker (None: tp)."
    )
    decode_tp: int | None = Field(
        None, ge=1, description="GPUs per decode worker (None: tp)."
    )
    prefill_chunk_tokens: int = Field(
        8192, gt=0, description="Token budget of one prefill-worker step (chunked prefill)."
    )
    colocated_chunk_tokens: int = Field(
        512, gt=0, description="Token budget of one colocated step (decodes + prefill chunk)."
    )
    decode_max_num_seqs: int = Field(
        256, gt=0, description="Running-batch cap of decode and colocated workers."
    )
    prefill_max_num_seqs: int = Field(64, gt=0, description="Requests per prefill step, at most.")
    kv_capacity_tokens: int = Field(
        0, ge=0, description="KV cache size per worker in tokens; 0 = from the profile."
    )
    startup_s: float = Field(60.0, ge=0, description="Time for a new worker to become ready.")
    role_change_s: float = Field(
        15.0, ge=0, description="Time for a drained worker to come back in its new role."
    )
    scheduler: SchedulerConfig = Field(default_factory=SchedulerConfig)
    autoscaler: AutoscalerConfig | None = Field(
        None, description="Autoscaler settings; None keeps pool sizes fixed."
    )
    slo: SLOConfig = Field(default_factory=SLOConfig)
    gauge_interval_s: float = Field(
        2.0, gt=0, description="How often queue lengths / KV usage are sampled for autoscaling."
    )
    timeline_interval_s: float = Field(
        10.0, gt=0, description="Resolution of the replicas/attainment timeline in the output."
    )

    @model_validator(mode="after")
    def _check(self) -> SimConfig:
        if self.mode == "disaggregated" and (self.num_prefill < 1 or self.num_decode < 1):
            raise ValueError("disaggregated mode needs num_prefill >= 1 and num_decode >= 1")
        if self.mode == "colocated" and self.num_colocated < 1:
            raise ValueError("colocated mode needs num_colocated >= 1")
        return self

    def tp_of(self, role: str) -> int:
        """GPUs per worker of ``role`` (the autoscaler's and the GPU budget's unit)."""
        own = {"prefill": self.prefill_tp, "decode": self.decode_tp}.get(role)
        return own or self.tp

    @property
    def num_gpus(self) -> int:
        if self.mode == "disaggregated":
            return self.num_prefill * self.tp_of("prefill") + self.num_decode * self.tp_of("decode")
        return self.num_colocated * self.tp

    @classmethod
    def load(cls, path: str | Path) -> SimConfig:
        text = Path(path).read_text()
        data = json.loads(text) if str(path).endswith(".json") else yaml.safe_load(text)
        return cls.model_validate(data or {})
