"""ModelConfig: what the engine needs to know about a checkpoint, read from its ``config.json``.

Plain Python (no torch). Accepts both the classic Hugging Face keys (``rope_theta`` +
``rope_scaling``) and the transformers-5 ``rope_parameters`` dict. Traits that the
architecture fixes rather than the config file (Qwen2's q/k/v bias, Qwen3's q/k norm, the
config keys and checkpoint names of a mixture-of-experts block) come from the model
registry. Mixture-of-experts models get a ``MoeConfig`` (``moe``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.models.registry import MoeSpec, get_arch_spec

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


@dataclass(frozen=True)
class MoeConfig:
    """The sparse MLP of a mixture-of-experts model (Mixtral, Qwen2-MoE, Qwen3-MoE)."""

    num_experts: int
    """Routed experts per sparse layer."""
    top_k: int
    """Experts each token is routed to."""
    intermediate_size: int
    """Width of one routed expert's gated MLP."""
    renormalize: bool
    """The top-k routing weights are divided by their sum (Mixtral always; Qwen when
    ``norm_topk_prob``), else they stay softmax probabilities over all experts."""
    sparse_layers: tuple[int, ...]
    """Layers with the sparse block; the others have a dense MLP of
    ``ModelConfig.intermediate_size`` (Qwen's ``mlp_only_layers`` / ``decoder_sparse_step``)."""
    shared_expert_intermediate_size: int = 0
    """Width of the shared expert every token also goes through (Qwen2-MoE); 0 = none."""


@dataclass(frozen=True)
class ModelConfig:
    architecture: str
    """Hugging Face architecture name, e.g. ``"LlamaForCausalLM"`` (a registry key)."""
    hidden_size: int
    """Width of the residual stream."""
    num_layers: int
    """Number of decoder layers."""
    num_heads: int
    """Query heads per layer."""
    num_kv_heads: int
    """Key/value heads per layer (< num_heads: grouped-query attention)."""
    head_dim: int
    """Width of one attention head (explicit in Qwen3, else hidden_size // num_heads)."""
    intermediate_size: int
    """Width of the dense gated MLP (MoE models: of their dense layers, if any; the experts'
    width is ``moe.intermediate_size``)."""
    vocab_size: int
    """Rows of the embedding and of the LM head."""
    rms_norm_eps: float = 1e-6
    """Epsilon of every RMSNorm."""
    rope_theta: float = 10000.0
    """Rotary embedding base."""
    rope_scaling: dict[str, Any] | None = None
    """Rotary scaling parameters with a ``"rope_type"`` key (``"linear"``, ``"llama3"``), or
    None for plain RoPE."""
    max_position_embeddings: int = 2048
    """Longest position the model supports (size of the rotary tables)."""
    tie_word_embeddings: bool = False
    """The LM head reuses the embedding matrix (no ``lm_head.weight`` in the checkpoint)."""
    attention_bias: bool = False
    """q/k/v projections carry a bias."""
    o_proj_bias: bool = False
    """The attention output projection carries a bias."""
    mlp_bias: bool = False
    """gate/up/down projections carry a bias (Llama's ``mlp_bias``)."""
    qk_norm: bool = False
    """Per-head RMSNorm on queries and keys before RoPE (Qwen3)."""
    eos_token_ids: tuple[int, ...] = ()
    """Token ids that end generation (config.json and generation_config.json, merged)."""
    bos_token_id: int | None = None
    """Beginning-of-sequence token id, if the model has one."""
    torch_dtype: str | None = None
    """Dtype the checkpoint was saved in (``"bfloat16"``, ...), None if unrecorded."""
    sliding_window: int | None = None
    """Attention window; only None or >= max_position_embeddings (i.e. none) is supported."""
    moe: MoeConfig | None = None
    """The mixture-of-experts MLP; None for dense models."""

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @classmethod
    def from_pretrained(cls, model_dir: str | Path) -> ModelConfig:
        """Read ``model_dir/config.json`` (and ``generation_config.json`` when present)."""
        model_dir = Path(model_dir)
        config_path = model_dir / "config.json"
        if not config_path.is_file():
            raise FileNotFoundError(
                f"no config.json in {model_dir}: is it a Hugging Face model folder?"
            )
        raw = json.loads(config_path.read_text())
        gen_path = model_dir / "generation_config.json"
        generation = json.loads(gen_path.read_text()) if gen_path.is_file() else {}
        return cls.from_dict(raw, generation, source=str(config_path))

    @classmethod
    def from_dict(
        cls, raw: dict[str, Any], generation: dict[str, Any] | None = None, source: str = "config"
    ) -> ModelConfig:
        """Build from a parsed ``config.json`` (and optional ``generation_config.json``)."""
        architectures = raw.get("architectures") or []
        if not architectures:
            raise ValueError(f"{source} has no 'architectures' entry; cannot tell the model type")
        spec = get_arch_spec(architectures[0])
        _check_activation(raw, source)
        num_heads = raw["num_attention_heads"]
        max_pos = raw.get("max_position_embeddings", 2048)
        rope_theta, rope_scaling = _parse_rope(raw, source)
        config_bias = bool(raw.get("attention_bias", False))
        return cls(
            architecture=architectures[0],
            hidden_size=raw["hidden_size"],
            num_layers=raw["num_hidden_layers"],
            num_heads=num_heads,
            num_kv_heads=raw.get("num_key_value_heads") or num_heads,
            head_dim=raw.get("head_dim") or raw["hidden_size"] // num_heads,
            intermediate_size=raw["intermediate_size"],
            vocab_size=raw["vocab_size"],
            rms_norm_eps=raw.get("rms_norm_eps", 1e-6),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            max_position_embeddings=max_pos,
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            attention_bias=config_bias if spec.qkv_bias is None else spec.qkv_bias,
            o_proj_bias=config_bias if spec.o_proj_bias is None else spec.o_proj_bias,
            mlp_bias=bool(raw.get("mlp_bias", False)),
            qk_norm=spec.qk_norm,
            eos_token_ids=_merge_eos(raw, generation or {}),
            bos_token_id=raw.get("bos_token_id"),
            torch_dtype=raw.get("dtype") or raw.get("torch_dtype"),
            sliding_window=_parse_sliding_window(raw, max_pos, source),
            moe=None if spec.moe is None else _parse_moe(raw, spec.moe, source),
        )


def _check_activation(raw: dict[str, Any], source: str) -> None:
    act = raw.get("hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"{source}: hidden_act={act!r} is not supported (only 'silu')")


def _parse_rope(raw: dict[str, Any], source: str) -> tuple[float, dict[str, Any] | None]:
    """(rope_theta, scaling dict or None) from either the classic or the transformers-5 keys."""
    params = dict(raw.get("rope_parameters") or raw.get("rope_scaling") or {})
    theta = float(params.pop("rope_theta", raw.get("rope_theta", 10000.0)))
    rope_type = params.pop("rope_type", params.pop("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(
            f"{source}: rope type {rope_type!r} is not supported; "
            f"supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
        )
    if params.pop("partial_rotary_factor", raw.get("partial_rotary_factor", 1.0)) != 1.0:
        raise ValueError(f"{source}: partial rotary embeddings are not supported")
    if rope_type == "default":
        return theta, None
    return theta, {"rope_type": rope_type, **params}


def _parse_moe(raw: dict[str, Any], spec: MoeSpec, source: str) -> MoeConfig:
    key = next((k for k in spec.num_experts_keys if k in raw), None)
    if key is None:
        raise ValueError(f"{source} has none of {', '.join(spec.num_experts_keys)}: "
                         "cannot tell the number of experts")
    num_experts, num_layers = raw[key], raw["num_hidden_layers"]
    top_k = raw["num_experts_per_tok"]
    if not 0 < top_k <= num_experts:
        raise ValueError(f"{source}: num_experts_per_tok={top_k} must be in 1..{num_experts} "
                         f"({key})")
    # As transformers' Qwen MoE layers: sparse unless listed in mlp_only_layers, and only
    # every decoder_sparse_step-th layer (both absent in Mixtral: every layer is sparse).
    dense, step = set(raw.get("mlp_only_layers") or ()), raw.get("decoder_sparse_step", 1)
    sparse = tuple(i for i in range(num_layers) if i not in dense and (i + 1) % step == 0)
    return MoeConfig(
        num_experts=num_experts,
        top_k=top_k,
        intermediate_size=raw[spec.intermediate_key],
        renormalize=spec.always_renormalize or bool(raw.get("norm_topk_prob", False)),
        sparse_layers=sparse,
        shared_expert_intermediate_size=(
            raw["shared_expert_intermediate_size"] if spec.shared_expert else 0),
    )


def _parse_sliding_window(raw: dict[str, Any], max_pos: int, source: str) -> int | None:
    window = raw.get("sliding_window")
    if window is None or raw.get("use_sliding_window") is False or window >= max_pos:
        return None
    raise ValueError(
        f"{source}: sliding-window attention is not supported (sliding_window={window} < "
        f"max_position_embeddings={max_pos}); use a checkpoint without a window "
        "(e.g. Mistral v0.2+), or set sliding_window to null if prompts stay shorter than it"
    )


def _merge_eos(raw: dict[str, Any], generation: dict[str, Any]) -> tuple[int, ...]:
    ids: list[int] = []
    for value in (raw.get("eos_token_id"), generation.get("eos_token_id")):
        for token in value if isinstance(value, list) else [value]:
            if token is not None and token not in ids:
                ids.append(int(token))
    return tuple(ids)
