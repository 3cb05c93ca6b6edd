"""CPU attention backend: the torch reference with decodes run by a compiled paged kernel.

Prefill chunks and the KV writes are the reference backend's; decodes (one query each), in
decode-only and mixed steps alike, go to ``csrc/paged_decode.cpp``, which reads K/V through
the block table without gathering padded copies. float32 only (other dtypes fall back to
the torch path). Available when the kernel builds on this machine (see ``cpu_kernels``).
"""

from __future__ import annotations

import torch

from engine.attention import cpu_kernels
from engine.attention.metadata import AttentionMetadata
from engine.attention.torch_ref import TorchAttentionBackend, write_kv_cache


class CpuPagedAttentionBackend(TorchAttentionBackend):
    name = "cpu_paged"
    requirements = "a CPU device and a C++ compiler to build the paged decode kernel"

    @classmethod
    def is_available(cls, device: torch.device) -> bool:
        return device.type == "cpu" and cpu_kernels.load() is not None

    def forward(self, query, key, value, key_cache, value_cache,
                metadata: AttentionMetadata, scale: float) -> torch.Tensor:
        nd = metadata.num_decodes
        if nd == 0 or query.dtype != torch.float32:
            return super().forward(query, key, value, key_cache, value_cache, metadata, scale)
        write_kv_cache(key, value, key_cache, value_cache,
                       metadata.slot_index(key_cache.shape[1]))
        decoded = self._paged_decode(query, key_cache, value_cache, metadata, scale)
        if nd == metadata.num_seqs:  # decode-only step: no plan needed
            return decoded
        # Mixed step: the kernel takes the decode rows too (no padded gathers for them), the
        # reference path only the prefill chunks.
        plan = self._get_plan(metadata, key_cache.shape[1], query.dtype, with_decodes=False)
        prefills = self._prefills(query, key, value, key_cache, value_cache, plan, scale)
        return torch.cat([decoded, *prefills])

    @staticmethod
    def _paged_decode(query, key_cache, value_cache, md: AttentionMetadata,
                      scale: float) -> torch.Tensor:
        nd = md.num_decodes
        return cpu_kernels.load().paged_decode(
            query[:nd].contiguous(), key_cache, value_cache,
            md.block_tables[:nd].contiguous(), md.seq_lens[:nd].contiguous(), scale)
