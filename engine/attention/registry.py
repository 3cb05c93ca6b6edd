"""Attention backend registry: name -> ``"module:Class"``, imported only when selected.

``select_backend(None | "auto", device, block_size)`` picks by capability: flash-attn's
kernels on CUDA when installed and the block size fits them (multiples of 256), else the
Triton kernels on CUDA when triton is installed (power-of-two blocks >= 16); on CPU the
compiled paged kernels when they build; else the torch reference. A backend may limit the
devices ``auto`` considers it for (``auto_device_types``: Triton's CPU interpreter is a test
tool, never a default). For an fp8 KV cache only backends that read it
(``supports_fp8_kv``: torch, triton) are considered.
An explicit choice that cannot run raises ``ValueError`` saying what to change.
"""

from __future__ import annotations

import importlib

import torch

from engine.attention.base import AttentionBackend

BACKENDS: dict[str, str] = {
    "torch": "engine.attention.torch_ref:TorchAttentionBackend",
    "cpu_paged": "engine.attention.cpu_paged:CpuPagedAttentionBackend",
    "flash_attn": "engine.attention.flash_attn:FlashAttentionBackend",
    "triton": "engine.attention.triton_backend:TritonAttentionBackend",
}
# Tried in order by "auto"; the last one must run anywhere.
AUTO_ORDER = ("flash_attn", "triton", "cpu_paged", "torch")


def backend_class(name: str) -> type[AttentionBackend]:
    """Import and return the backend class registered as ``name``."""
    if name not in BACKENDS:
        raise ValueError(
            f"unknown attention backend {name!r}; choose one of: auto, {', '.join(BACKENDS)}"
        )
    module_name, _, class_name = BACKENDS[name].partition(":")
    return getattr(importlib.import_module(module_name), class_name)


def select_backend(name: str | None, device: torch.device, block_size: int,
                   kv_cache_dtype: str = "auto",
                   kv_scales: tuple[float, float] = (1.0, 1.0)) -> AttentionBackend:
    """An instance of the named backend (or the best available for ``None``/``"auto"``),
    able to read a cache of ``kv_cache_dtype`` (``kv_quant``) with these per-tensor scales."""
    fp8 = kv_cache_dtype != "auto"
    if name is None or name == "auto":
        for candidate in AUTO_ORDER:
            cls = backend_class(candidate)
            auto_types = cls.auto_device_types
            if auto_types is not None and device.type not in auto_types:
                continue
            if fp8 and not cls.supports_fp8_kv:
                continue
            if cls.is_available(device) and cls.supports_block_size(block_size):
                return _configured(cls(), kv_scales)
        raise ValueError(f"no attention backend can run on {device} with block_size={block_size}")
    cls = backend_class(name)
    if not cls.supports_block_size(block_size):
        raise ValueError(
            f"{name}'s paged KV path needs {cls.block_size_requirement()} (got {block_size}); "
            f"use --block-size {_example_block_size(cls)} or --attention-backend torch"
        )
    if fp8 and not cls.supports_fp8_kv:
        fp8_backends = ", ".join(n for n in BACKENDS if backend_class(n).supports_fp8_kv)
        raise ValueError(
            f"attention backend {name!r} cannot read an fp8 KV cache (its kernels take float "
            f"caches only); use --kv-cache-dtype auto, or one of: {fp8_backends}"
        )
    if not cls.is_available(device):
        needs = getattr(cls, "requirements", "its kernels")
        raise ValueError(
            f"attention backend {name!r} is not available on {device} (it needs {needs}); "
            "use --attention-backend torch or auto"
        )
    return _configured(cls(), kv_scales)


def _configured(backend: AttentionBackend, kv_scales: tuple[float, float]) -> AttentionBackend:
    backend.set_kv_scales(*kv_scales)
    return backend


def _example_block_size(cls: type[AttentionBackend]) -> int:
    return next(bs for bs in (16, 32, 64, 128, 256, 512) if cls.supports_block_size(bs))
