"""Cost models of one worker: how long a prefill chunk, a decode step and a KV transfer take.

A ``CostProfile`` is a handful of coefficients for one (GPU, model, tensor-parallel size),
stored as a small JSON file (format ``splitserve-sim-profile/v1``)::

    {
      "format": "splitserve-sim-profile/v1",
      "name": "H100/llama-3-8b/tp1",
      "source": "spec",                    # "spec" (from datasheets) or "calibrated"
      "kv_bytes_per_token": 131072,        # K+V of one token over all layers
      "kv_capacity_tokens": 440000,        # KV cache size of one worker, in tokens
      "prefill":  {"fixed_s": ..., "per_token_s": ..., "per_attn_pair_s": ...},
      "decode":   {"fixed_s": ..., "per_seq_s": ..., "per_kv_byte_s": ...},
      "transfer": {"bandwidth_bytes_per_s": ..., "latency_s": ...}
    }

Models (n = prompt tokens computed in the step, c = tokens already in context before them,
B = sequences decoding, K = KV bytes they read):

    prefill step  = fixed + per_token * n + per_attn_pair * n * (c + n / 2)
    decode step   = fixed + per_seq * B + per_kv_byte * K
    mixed step    = decode step + per_token * n + per_attn_pair * n * (c + n / 2)
    KV transfer   = latency + bytes / bandwidth

From specs: ``per_token = 2 * params / (peak FLOP/s * mfu)`` (a linear layer costs two FLOPs
per weight per token), ``per_attn_pair = 4 * layers * heads * head_dim / (peak * mfu)``,
decode ``fixed = overhead + weight bytes / (HBM bandwidth * mbu)``, ``per_kv_byte = 1 /
(HBM bandwidth * mbu)``. ``calibrate.fit_profile`` fits the same coefficients to measured
points instead.

Tensor parallelism (a worker is ``tp`` devices, Megatron style): FLOPs, weight bytes and KV
bytes are split over the ``tp`` devices (so peak FLOP/s, HBM bandwidth and memory are ``tp``
times one device's; KV heads are replicated when ``tp > num_kv_heads``, as vLLM does), and
every layer adds two all-reduces of the step's activations (after attention and after the
MLP). A ring all-reduce of ``B`` bytes over ``tp`` devices takes ``latency + 2 * (tp - 1) /
tp * B / link bandwidth``, so per step::

    all-reduce = 2 * layers * latency                              (-> fixed_s)
               + tokens * 2 * layers * 2 * (tp - 1) / tp * hidden * dtype bytes / link
                                                   (-> prefill per_token_s, decode per_seq_s)

At ``tp = 1`` there is no all-reduce and the coefficients are the single-device ones.
Mixture-of-experts models compute with their *active* parameters (``active_params``: the
experts a token is routed to) but hold and read all of them (``params``): a decode batch
of typical size touches every expert.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

FORMAT = "splitserve-sim-profile/v1"


@dataclass(frozen=True)
class HardwareSpec:
    name: str
    peak_flops: float  # dense bf16 FLOP/s
    hbm_bytes_per_s: float  # memory bandwidth
    memory_bytes: float  # HBM capacity
    link_bytes_per_s: float  # per-GPU network bandwidth used for KV transfer (one direction)
    link_latency_s: float  # per-transfer setup latency (handshake + NCCL launch)
    tp_link_bytes_per_s: float = 450e9  # intra-node (NVLink) bandwidth per GPU, one direction
    tp_latency_s: float = 8e-6  # one small all-reduce inside a node (NCCL over NVLink)


# Datasheet figures (SXM parts); links: 400 Gb/s InfiniBand per H100/H200, 200 Gb/s per A100;
# NVLink 4 (H100/H200) 900 GB/s and NVLink 3 (A100) 600 GB/s, both directions together.
HARDWARE: dict[str, HardwareSpec] = {
    "H100": HardwareSpec("H100", 989e12, 3.35e12, 80e9, 50e9, 2e-4, 450e9),
    "H200": HardwareSpec("H200", 989e12, 4.8e12, 141e9, 50e9, 2e-4, 450e9),
    "A100": HardwareSpec("A100", 312e12, 2.039e12, 80e9, 25e9, 2e-4, 300e9),
}


@dataclass(frozen=True)
class ModelSpec:
    name: str
    params: float  # all parameters (what the weights take in memory)
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    dtype_bytes: int = 2
    hidden: int = 0  # residual width (0: num_heads * head_dim)
    active_params: float = 0.0  # parameters one token runs through (MoE; 0: params)

    @property
    def kv_bytes_per_token(self) -> int:
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * self.dtype_bytes

    @property
    def weight_bytes(self) -> float:
        return self.params * self.dtype_bytes

    @property
    def compute_params(self) -> float:
        return self.active_params or self.params

    @property
    def hidden_size(self) -> int:
        return self.hidden or self.num_heads * self.head_dim

    def kv_replication(self, tp: int) -> float:
        """KV bytes stored per token relative to one copy: > 1 when ``tp`` exceeds the KV
        heads (each rank keeps a whole head)."""
        return max(1.0, tp / self.num_kv_heads)


MODELS: dict[str, ModelSpec] = {
    "llama-3-8b": ModelSpec("llama-3-8b", 8.03e9, 32, 32, 8, 128),
    "llama-3-70b": ModelSpec("llama-3-70b", 70.6e9, 80, 64, 8, 128),
    "qwen2.5-7b": ModelSpec("qwen2.5-7b", 7.6e9, 28, 28, 4, 128),
    # MoE: 8 experts, top-2 (Mistral's figures: 46.7B total, 12.9B active per token)
    "mixtral-8x7b": ModelSpec("mixtral-8x7b", 46.7e9, 32, 32, 8, 128, active_params=12.9e9),
    # MoE: 128 experts, top-8 (Qwen's figures: 30.5B total, 3.3B active); hidden 2048
    "qwen3-30b-a3b": ModelSpec("qwen3-30b-a3b", 30.5e9, 48, 32, 4, 128, hidden=2048,
                               active_params=3.3e9),
}


@dataclass(frozen=True)
class Efficiency:
    """Achieved fractions of peak and fixed per-step overheads (from public serving numbers)."""

    mfu: float = 0.55  # achieved / peak FLOP/s in prefill
    mbu: float = 0.75  # achieved / peak HBM bandwidth in decode
    prefill_overhead_s: float = 3e-3  # launch + scheduling per prefill step
    decode_overhead_s: float = 2e-3  # per decode step (sampling, scheduling, launches)
    memory_utilization: float = 0.9  # fraction of HBM the worker may use
    link_efficiency: float = 0.8  # achieved / line rate of the KV link
    tp_link_efficiency: float = 0.8  # achieved all-reduce bus bandwidth / NVLink line rate


@dataclass(frozen=True)
class CostProfile:
    name: str
    source: str
    kv_bytes_per_token: int
    kv_capacity_tokens: int
    prefill_fixed_s: float
    prefill_per_token_s: float
    prefill_per_attn_pair_s: float
    decode_fixed_s: float
    decode_per_seq_s: float
    decode_per_kv_byte_s: float
    transfer_bandwidth_bytes_per_s: float
    transfer_latency_s: float

    def __post_init__(self) -> None:
        # numbers as declared, whatever a JSON file or a caller gave (4.4e5 for a capacity, 0
        # for a latency): the compiled simulator (cluster.compiled) refuses a float for an int
        for f in fields(self):
            if f.type in ("int", "float"):
                value = getattr(self, f.name)
                object.__setattr__(self, f.name, int(value) if f.type == "int" else float(value))

    # ---- the cost models -------------------------------------------------------------------

    def prefill_compute_s(self, n: int, context: int) -> float:
        """Variable part of computing ``n`` prompt tokens after ``context`` cached ones."""
        return self.prefill_per_token_s * n + self.prefill_per_attn_pair_s * n * (context + n / 2)

    def prefill_step_s(self, n: int, context: int = 0) -> float:
        return self.prefill_fixed_s + self.prefill_compute_s(n, context)

    def decode_step_s(self, batch: int, kv_tokens: int) -> float:
        return (
            self.decode_fixed_s
            + self.decode_per_seq_s * batch
            + self.decode_per_kv_byte_s * kv_tokens * self.kv_bytes_per_token
        )

    def transfer_s(self, num_tokens: int) -> float:
        nbytes = num_tokens * self.kv_bytes_per_token
        return self.transfer_latency_s + nbytes / self.transfer_bandwidth_bytes_per_s

    def prefill_tokens_per_s(self, chunk: int) -> float:
        """Nominal prefill throughput at a given chunk size (no prior context)."""
        return chunk / self.prefill_step_s(chunk)

    # ---- construction and JSON -------------------------------------------------------------

    @classmethod
    def from_spec(
        cls, hardware: str, model: str, tp: int = 1, eff: Efficiency | None = None
    ) -> CostProfile:
        hw, m, eff = HARDWARE[hardware], MODELS[model], eff or Efficiency()
        if m.num_heads % tp:
            raise ValueError(
                f"tp={tp} does not divide {model}'s {m.num_heads} attention heads; "
                "choose a tp that does"
            )
        flops = hw.peak_flops * eff.mfu * tp
        hbm = hw.hbm_bytes_per_s * eff.mbu * tp
        kv_bytes = m.kv_bytes_per_token * m.kv_replication(tp)  # stored over the tp devices
        free = hw.memory_bytes * tp * eff.memory_utilization - m.weight_bytes
        if free <= 0:
            raise ValueError(f"{model} does not fit on {tp} x {hardware}; raise tp")
        ar_fixed, ar_per_token = allreduce_costs(hw, m, tp, eff)
        return cls(
            name=f"{hardware}/{model}/tp{tp}",
            source="spec",
            kv_bytes_per_token=m.kv_bytes_per_token,
            kv_capacity_tokens=int(free // kv_bytes),
            prefill_fixed_s=eff.prefill_overhead_s + ar_fixed,
            prefill_per_token_s=2 * m.compute_params / flops + ar_per_token,
            prefill_per_attn_pair_s=4 * m.num_layers * m.num_heads * m.head_dim / flops,
            decode_fixed_s=eff.decode_overhead_s + m.weight_bytes / hbm + ar_fixed,
            decode_per_seq_s=2 * m.compute_params / flops + ar_per_token,
            decode_per_kv_byte_s=m.kv_replication(tp) / hbm,
            transfer_bandwidth_bytes_per_s=hw.link_bytes_per_s * eff.link_efficiency * tp,
            transfer_latency_s=hw.link_latency_s,
        )

    def to_json(self) -> dict:
        d = asdict(self)
        return {
            "format": FORMAT,
            "name": d["name"],
            "source": d["source"],
            "kv_bytes_per_token": d["kv_bytes_per_token"],
            "kv_capacity_tokens": d["kv_capacity_tokens"],
            "prefill": {k[8:]: d[k] for k in d if k.startswith("prefill_")},
            "decode": {k[7:]: d[k] for k in d if k.startswith("decode_")},
            "transfer": {k[9:]: d[k] for k in d if k.startswith("transfer_")},
        }

    @classmethod
    def from_json(cls, data: dict) -> CostProfile:
        if data.get("format") != FORMAT:
            raise ValueError(f"not a {FORMAT} profile (format={data.get('format')!r})")
        flat = {k: data[k] for k in ("name", "source", "kv_bytes_per_token", "kv_capacity_tokens")}
        for section in ("prefill", "decode", "transfer"):
            flat.update({f"{section}_{k}": float(v) for k, v in data[section].items()})
        return cls(**flat)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_json(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> CostProfile:
        return cls.from_json(json.loads(Path(path).read_text()))

    def with_(self, **changes: object) -> CostProfile:
        return replace(self, **changes)  # type: ignore[arg-type]


def allreduce_costs(
    hw: HardwareSpec, m: ModelSpec, tp: int, eff: Efficiency | None = None
) -> tuple[float, float]:
    """(seconds per step, seconds per token) of a step's 2 * layers all-reduces at ``tp``:
    each all-reduce pays the link latency once and moves ``2 (tp - 1) / tp`` times the
    tokens' activations (``hidden * dtype`` bytes each) over the NVLink bandwidth."""
    if tp <= 1:
        return 0.0, 0.0
    eff = eff or Efficiency()
    calls = 2 * m.num_layers
    bandwidth = hw.tp_link_bytes_per_s * eff.tp_link_efficiency
    moved = 2 * (tp - 1) / tp * m.hidden_size * m.dtype_bytes
    return calls * hw.tp_latency_s, calls * moved / bandwidth


def resolve_profile(hardware: str, model: str, tp: int = 1) -> CostProfile:
    """A preset name ("H100", "H200", "A100") or the path of a JSON profile."""
    if hardware in HARDWARE:
        return CostProfile.from_spec(hardware, model, tp)
    path = Path(hardware)
    if path.is_file():
        return CostProfile.load(path)
    raise ValueError(
        f"unknown hardware {hardware!r}: use one of {sorted(HARDWARE)} or a profile JSON path"
    )
