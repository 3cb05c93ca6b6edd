"""The reference attention backend: plain torch on paged KV, runs anywhere (CPU tests, CUDA).

It is also the CPU production path (the engine's CPU throughput benchmark runs on it), so it
batches what it can:

* decodes (the leading ``num_decodes`` sequences, one query each) are attended together:
  their blocks are gathered with one ``index_select`` through the padded block table into
  ``[B, max_blocks * block_size, KVH, D]``, positions past each ``seq_len`` are masked, and
  GQA is done by viewing the queries as ``[B, KVH, group, D]`` (no K/V repeat);
* prefill chunks (few per step) are attended one by one with ``scaled_dot_product_attention``
  and a causal mask shifted by the cached context: query i of a chunk of ``q_len`` tokens
  sits at absolute position ``seq_len - q_len + i`` and sees keys ``0 ..`` that position.

The per-step plan (gather indices, masks) is built once, at the first layer, from the
metadata's host-side lists, and reused by every layer of the same step: no device syncs.

Contract with the model runner:
* build a new ``AttentionMetadata`` object every step; the plan is cached by the object's
  identity, so one mutated in place between steps would reuse a stale plan;
* keep the whole KV cache finite (allocate it with ``torch.zeros``, not ``torch.empty``):
  decodes read padded slots past ``seq_len`` and mask them, and ``0 * NaN`` is still NaN.

CUDA graphs (``AttentionMetadata.static_shapes``): the decodes are one group gathering every
row's whole block-table width (the longest context a replay may have), masked past each
``seq_len`` on the device: the captured kernels then fit any step of that batch size, at
the price of reading the full width every step (the Triton backend reads only up to each
``seq_len``).

An fp8 cache (``kv_quant``) is quantised on write and dequantised after each gather; prefill
chunks then read their own K/V back from the cache too, so a chunk attends to exactly the
values later steps will see (as the Triton kernels do).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from engine.attention import kv_quant
from engine.attention.base import AttentionBackend
from engine.attention.metadata import AttentionMetadata


def write_kv_cache(
    key: torch.Tensor,  # [num_tokens, KVH, D]
    value: torch.Tensor,  # [num_tokens, KVH, D]
    key_cache: torch.Tensor,  # [num_blocks, block_size, KVH, D], any block stride
    value_cache: torch.Tensor,  # [num_blocks, block_size, KVH, D], any block stride
    slot_index: tuple[torch.Tensor, torch.Tensor],  # (block, offset) per token, int64
    kv_scales: tuple[float, float] = (1.0, 1.0),  # an fp8 cache's (k_scale, v_scale)
) -> None:
    """Write the new tokens' K/V into their cache slots: one indexed copy per tensor.

    A layer's cache is a strided view of the block-major cache (a block holds every layer),
    so slots are addressed as (block, offset) pairs (``AttentionMetadata.slot_index``)
    rather than through a flat view."""
    if kv_quant.is_fp8(key_cache.dtype):
        key = kv_quant.quantize(key, key_cache.dtype, kv_scales[0])
        value = kv_quant.quantize(value, value_cache.dtype, kv_scales[1])
    key_cache.index_put_(slot_index, key)
    value_cache.index_put_(slot_index, value)


def gather_blocks(cache: torch.Tensor, blocks: torch.Tensor, dtype: torch.dtype,
                  scale: float) -> torch.Tensor:  # [len(blocks), block_size, KVH, D]
    """Blocks of one layer's cache, as ``dtype`` (dequantised when the cache is fp8)."""
    x = cache.index_select(0, blocks)
    return x if not kv_quant.is_fp8(x.dtype) else kv_quant.dequantize(x, dtype, scale)


@dataclass
class _PrefillPlan:
    start: int  # first row of this chunk's queries in the flat batch
    end: int  # one past its last row
    seq_len: int  # context length after this step (cached + new)
    # [num_blocks_used] int64 block ids to gather the context from, or None when the whole
    # context is this chunk (no cached prefix: attend to the new K/V directly).
    blocks: torch.Tensor | None
    # [q_len, seq_len] additive mask (0 / -inf) for a chunk after a cached prefix, else None
    # (plain causal).
    mask: torch.Tensor | None


@dataclass
class _DecodeGroup:
    """Decodes of similar length, attended together (padding only to the group's longest)."""

    # [n] int64 rows of these decodes in the batch, or None for all rows in order.
    rows: torch.Tensor | None
    num_rows: int
    # [n * max_blocks] int64: the group's block ids, row-major (padded with 0).
    blocks: torch.Tensor
    # [n, 1, 1, max_blocks * block_size] additive mask: -inf at and past seq_len.
    mask: torch.Tensor


@dataclass
class _StepPlan:
    num_decodes: int
    decode_groups: list[_DecodeGroup]
    prefills: list[_PrefillPlan]


# Decodes are split into up to this many length groups (sorted by seq_len) once there are
# at least MIN_GROUP_ROWS per group: the gather + attention read padded KV, so grouping
# similar lengths cuts the bytes moved (on CPU, decode attention is memory bound).
MAX_DECODE_GROUPS = 4
MIN_GROUP_ROWS = 8


class TorchAttentionBackend(AttentionBackend):
    name = "torch"
    supports_fp8_kv = True
    supports_cuda_graphs = True  # static plans read no device value on the host

    def __init__(self) -> None:
        # The plan of the step being run, and the metadata object it was built from.
        self._plan_source: AttentionMetadata | None = None
        self._plan: _StepPlan | None = None
        self._plan_decodes = True  # whether that plan has its decode groups

    @classmethod
    def is_available(cls, device: torch.device) -> bool:
        return True

    @classmethod
    def supports_block_size(cls, block_size: int) -> bool:
        return block_size >= 1

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
                       metadata.slot_index(key_cache.shape[1]), self.kv_scales)
        plan = self._get_plan(metadata, key_cache.shape[1], query.dtype,
                              gather_all=kv_quant.is_fp8(key_cache.dtype))
        pieces = []
        if plan.num_decodes:
            pieces.append(self._decodes(query[: plan.num_decodes], key_cache, value_cache,
                                        plan.decode_groups, scale, self.kv_scales))
        pieces += self._prefills(query, key, value, key_cache, value_cache, plan, scale)
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces)

    def _get_plan(self, md: AttentionMetadata, block_size: int, dtype: torch.dtype,
                  with_decodes: bool = True, gather_all: bool = False) -> _StepPlan:
        """The step's plan, built at its first layer. ``with_decodes=False`` leaves out the
        decode groups (for backends that attend decodes themselves); ``gather_all``: every
        chunk reads its context from the cache (an fp8 cache)."""
        if self._plan_source is not md or self._plan is None or with_decodes != self._plan_decodes:
            self._plan = build_plan(md, block_size, dtype, with_decodes, gather_all)
            self._plan_source, self._plan_decodes = md, with_decodes
        return self._plan

    def _prefills(self, query, key, value, key_cache, value_cache, plan: _StepPlan,
                  scale: float) -> list[torch.Tensor]:
        """Outputs of the plan's prefill chunks, in batch order ([q_len, H, D] each)."""
        return [self._prefill(query, key, value, key_cache, value_cache, p, scale,
                              self.kv_scales) for p in plan.prefills]

    @classmethod
    def _decodes(cls, query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                 groups: list[_DecodeGroup], scale: float,
                 kv_scales: tuple[float, float]) -> torch.Tensor:  # [B, H, D]
        if len(groups) == 1 and groups[0].rows is None:
            return cls._decode(query, key_cache, value_cache, groups[0], scale, kv_scales)
        out = torch.empty_like(query)
        for g in groups:
            part = cls._decode(query.index_select(0, g.rows), key_cache, value_cache, g, scale,
                               kv_scales)
            out.index_copy_(0, g.rows, part)
        return out

    @staticmethod
    def _decode(
        query: torch.Tensor,  # [B, H, D], one token per sequence
        key_cache: torch.Tensor,
        value_cache: torch.Tensor,
        group: _DecodeGroup,
        scale: float,
        kv_scales: tuple[float, float],
    ) -> torch.Tensor:  # [B, H, D]
        B, H, D = query.shape
        KVH = key_cache.shape[2]
        # [B, S, KVH, D] with S = max_blocks * block_size (padded past each seq_len)
        k = gather_blocks(key_cache, group.blocks, query.dtype, kv_scales[0]).view(B, -1, KVH, D)
        v = gather_blocks(value_cache, group.blocks, query.dtype, kv_scales[1]).view(
            B, -1, KVH, D)
        q = query.view(B, KVH, H // KVH, D)  # the group of queries sharing a KV head
        out = F.scaled_dot_product_attention(
            q, k.transpose(1, 2), v.transpose(1, 2), attn_mask=group.mask, scale=scale
        )  # [B, KVH, group, D]
        return out.reshape(B, H, D)  # SDPA may return it non-contiguous (CUDA)

    @staticmethod
    def _prefill(
        query: torch.Tensor,  # [num_tokens, H, D] (whole batch)
        key: torch.Tensor,  # [num_tokens, KVH, D]
        value: torch.Tensor,
        key_cache: torch.Tensor,
        value_cache: torch.Tensor,
        p: _PrefillPlan,
        scale: float,
        kv_scales: tuple[float, float] = (1.0, 1.0),
    ) -> torch.Tensor:  # [q_len, H, D]
        q = query[p.start : p.end].transpose(0, 1).unsqueeze(0)  # [1, H, q_len, D]
        if p.blocks is None:  # no cached prefix: the chunk's own K/V are the whole context
            k, v = key[p.start : p.end], value[p.start : p.end]  # [q_len, KVH, D]
        else:
            KVH, D = key_cache.shape[2:]
            k = gather_blocks(key_cache, p.blocks, q.dtype, kv_scales[0]).view(-1, KVH, D)
            v = gather_blocks(value_cache, p.blocks, q.dtype, kv_scales[1]).view(-1, KVH, D)
            k, v = k[: p.seq_len], v[: p.seq_len]
        out = F.scaled_dot_product_attention(
            q,
            k.transpose(0, 1).unsqueeze(0),  # [1, KVH, seq_len, D]
            v.transpose(0, 1).unsqueeze(0),
            attn_mask=p.mask,
            is_causal=p.mask is None,
            scale=scale,
            enable_gqa=True,
        )  # [1, H, q_len, D]
        return out[0].transpose(0, 1)


def build_plan(md: AttentionMetadata, block_size: int, dtype: torch.dtype,
               with_decodes: bool = True, gather_all: bool = False) -> _StepPlan:
    """Gather indices and masks for one step, from host-side lengths (no device sync).
    ``gather_all``: chunks without a cached prefix read their context from the cache too."""
    device = md.block_tables.device
    nd = md.num_decodes
    groups = _decode_groups(md, block_size, dtype) if nd and with_decodes else []
    prefills = []
    start = sum(md.query_lens_cpu[:nd])
    for i in range(nd, md.num_seqs):
        q_len, seq_len = md.query_lens_cpu[i], md.seq_lens_cpu[i]
        blocks = mask = None
        if seq_len > q_len or gather_all:
            blocks = md.block_tables[i, : -(-seq_len // block_size)].long()
        if seq_len > q_len:  # else plain causal (square)
            mask = _shifted_causal_mask(q_len, seq_len, dtype, device)
        prefills.append(_PrefillPlan(start, start + q_len, seq_len, blocks, mask))
        start += q_len
    return _StepPlan(nd, groups, prefills)


def _decode_groups(md: AttentionMetadata, block_size: int,
                   dtype: torch.dtype) -> list[_DecodeGroup]:
    nd = md.num_decodes
    lens = md.seq_lens_cpu[:nd]
    # A graph replays one plan for every step: no grouping by (changing) lengths.
    num_groups = 1 if md.static_shapes else min(MAX_DECODE_GROUPS, nd // MIN_GROUP_ROWS)
    if num_groups <= 1:
        return [_decode_group(md, None, list(range(nd)), lens, block_size, dtype)]
    order = sorted(range(nd), key=lens.__getitem__)
    size = -(-nd // num_groups)
    groups = []
    for start in range(0, nd, size):
        rows = order[start : start + size]
        groups.append(_decode_group(md, rows, rows, [lens[r] for r in rows], block_size, dtype))
    return groups


def _decode_group(md: AttentionMetadata, rows: list[int] | None, row_list: list[int],
                  lens: list[int], block_size: int, dtype: torch.dtype) -> _DecodeGroup:
    device = md.block_tables.device
    max_blocks = -(-max(lens) // block_size)
    n = len(row_list)
    if rows is None:
        rows_t, tables, seq_lens = None, md.block_tables[:n], md.seq_lens[:n]
    else:
        rows_t = torch.tensor(rows, dtype=torch.long, device=device)
        tables = md.block_tables.index_select(0, rows_t)
        seq_lens = md.seq_lens.index_select(0, rows_t)
    blocks = tables[:, :max_blocks].reshape(-1).long()
    key_pos = torch.arange(max_blocks * block_size, device=device)  # [S]
    past_end = key_pos[None, :] >= seq_lens[:, None]  # [n, S]
    mask = torch.zeros(past_end.shape, dtype=dtype, device=device)
    mask = mask.masked_fill_(past_end, float("-inf"))[:, None, None, :]
    return _DecodeGroup(rows_t, len(row_list), blocks, mask)


def _shifted_causal_mask(
    q_len: int, seq_len: int, dtype: torch.dtype, device: torch.device
) -> torch.Tensor:  # [q_len, seq_len], 0 where visible, -inf elsewhere
    query_pos = torch.arange(seq_len - q_len, seq_len, device=device)[:, None]  # absolute
    key_pos = torch.arange(seq_len, device=device)[None, :]
    mask = torch.zeros(q_len, seq_len, dtype=dtype, device=device)
    return mask.masked_fill_(key_pos > query_pos, float("-inf"))
