"""CPU attention backend: the torch reference with both phases run by compiled paged kernels.

Decodes (one query each), in decode-only and mixed steps alike, go to ``paged_decode``;
prefill chunks go to ``paged_prefill`` (flash style, causal from each query's position, no
work above the diagonal: ``scaled_dot_product_attention`` computes and masks it, and a chunk
after a cached prefix needed a gathered copy of its context and a mask). Both are in
``csrc/paged_attention.cpp`` and read K/V through the block table; so does ``write_kv``,
which stores the new tokens' K/V. float32 only; other dtypes, and shapes the prefill kernel
does not take (``prefill_supported``: AVX2, head_dim 32/64/128, a block size multiple of
8), fall back to the torch path for that part.
Available when the kernels build on this machine (see ``cpu_kernels``). An fp8 KV cache is
refused (by the registry, and here should one reach it): the kernels read float32 caches.
"""

from __future__ import annotations

import torch

from engine.attention import cpu_kernels
from engine.attention.metadata import AttentionMetadata
from engine.attention.torch_ref import TorchAttentionBackend


class CpuPagedAttentionBackend(TorchAttentionBackend):
    name = "cpu_paged"
    supports_fp8_kv = False  # the compiled kernels read float32 caches
    supports_cuda_graphs = False  # CPU only (its decode fast path is decode_step)
    requirements = "a CPU device and a C++ compiler to build the paged attention kernels"

    @classmethod
    def is_available(cls, device: torch.device) -> bool:
        return device.type == "cpu" and cpu_kernels.load() is not None

    def forward(self, query, key, value, key_cache, value_cache,
                metadata: AttentionMetadata, scale: float) -> torch.Tensor:
        if key_cache.dtype != query.dtype and query.dtype == torch.float32:
            raise ValueError(
                f"the compiled CPU attention kernels read float32 KV caches, not "
                f"{key_cache.dtype}; use --attention-backend torch for an fp8 KV cache")
        kernels, nd, num_seqs = cpu_kernels.load(), metadata.num_decodes, metadata.num_seqs
        if query.dtype != torch.float32:
            return super().forward(query, key, value, key_cache, value_cache, metadata, scale)
        H, D = query.shape[1:]
        block_size, kv_heads = key_cache.shape[1:3]
        prefill_kernel = nd < num_seqs and kernels.prefill_supported(H, kv_heads, D, block_size)
        if nd == 0 and not prefill_kernel:
            return super().forward(query, key, value, key_cache, value_cache, metadata, scale)
        kernels.write_kv(key, value, key_cache, value_cache, *metadata.slot_index(block_size))
        parts = []
        if nd:
            parts.append(self._paged_decode(query, key_cache, value_cache, metadata, scale))
        if prefill_kernel:  # every chunk's K/V is in the cache now: one call for all chunks
            parts.append(kernels.paged_prefill(
                query, key_cache, value_cache, metadata.block_tables, metadata.seq_lens,
                metadata.cu_seqlens_q, nd, scale))
        elif nd < num_seqs:  # the reference path takes the chunks only
            plan = self._get_plan(metadata, block_size, query.dtype, with_decodes=False)
            parts += self._prefills(query, key, value, key_cache, value_cache, plan, scale)
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    @staticmethod
    def _paged_decode(query, key_cache, value_cache, md: AttentionMetadata,
                      scale: float) -> torch.Tensor:
        nd = md.num_decodes  # row slices: the kernel takes row strides, no copies
        return cpu_kernels.load().paged_decode(
            query[:nd], key_cache, value_cache, md.block_tables[:nd], md.seq_lens[:nd], scale)
