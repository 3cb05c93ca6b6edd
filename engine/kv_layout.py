"""The paged KV cache's memory layout: one tensor per engine (per TP rank), block-major.

Code indexes the cache as ``[num_blocks, num_layers, 2, block_size, num_kv_heads, head_dim]``
(2 = K, V): a layer's K is ``kv_cache[:, layer, 0]``, ``[num_blocks, block_size, KVH, D]``,
and every attention backend takes those strided views. In memory the KV head comes right
after the block (head-major blocks)::

    storage: [num_blocks, num_kv_heads, num_layers, 2, block_size, head_dim]

so that every head range of a block is one contiguous run of memory: when prefill and decode
pools use different tensor-parallel sizes, a route carries a head slice of each block, and
it moves straight from the sender's cache into the receiver's (``kv_transfer``), where a
token-major block would need a gather on one side and a scatter on the other. Within a
block and layer, a KV head's tokens are adjacent (each head's K rows in order), which is
also how paged attention reads them.
"""

from __future__ import annotations

import torch

# storage dim -> logical dim: logical = storage.permute(_TO_LOGICAL)
_TO_LOGICAL = (0, 2, 3, 4, 1, 5)
_TO_STORAGE = (0, 4, 1, 2, 3, 5)


def new_kv_cache(num_blocks: int, num_layers: int, block_size: int, num_kv_heads: int,
                 head_dim: int, dtype: torch.dtype, device: torch.device | str = "cpu",
                 ) -> torch.Tensor:
    """A zeroed cache: the logical ``[N, L, 2, block_size, KVH, D]`` view of head-major
    storage. Zeros, not empty: batched attention reads masked-out padding slots."""
    storage = torch.zeros((num_blocks, num_kv_heads, num_layers, 2, block_size, head_dim),
                          dtype=dtype, device=device)
    return storage.permute(_TO_LOGICAL)


def head_major(kv_cache: torch.Tensor) -> torch.Tensor:
    """A head-major copy of a logical ``[N, L, 2, bs, KVH, D]`` cache (any strides): the
    same values laid out as ``new_kv_cache`` lays them."""
    return kv_cache.permute(_TO_STORAGE).contiguous().permute(_TO_LOGICAL)


def is_head_major(kv_cache: torch.Tensor) -> bool:
    """Whether a logical cache is laid out as ``new_kv_cache`` lays it (its storage view
    ``[N, KVH, L, 2, bs, D]`` contiguous)."""
    return kv_cache.dim() == 6 and kv_cache.permute(_TO_STORAGE).is_contiguous()


def storage_view(kv_cache: torch.Tensor) -> torch.Tensor:
    """The head-major storage ``[N, KVH, L, 2, bs, D]`` of such a cache (a view)."""
    if not is_head_major(kv_cache):
        raise ValueError("not a head-major KV cache (see engine.kv_layout.new_kv_cache)")
    return kv_cache.permute(_TO_STORAGE)
