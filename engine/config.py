"""Engine configuration: one frozen object per concern, each field documented and defaulted.

These are validated once at construction; nothing reads the environment at import time.
"""

from __future__ import annotations

from dataclasses import dataclass

# The names accepted by CacheConfig.kv_cache_dtype (torch dtypes: engine.attention.kv_quant;
# kept here as names so that the config imports without torch).
KV_CACHE_DTYPES = ("auto", "fp8_e4m3", "fp8_e5m2")


@dataclass(frozen=True)
class CacheConfig:
    block_size: int = 16
    """Tokens per KV block. Attention backends declare which sizes they accept."""
    kv_cache_memory_bytes: int | None = None
    """KV budget in bytes; None: a fraction of free GPU memory, or a default budget on CPU."""
    gpu_memory_utilization: float = 0.9
    """On CUDA with no explicit budget: fraction of total memory the engine may use in all."""
    cpu_kv_cache_bytes_default: int = 1 << 30
    """On CPU with no explicit budget: bytes of KV cache to allocate (capped by need)."""
    enable_prefix_caching: bool = True
    """Reuse KV blocks of identical prompt prefixes (chained block hashes, LRU eviction)."""
    num_blocks_override: int | None = None
    """Exact number of KV blocks (tests and memory-pressure experiments)."""
    kv_cache_dtype: str = "auto"
    """KV cache element type: auto (the model's dtype), fp8_e4m3 or fp8_e5m2 (one byte a
    value: twice a 16-bit cache's blocks in the same memory; see engine.attention.kv_quant)."""
    k_scale: float = 1.0
    """fp8 caches store K / k_scale (one scale for every layer's K: a per-tensor scale)."""
    v_scale: float = 1.0
    """fp8 caches store V / v_scale."""

    def __post_init__(self) -> None:
        if self.block_size < 1:
            raise ValueError(f"block_size={self.block_size} must be >= 1")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError("gpu_memory_utilization must be in (0, 1]")
        if self.kv_cache_memory_bytes is not None and self.kv_cache_memory_bytes <= 0:
            raise ValueError("kv_cache_memory_bytes must be positive")
        if self.num_blocks_override is not None and self.num_blocks_override < 2:
            raise ValueError("num_blocks_override must be >= 2")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"kv_cache_dtype={self.kv_cache_dtype!r} must be one of: "
                             f"{', '.join(KV_CACHE_DTYPES)}")
        if not (self.k_scale > 0 and self.v_scale > 0):
            raise ValueError("k_scale and v_scale must be positive")


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_batched_tokens: int = 512
    """Token budget of one engine step (decodes + prefill chunks): the chunked-prefill size."""
    max_num_seqs: int = 64
    """Most requests running at once (the decode batch cap)."""
    max_model_len: int = 4096
    """Longest prompt + output accepted (also capped by the model's max positions)."""

    def __post_init__(self) -> None:
        if self.max_num_batched_tokens < 1:
            raise ValueError(f"max_num_batched_tokens={self.max_num_batched_tokens} must be >= 1")
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs={self.max_num_seqs} must be >= 1")
        if self.max_model_len < 2:
            raise ValueError(f"max_model_len={self.max_model_len} must be >= 2")


@dataclass(frozen=True)
class GraphConfig:
    enforce_eager: bool = False
    """Run every step eagerly: no CUDA graphs. Graphs apply on CUDA only (a CPU engine's
    decode fast path is the compiled ``decode_step``), so on CPU this changes nothing."""
    max_capture_batch: int | None = None
    """Largest decode batch captured as a CUDA graph (buckets 1, 2, 4, 8, 16, 24, ... up to
    it; see engine.cuda_graphs); None: max_num_seqs. Larger decode steps run eagerly."""

    def __post_init__(self) -> None:
        if self.max_capture_batch is not None and self.max_capture_batch < 1:
            raise ValueError(f"max_capture_batch={self.max_capture_batch} must be >= 1")
