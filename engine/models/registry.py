"""Model registry: Hugging Face architecture name -> model class and per-architecture traits.

Classes are named as ``"module:Class"`` strings and imported only when a model is built, so
this module (and ``engine.model_config``, which reads the traits) imports no torch. Adding an
architecture is one entry here, never an ``if model_type == ...`` branch in the model code.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, replace
from typing import Any


@dataclass(frozen=True)
class MoeSpec:
    """How an architecture's sparse (mixture-of-experts) block is configured and named."""

    block_name: str
    """The sparse block's module in a checkpoint layer: ``block_sparse_moe`` (Mixtral) or
    ``mlp`` (Qwen)."""
    expert_names: tuple[str, str, str]
    """One expert's gate, up and down projections in the checkpoint:
    ``experts.{e}.{name}.weight``."""
    num_experts_keys: tuple[str, ...]
    """config.json keys of the number of routed experts, the first present wins
    (transformers 5 writes Qwen's ``num_experts`` as ``num_local_experts``)."""
    intermediate_key: str
    """config.json key of one expert's intermediate width."""
    always_renormalize: bool
    """The top-k weights are always renormalised to sum to 1 (Mixtral); otherwise the
    config's ``norm_topk_prob`` says (Qwen, default False as in transformers)."""
    shared_expert: bool = False
    """Every token also goes through a shared expert scaled by a sigmoid gate (Qwen2-MoE)."""
    float32_weights: bool = False
    """The routing weights stay float32, so expert outputs are weighted and summed in
    float32 before the cast back (Mixtral); otherwise they are cast to the activations'
    dtype first (Qwen). The same in a float32 model."""


MIXTRAL_MOE = MoeSpec("block_sparse_moe", ("w1", "w3", "w2"), ("num_local_experts",),
                      "intermediate_size", always_renormalize=True, float32_weights=True)
QWEN_MOE = MoeSpec("mlp", ("gate_proj", "up_proj", "down_proj"),
                   ("num_experts", "num_local_experts"),
                   "moe_intermediate_size", always_renormalize=False)


@dataclass(frozen=True)
class ArchSpec:
    model_cls: str
    """``"module:Class"`` of the model, imported lazily by ``model_class``."""
    qkv_bias: bool | None = None
    """q/k/v projections carry a bias: True/False fixed by the architecture, None = read the
    checkpoint's ``attention_bias`` key (default False)."""
    o_proj_bias: bool | None = None
    """The output projection carries a bias: same convention as ``qkv_bias``."""
    qk_norm: bool = False
    """Per-head RMSNorm on queries and keys before the rotary embedding (Qwen3)."""
    moe: MoeSpec | None = None
    """The sparse MLP of mixture-of-experts architectures; None for dense ones."""


_LLAMA = "engine.models.llama:LlamaForCausalLM"
_MOE = "engine.models.moe_model:MoeForCausalLM"

ARCHITECTURES: dict[str, ArchSpec] = {
    # Llama 2, 3, 3.1, 3.2 (rope_scaling "llama3"); attention_bias from the config.
    "LlamaForCausalLM": ArchSpec(_LLAMA),
    # Mistral 7B v0.2+ (no sliding window): Llama's layout, never a bias.
    "MistralForCausalLM": ArchSpec(_LLAMA, qkv_bias=False, o_proj_bias=False),
    # Qwen2 / Qwen2.5: q/k/v bias always (the config has no key for it), o_proj without.
    "Qwen2ForCausalLM": ArchSpec(_LLAMA, qkv_bias=True, o_proj_bias=False),
    # Qwen3 dense: per-head q/k RMSNorm, explicit head_dim, attention_bias from the config.
    "Qwen3ForCausalLM": ArchSpec(_LLAMA, qk_norm=True),
    # Mixtral 8x7B / 8x22B (no sliding window): Mistral's attention, top-2 of 8 experts.
    "MixtralForCausalLM": ArchSpec(_MOE, qkv_bias=False, o_proj_bias=False, moe=MIXTRAL_MOE),
    # Qwen3-MoE (30B-A3B, 235B-A22B): Qwen3's attention, top-k routed experts, no shared one.
    "Qwen3MoeForCausalLM": ArchSpec(_MOE, qk_norm=True, moe=QWEN_MOE),
    # Qwen1.5/Qwen2-MoE: Qwen2's attention (q/k/v bias), routed experts plus a gated shared one.
    "Qwen2MoeForCausalLM": ArchSpec(
        _MOE, qkv_bias=True, o_proj_bias=False,
        moe=replace(QWEN_MOE, shared_expert=True),
    ),
}


def supported_architectures() -> list[str]:
    return sorted(ARCHITECTURES)


def get_arch_spec(architecture: str) -> ArchSpec:
    """The traits of ``architecture``; ValueError naming the supported ones if unknown."""
    spec = ARCHITECTURES.get(architecture)
    if spec is None:
        raise ValueError(
            f"unsupported model architecture {architecture!r}; supported architectures: "
            f"{', '.join(supported_architectures())}"
        )
    return spec


def model_class(architecture: str) -> Any:
    """Import and return the model class registered for ``architecture``."""
    module_name, _, class_name = get_arch_spec(architecture).model_cls.partition(":")
    return getattr(importlib.import_module(module_name), class_name)
