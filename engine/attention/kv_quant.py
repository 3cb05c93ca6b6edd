"""fp8 KV cache: dtypes, sizes and the per-tensor quantisation every backend agrees on.

``kv_cache_dtype`` (``CacheConfig``) is ``auto`` (the model's dtype), ``fp8_e4m3`` or
``fp8_e5m2``. An fp8 cache stores ``clamp(x / scale, ±max)`` rounded to nearest-even, with one
scale for all K and one for all V (``k_scale``, ``v_scale``: vLLM's per-tensor scales; 1.0,
vLLM's default without calibrated scales, covers |x| <= 448 in e4m3 and 57344 in e5m2);
reads multiply back. Each value then takes one byte: half a 16-bit cache's bytes per token,
so twice the blocks in the same memory (a quarter of a float32 cache's bytes).

Backends that can read it say so (``AttentionBackend.supports_fp8_kv``): torch and triton.
The compiled CPU kernels and flash-attn read float caches only and are refused by the
registry for an fp8 cache.
"""

from __future__ import annotations

import torch

KV_CACHE_DTYPES: dict[str, torch.dtype | None] = {
    "auto": None,  # the model's dtype
    "fp8_e4m3": torch.float8_e4m3fn,  # 3 mantissa bits, max 448 (OCP "fn": no infinities)
    "fp8_e5m2": torch.float8_e5m2,  # 2 mantissa bits, max 57344
}
FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)


def cache_dtype(kv_cache_dtype: str, model_dtype: torch.dtype) -> torch.dtype:
    """The torch dtype of the KV cache tensor."""
    if kv_cache_dtype not in KV_CACHE_DTYPES:
        raise ValueError(f"kv_cache_dtype {kv_cache_dtype!r} is not one of: "
                         f"{', '.join(KV_CACHE_DTYPES)}")
    return KV_CACHE_DTYPES[kv_cache_dtype] or model_dtype


def is_fp8(dtype: torch.dtype) -> bool:
    return dtype in FP8_DTYPES


def bytes_per_block(num_layers: int, block_size: int, num_kv_heads: int, head_dim: int,
                    dtype: torch.dtype) -> int:
    """Bytes of one block of the block-major cache (every layer's K and V)."""
    return num_layers * 2 * block_size * num_kv_heads * head_dim * dtype.itemsize


def quantize(x: torch.Tensor, dtype: torch.dtype, scale: float) -> torch.Tensor:
    """x (any float dtype) -> fp8 ``dtype``: x / scale, saturated to the format's range (a
    plain cast would make out-of-range values NaN), rounded to nearest-even."""
    limit = torch.finfo(dtype).max
    return (x.float() / scale).clamp_(-limit, limit).to(dtype)


def dequantize(x: torch.Tensor, dtype: torch.dtype, scale: float) -> torch.Tensor:
    """fp8 ``x`` -> ``dtype`` values (x * scale)."""
    return (x.to(torch.float32) * scale).to(dtype)
