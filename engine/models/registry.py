"""Model registry: Hugging Face architecture name -> model class and per-architecture traits.

Classes are named as ``"module:Class"`` strings and imported only when a model is built, so
this module (and ``engine.model_config``, which reads the traits) imports no torch. Adding an
architecture is one entry here, never an ``if model_type == ...`` branch in the model code.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any


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


_LLAMA = "engine.models.llama:LlamaForCausalLM"

ARCHITECTURES: dict[str, ArchSpec] = {
    # Llama 2, 3, 3.1, 3.2 (rope_scaling "llama3"); attention_bias from the config.
    "LlamaForCausalLM": ArchSpec(_LLAMA),
    # Mistral 7B v0.2+ (no sliding window): Llama's layout, never a bias.
    "MistralForCausalLM": ArchSpec(_LLAMA, qkv_bias=False, o_proj_bias=False),
    # Qwen2 / Qwen2.5: q/k/v bias always (the config has no key for it), o_proj without.
    "Qwen2ForCausalLM": ArchSpec(_LLAMA, qkv_bias=True, o_proj_bias=False),
    # Qwen3 dense: per-head q/k RMSNorm, explicit head_dim, attention_bias from the config.
    "Qwen3ForCausalLM": ArchSpec(_LLAMA, qk_norm=True),
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
