"""Attention metadata: the one description of a ragged, paged batch that every backend reads.

Built once per engine step by the model runner and shared by all layers. Sequences are
ordered decodes first: the first ``num_decodes`` sequences each contribute exactly one query
token, the rest are prefill chunks of any length. This is the layout flash-attn's varlen and
paged kernels take.

Slot arithmetic (block_size = 4 in the picture)::

    block_table[i] = [7, 2]          physical blocks of sequence i, in logical order
    position p     -> block_table[i][p // block_size], offset p % block_size
    slot           =  block * block_size + offset            (flat index into the cache)
    tokens 0..5   -> slots 28 29 30 31 | 8 9
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class AttentionMetadata:
    # [num_tokens] int64: flat cache slot where each new token's K/V is written.
    slot_mapping: torch.Tensor
    # [num_seqs + 1] int32: prefix sums of query lengths (flash-attn's cu_seqlens_q).
    cu_seqlens_q: torch.Tensor
    # [num_seqs + 1] int32: prefix sums of total context lengths after this step (cu_seqlens_k).
    cu_seqlens_k: torch.Tensor
    # [num_seqs] int32: context length of each sequence after this step (cached + new tokens).
    seq_lens: torch.Tensor
    # [num_seqs, max_num_blocks] int32: physical block ids, padded with 0 past each sequence.
    block_tables: torch.Tensor
    # Host-side copies, so backends can plan without a device sync.
    query_lens_cpu: list[int]
    seq_lens_cpu: list[int]
    num_decodes: int  # leading sequences with exactly one query token
    max_query_len: int
    max_seq_len: int
    # CUDA graph capture (engine.cuda_graphs): the step is recorded once and replayed with
    # other values in the same buffers, so a backend must plan from shapes alone: the host
    # lists hold upper bounds (seq_lens_cpu: the longest context a replay may have), and
    # nothing may read device values on the host or size a tensor by them.
    static_shapes: bool = False
    # (block_size, (blocks, offsets)) once ``slot_index`` computed it: shared by all layers.
    _slot_index: tuple | None = field(default=None, repr=False, compare=False)

    def slot_index(self, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``slot_mapping`` as (block, offset) pairs, computed once per step: a layer's cache
        is a strided view of the block-major cache, addressed by (block, offset)."""
        if self._slot_index is None or self._slot_index[0] != block_size:
            self._slot_index = (block_size, split_slots(self.slot_mapping, block_size))
        return self._slot_index[1]

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens_cpu)

    @property
    def num_decode_tokens(self) -> int:
        return self.num_decodes


def split_slots(slot_mapping: torch.Tensor, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat slots -> (block ids, offsets in the block)."""
    blocks = torch.div(slot_mapping, block_size, rounding_mode="floor")
    return blocks, slot_mapping - blocks * block_size
