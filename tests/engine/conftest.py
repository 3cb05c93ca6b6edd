"""Shared engine fixtures: generated tiny checkpoints, built once per test session.

``tiny_model_dir(name)`` returns the directory of a tiny random-weight checkpoint written by
``engine.make_model`` (real transformers config + safetensors + tokenizer). ``name`` is one of
``TINY_MODELS``: an architecture, or ``llama3.1`` (Llama with Llama 3.1's RoPE scaling).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

# fixture name -> (arch, preset)
TINY_MODELS = {
    "llama": ("llama", "tiny"),
    "llama3.1": ("llama", "tiny-llama3.1"),
    "mistral": ("mistral", "tiny"),
    "qwen2": ("qwen2", "tiny"),
    "qwen3": ("qwen3", "tiny"),
}


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """Factory: ``tiny_model_dir("qwen2") -> Path`` (seed 0, float32), each built on first use."""
    from engine.make_model import make_model

    built: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in built:
            arch, preset = TINY_MODELS[name]
            out = tmp_path_factory.mktemp(f"model-{name}") / "ckpt"
            built[name] = make_model(out, arch, preset, seed=0, progress=False)
        return built[name]

    return get
