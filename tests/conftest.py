"""Shared pytest hooks for the whole suite."""

from __future__ import annotations

import os

import pytest
import torch

# Triton reads TRITON_INTERPRET when it is first imported, and other modules import it early
# (xgrammar does): on a machine without CUDA the whole suite runs triton interpreted, so the
# Triton kernel tests (tests/engine/test_triton_attention.py) run on CPU tensors instead of
# skipping. A CUDA machine leaves it unset: its gpu tests run the compiled kernels.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


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
