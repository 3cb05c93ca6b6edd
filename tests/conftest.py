"""Shared pytest hooks and fixtures for the whole suite.

``tiny_model_dir(name)`` returns the directory of a tiny random-weight checkpoint written by
``engine.make_model`` (real transformers config + safetensors + tokenizer), built once per
test session. ``name`` is one of ``TINY_MODELS``: an architecture, or ``llama3.1`` (Llama
with Llama 3.1's RoPE scaling).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

# Triton reads TRITON_INTERPRET when it is first imported, and other modules import it early
# (xgrammar does): on a machine without CUDA the whole suite runs triton interpreted, so the
# Triton kernel tests (tests/engine/test_triton_attention.py) run on CPU tensors instead of
# skipping. A CUDA machine leaves it unset: its gpu tests run the compiled kernels.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# `splitserve simulate` compiles the simulator on first use (cluster.compiled, ~25 s): the CLI
# tests run it interpreted (same results), so that no test's timing depends on whether the
# cache holds a build. tests/cluster/test_sim_compiled.py clears this to test the compiled one.
os.environ.setdefault("SPLITSERVE_INTERPRETED", "1")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip ``@pytest.mark.gpu`` tests when CUDA is absent."""
    gpu_items = [item for item in items if item.get_closest_marker("gpu") is not None]
    if not gpu_items:
        return
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA (no GPU on this machine)")
    for item in gpu_items:
        item.add_marker(skip)

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
