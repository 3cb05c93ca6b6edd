"""Model definitions (Llama family; Mixtral / Qwen MoE on top of it), their registry and the
safetensors loader.

``load_model`` is re-exported lazily so that importing ``engine.models.registry`` (pure
Python, used by ``engine.model_config``) does not import torch.
"""

from __future__ import annotations

from typing import Any

__all__ = ["load_model"]


def __getattr__(name: str) -> Any:
    if name == "load_model":
        from engine.models.loader import load_model

        return load_model
    raise AttributeError(f"module 'engine.models' has no attribute {name!r}")
