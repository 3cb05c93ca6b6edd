"""flash-attn 2 backend: one varlen kernel call over the whole ragged, paged batch (CUDA).

``flash_attn_varlen_func`` with ``block_table`` reads K/V straight from the paged cache and,
with ``causal=True`` and ``seqlen_k > seqlen_q``, aligns the causal mask to the bottom right:
exactly "a chunk after a cached prefix". Upstream flash-attn's paged path only accepts
blocks whose size is a multiple of 256 tokens. flash_attn is imported only when the backend
is constructed, so this module imports on machines without it.
"""

from __future__ import annotations

import importlib.util

import torch

from engine.attention.base import AttentionBackend
from engine.attention.metadata import AttentionMetadata
from engine.attention.torch_ref import write_kv_cache

PAGED_BLOCK_MULTIPLE = 256  # flash-attn 2's paged KV needs block_size % 256 == 0


class FlashAttentionBackend(AttentionBackend):
    name = "flash_attn"
    requirements = "CUDA and the flash-attn package"  # shown when it is unavailable

    def __init__(self) -> None:
        from flash_attn import flash_attn_varlen_func  # lazy: CUDA-only dependency

        self._varlen = flash_attn_varlen_func

    @classmethod
    def is_available(cls, device: torch.device) -> bool:
        return (
            device.type == "cuda"
            and torch.cuda.is_available()
            and importlib.util.find_spec("flash_attn") is not None
        )

    @classmethod
    def supports_block_size(cls, block_size: int) -> bool:
        return block_size > 0 and block_size % PAGED_BLOCK_MULTIPLE == 0

    @classmethod
    def block_size_requirement(cls) -> str:
        return f"block_size divisible by {PAGED_BLOCK_MULTIPLE}"

    def forward(
        self,
        query: torch.Tensor,  # [num_tokens, H, D]
        key: torch.Tensor,  # [num_tokens, KVH, D]
        value: torch.Tensor,  # [num_tokens, KVH, D]
        key_cache: torch.Tensor,  # [num_blocks, block_size, KVH, D]
        value_cache: torch.Tensor,  # [num_blocks, block_size, KVH, D]
        metadata: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor:  # [num_tokens, H, D]
        write_kv_cache(key, value, key_cache, value_cache,
                       metadata.slot_index(key_cache.shape[1]))
        return self._varlen(
            query,
            key_cache,
            value_cache,
            cu_seqlens_q=metadata.cu_seqlens_q,
            cu_seqlens_k=metadata.cu_seqlens_k,
            max_seqlen_q=metadata.max_query_len,
            max_seqlen_k=metadata.max_seq_len,
            softmax_scale=scale,
            causal=True,
            block_table=metadata.block_tables,
        )
