"""The pool config: one YAML file describing a whole deployment, validated once (pydantic).

    model:      where the checkpoint is, dtype, device
    prefill:    replicas, bounds, resources per worker, engine limits
    decode:     same, for the decode pool
    transfer:   KV transfer backend and its timeouts
    scheduler:  global scheduler (placement policy, admission)      (cluster.policy_config)
    autoscaler: pool sizing from SLOs                                (cluster.policy_config)
    slo:        TTFT / ITL targets                                   (cluster.policy_config)
    router:     ports, model name, auth, admission limit
    ray:        cluster address

CLI flags override fields after loading (``with_overrides``); the objects are frozen.
See deploy/examples/pool.yaml for a commented example.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

from cluster.policy_config import AutoscalerConfig, SchedulerConfig, SLOConfig


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class ModelSection(_Frozen):
    path: str = Field("", description="Hugging Face checkpoint directory (config + safetensors).")
    dtype: str = Field("float32", description="float32, float16 or bfloat16.")
    device: str = Field("auto", description="auto (cuda when available), cuda or cpu.")
    name: str = Field("", description="Name clients pass as `model`; default: the folder name.")


class EngineSection(_Frozen):
    block_size: int = Field(16, ge=1, description="Tokens per KV block.")
    max_num_batched_tokens: int = Field(512, ge=1, description="Token budget per step "
                                        "(the chunked-prefill chunk size).")
    max_num_seqs: int = Field(64, ge=1, description="Most requests in the running batch.")
    max_model_len: int = Field(4096, ge=2, description="Longest prompt + output.")
    kv_cache_memory_bytes: int | None = Field(None, gt=0, description="KV budget in bytes; "
                                              "None: a fraction of GPU memory / CPU default.")
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1, description="Share of GPU memory.")
    enforce_eager: bool = Field(False, description="No CUDA graphs: every step runs eagerly "
                                "(CUDA workers only; CPU workers never capture graphs).")
    enable_prefix_caching: bool = Field(True, description="Reuse KV of shared prefixes.")
    kv_cache_dtype: Literal["auto", "fp8_e4m3", "fp8_e5m2"] = Field(
        "auto", description="KV cache element type: auto (the model's dtype) or fp8 (half "
        "the bytes of a 16-bit cache per token, per-tensor scales below). Prefill and "
        "decode pools must agree.")
    k_scale: float = Field(1.0, gt=0, description="fp8 cache: keys are stored as k / k_scale.")
    v_scale: float = Field(1.0, gt=0, description="fp8 cache: values are stored as "
                           "v / v_scale.")
    attention_backend: str | None = Field(None, description="torch, flash_attn, or None "
                                          "(auto: flash_attn when installed on CUDA).")
    num_threads: int | None = Field(None, ge=1, description="torch CPU threads per worker "
                                    "(per rank under tensor parallelism).")
    tensor_parallel_size: int = Field(1, ge=1, description="Devices one worker splits the "
                                      "model over: a group of this many Ray actors on one "
                                      "node, one per GPU (cluster.tp_group). The model's "
                                      "attention heads must divide by it.")
    tp_collective_timeout_s: float = Field(60.0, gt=0, description="Tensor parallelism: "
                                           "longest wait of a step's collective. A rank hung "
                                           "that long (not dead: a dead one is noticed at "
                                           "once) fails the worker, whose requests move to "
                                           "another and whose group is replaced.")

    def engine_options(self, model: ModelSection, device: str) -> dict[str, Any]:
        opts = self.model_dump(exclude={"num_threads", "tp_collective_timeout_s"})
        return {**opts, "dtype": model.dtype, "device": device}


class PoolSection(_Frozen):
    replicas: int = Field(1, ge=0, description="Workers started with the cluster.")
    min_replicas: int = Field(1, ge=0, description="Fewest workers the autoscaler keeps.")
    max_replicas: int = Field(8, ge=0, description="Most workers the autoscaler starts.")
    num_gpus: float = Field(0, ge=0, description="GPUs per tensor-parallel rank: 1 on GPU "
                            "(a worker takes engine.tensor_parallel_size of them), 0 on CPU, "
                            "a fraction to share a GPU between workers of size 1.")
    num_cpus: float = Field(1, ge=0, description="Ray CPUs reserved per rank (a worker of "
                            "tensor-parallel size N reserves N times this).")
    accelerator_type: str | None = Field(None, description="Ray accelerator type, e.g. H100.")
    resources: dict[str, float] = Field(default_factory=dict, description="Custom Ray "
                                        "resources per worker (e.g. a node label; a "
                                        "tensor-parallel worker asks once, with rank 0).")
    engine: EngineSection = Field(default_factory=EngineSection)

    @model_validator(mode="after")
    def _bounds(self) -> PoolSection:
        if not self.min_replicas <= self.replicas <= self.max_replicas:
            raise ValueError(f"need min_replicas <= replicas <= max_replicas, got "
                             f"{self.min_replicas} <= {self.replicas} <= {self.max_replicas}")
        return self

    @model_validator(mode="after")
    def _whole_gpu_per_rank(self) -> PoolSection:
        if self.tensor_parallel_size > 1 and self.num_gpus not in (0, 1):
            raise ValueError(f"num_gpus {self.num_gpus:g} with engine.tensor_parallel_size "
                             f"{self.tensor_parallel_size}: each rank takes one whole GPU; "
                             "set num_gpus: 1 (per rank), or 0 on CPU")
        return self

    @property
    def tensor_parallel_size(self) -> int:
        return self.engine.tensor_parallel_size

    @property
    def gpus_per_worker(self) -> float:
        """GPUs one worker (all its ranks) reserves."""
        return self.num_gpus * self.tensor_parallel_size


class TransferSection(_Frozen):
    backend: str = Field("torch_dist", description="torch_dist (NCCL/gloo), ray or loopback.")
    timeout_s: float = Field(30.0, gt=0, description="One request's KV must move within this.")
    max_channels: int = Field(16, ge=1, description="Open pair channels per prefill worker.")


class RouterSection(_Frozen):
    host: str = Field("127.0.0.1", description="Address the servers bind to.")
    grpc_port: int = Field(50051, ge=0, le=65535, description="gRPC port (0: any free).")
    http_port: int = Field(8000, ge=0, le=65535, description="OpenAI HTTP port (0: any free).")
    api_key: str | None = Field(None, description="Bearer token required on HTTP if set.")
    max_inflight_requests: int = Field(256, ge=1, description="Admission limit (429 beyond).")
    tls_cert: str | None = Field(None, description="PEM certificate (chain): serve gRPC and "
                                 "HTTP over TLS. None: plaintext.")
    tls_key: str | None = Field(None, description="PEM private key of tls_cert.")
    tls_client_ca: str | None = Field(None, description="PEM CA bundle: clients must present "
                                      "a certificate it signed (mutual TLS). Needs tls_cert.")
    tool_call_parser: str = Field("hermes", description="How chat completions find tool "
                                  "calls in generated text: hermes (Qwen-style <tool_call> "
                                  "blocks) or llama3 (Llama 3 JSON calls).")
    drain_timeout_s: float = Field(30.0, ge=0, description="On SIGTERM / Ctrl-C: refuse new "
                                   "requests and report not ready, let those in flight finish "
                                   "for up to this long, then abort the rest (their streams "
                                   "end with finish_reason abort). A second signal aborts at "
                                   "once. Keep it below the pod's "
                                   "terminationGracePeriodSeconds, less the workers' shutdown.")

    @model_validator(mode="after")
    def _tls_complete(self) -> RouterSection:
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError("router.tls_cert and router.tls_key go together: set both or "
                             "neither")
        if self.tls_client_ca and not self.tls_cert:
            raise ValueError("router.tls_client_ca (mutual TLS) needs router.tls_cert and "
                             "router.tls_key")
        return self


class RaySection(_Frozen):
    address: str | None = Field(None, description="Existing Ray cluster (ray://… or auto); "
                                "None: start a local one.")
    num_cpus: int | None = Field(None, ge=1, description="Local Ray only: logical CPUs.")
    namespace: str = Field("splitserve", description="Ray namespace of the actors.")
    node_ip: str | None = Field(None, description="Address this node's Ray processes and the "
                                "workers' KV stores bind to and advertise. None: 127.0.0.1 "
                                "for a local Ray (nothing listens beyond this machine), the "
                                "Ray node's own IP when joining a cluster.")
    worker_start_timeout_s: float = Field(300.0, gt=0, description="A worker must be placed "
                                          "and loaded within this; else it is given up "
                                          "(killed, logged, counted) instead of pending.")


# autoscaler.<field> and the pool bound it must equal (the pools' bounds are the ones used)
_AUTOSCALER_BOUNDS = (("min_prefill", "prefill", "min_replicas"),
                      ("max_prefill", "prefill", "max_replicas"),
                      ("min_decode", "decode", "min_replicas"),
                      ("max_decode", "decode", "max_replicas"))


class ClusterConfig(_Frozen):
    model: ModelSection = Field(default_factory=ModelSection)
    prefill: PoolSection = Field(default_factory=PoolSection)
    decode: PoolSection = Field(default_factory=PoolSection)
    colocated: bool = Field(False, description="Baseline: decode workers prefill everything "
                            "themselves (no prefill pool, no transfer).")
    transfer: TransferSection = Field(default_factory=TransferSection)
    scheduler: SchedulerConfig = Field(default_factory=SchedulerConfig)
    autoscaler: AutoscalerConfig = Field(
        default_factory=lambda: AutoscalerConfig(enabled=False),
        description="Pool sizing from SLOs. Off unless autoscaler.enabled is written: pools "
        "keep the sizes given unless autoscaling is asked for.")
    slo: SLOConfig = Field(default_factory=SLOConfig)
    router: RouterSection = Field(default_factory=RouterSection)
    ray: RaySection = Field(default_factory=RaySection)

    @model_validator(mode="before")
    @classmethod
    def _autoscaling_only_when_asked(cls, data: Any) -> Any:
        """A config that does not write autoscaler.enabled gets fixed pools (issue #12: an
        autoscaler nobody asked for grew a pool while a lost worker waited for room)."""
        if not isinstance(data, dict):
            return data
        section = data.get("autoscaler")
        if section is None:
            return {**data, "autoscaler": {"enabled": False}}
        if isinstance(section, dict) and "enabled" not in section:
            return {**data, "autoscaler": {**section, "enabled": False}}
        return data

    @model_validator(mode="after")
    def _consistent(self) -> ClusterConfig:
        if self.scheduler.block_size not in (self.prefill.engine.block_size,
                                             self.decode.engine.block_size):
            raise ValueError("scheduler.block_size must equal the pools' engine.block_size "
                             f"({self.scheduler.block_size} vs {self.decode.engine.block_size})")
        kv = [(pool.engine.kv_cache_dtype, pool.engine.k_scale, pool.engine.v_scale)
              for pool in (self.prefill, self.decode)]
        if not self.colocated and kv[0] != kv[1]:
            raise ValueError("prefill and decode pools must store KV alike (the KV moves "
                             f"between them as is): prefill {kv[0]} vs decode {kv[1]} "
                             "(engine.kv_cache_dtype, k_scale, v_scale)")
        if self.prefill.engine.block_size != self.decode.engine.block_size:
            raise ValueError("prefill and decode pools must use the same engine.block_size "
                             "(KV blocks are shipped as they are)")
        if self.colocated and self.autoscaler.enabled:
            raise ValueError("autoscaler.enabled with colocated: the autoscaler sizes the "
                             "prefill and decode pools, and a colocated cluster has one pool "
                             "of workers that prefill themselves; drop one of the two")
        for field, pool, bound in _AUTOSCALER_BOUNDS:
            written = getattr(self.autoscaler, field)
            own = getattr(getattr(self, pool), bound)
            if field in self.autoscaler.model_fields_set and written != own:
                raise ValueError(f"autoscaler.{field}={written} differs from {pool}.{bound}="
                                 f"{own}: the pools' min_replicas/max_replicas bound the "
                                 f"autoscaler; set {pool}.{bound} (or drop autoscaler.{field})")
        return self

    def pools_in_use(self) -> dict[str, PoolSection]:
        """role -> its pool section (colocated workers use the decode section)."""
        if self.colocated:
            return {"colocated": self.decode}
        return {"prefill": self.prefill, "decode": self.decode}

    def check_tensor_parallel(self) -> None:
        """A ValueError, one line, when a pool's tensor_parallel_size cannot split the model
        (read from its config.json: cheap, no torch), so it is said before Ray starts and not
        by every worker as it loads. Nothing is read when no pool is tensor-parallel."""
        sizes = {role: pool.tensor_parallel_size for role, pool in self.pools_in_use().items()
                 if pool.tensor_parallel_size > 1}
        if not sizes:
            return
        from engine.model_config import ModelConfig
        from engine.parallel.shard import kv_heads_per_rank

        model = ModelConfig.from_pretrained(self.model.path)
        for role, size in sizes.items():
            section = "decode" if role == "colocated" else role
            try:
                kv_heads_per_rank(model, size)
            except ValueError as exc:
                raise ValueError(f"{section}.engine.tensor_parallel_size={size} does not fit "
                                 f"the model {self.model.path}: {exc}") from None

    def pool_size_overrides(self, role: str, n: int) -> dict[str, int]:
        """``with_overrides`` keys that start ``n`` workers of ``role``, its bounds widened
        to hold them (and the autoscaler's, where the config repeats them)."""
        pool = getattr(self, role)
        low, high = min(pool.min_replicas, n), max(pool.max_replicas, n)
        over = {f"{role}.replicas": n, f"{role}.min_replicas": low,
                f"{role}.max_replicas": high}
        for field, value in ((f"min_{role}", low), (f"max_{role}", high)):
            if field in self.autoscaler.model_fields_set:
                over[f"autoscaler.{field}"] = value
        return over

    def autoscaler_config(self) -> AutoscalerConfig:
        """The autoscaler section with its bounds taken from the pools (the pools'
        min/max_replicas are the one place bounds are set)."""
        return self.autoscaler.model_copy(update={
            "min_prefill": self.prefill.min_replicas, "max_prefill": self.prefill.max_replicas,
            "min_decode": self.decode.min_replicas, "max_decode": self.decode.max_replicas,
        })

    @classmethod
    def from_yaml(cls, path: str | Path) -> ClusterConfig:
        try:
            data = yaml.safe_load(Path(path).read_text()) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise ValueError(f"cannot read pool config {path}: {exc}") from exc
        return cls.model_validate(data)

    def with_overrides(self, **dotted: Any) -> ClusterConfig:
        """A copy with fields replaced, e.g. ``with_overrides(**{"prefill.replicas": 2})``;
        None values are ignored (unset CLI flags). What was written stays told apart from
        defaults (``model_fields_set``): the checks that compare written values need it."""
        data = self.model_dump(exclude_unset=True)
        for key, value in dotted.items():
            if value is None:
                continue
            node = data
            *parents, leaf = key.split(".")
            for p in parents:
                node = node.setdefault(p, {})
            node[leaf] = value
        return ClusterConfig.model_validate(data)
