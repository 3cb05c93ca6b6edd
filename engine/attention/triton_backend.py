"""Triton backend: paged attention kernels for any power-of-two block size >= 16 (CUDA, ROCm).

One step per layer is three launches at most, all reading the cache through the block table
(the kernels are in ``triton_kernels``):

1. ``write_kv``: the new tokens' K/V to their slots (every chunk's own K/V included, so the
   prefill kernel reads one paged context: cached prefix + chunk);
2. ``paged_decode`` for the leading ``num_decodes`` sequences: one program per (sequence,
   KV head[, split]) holding the KV head's G query heads; split-K ("flash-decoding") with a
   reduction kernel when the batch alone would leave the GPU's SMs idle;
3. ``paged_prefill`` for the prefill chunks: tiles of (query tokens x G heads), causal from
   each query's absolute position, no key visited past a tile's diagonal.

The per-step plan (prefill tiles, split count) is built at the first layer from the
metadata's host-side lists and reused by every layer: no device syncs.

``triton`` is imported when the backend is constructed, so this module imports without it.
On CPU it runs only under ``TRITON_INTERPRET=1`` (Triton's interpreter: slow, used by the
tests to check the kernels' logic on machines without a GPU); ``auto`` never picks it there.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass

import torch

from engine.attention import kv_quant
from engine.attention.base import AttentionBackend
from engine.attention.metadata import AttentionMetadata

MIN_BLOCK_SIZE = 16  # tl.dot tiles need >= 16 rows; smaller blocks would waste every tile
DEFAULT_SPLIT_TOKENS = 512  # shortest context range a decode split is given


def _triton_installed() -> bool:
    try:
        return importlib.util.find_spec("triton") is not None
    except (ImportError, ValueError):  # a broken or blocked install counts as absent
        return False


@dataclass
class _TritonPlan:
    decode_splits: int  # split-K factor of the decode launch (1: no reduction kernel)
    max_decode_len: int  # longest decode context (sizes the split ranges)
    prefill_block_q: int  # query tokens per prefill tile
    prefill_tiles: torch.Tensor | None  # [num_tiles * 2] int32 (sequence, first query)


class TritonAttentionBackend(AttentionBackend):
    name = "triton"
    requirements = "the triton package and CUDA (on CPU: TRITON_INTERPRET=1, for tests)"
    auto_device_types = ("cuda",)  # on CPU the interpreter is a test tool, never a default
    supports_fp8_kv = True
    # Capturable: the kernels loop to each row's seq_len read on the device, and a static
    # plan (AttentionMetadata.static_shapes) sizes the launch from the batch size and the
    # longest context a replay may have.
    supports_cuda_graphs = True

    def __init__(self, *, num_sms: int | None = None,
                 split_tokens: int = DEFAULT_SPLIT_TOKENS, block_n: int = 64) -> None:
        """``num_sms``: processors to fill (default: the CUDA device's SM count, 1 on CPU,
        i.e. no split-K); ``split_tokens``: shortest decode split; ``block_n``: key tile."""
        from engine.attention import triton_kernels  # lazy: optional dependency

        self._kernels = triton_kernels
        self._num_sms = num_sms
        self._split_tokens = split_tokens
        self._block_n = block_n
        self._plan_source: AttentionMetadata | None = None
        self._plan: _TritonPlan | None = None

    @classmethod
    def is_available(cls, device: torch.device) -> bool:
        if device.type == "cuda":
            usable = torch.cuda.is_available()
        else:  # Triton's interpreter runs CPU tensors, for tests; read at call time
            usable = device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"
        return usable and _triton_installed()

    @classmethod
    def supports_block_size(cls, block_size: int) -> bool:
        return block_size >= MIN_BLOCK_SIZE and block_size & (block_size - 1) == 0

    @classmethod
    def block_size_requirement(cls) -> str:
        return f"a power-of-two block_size >= {MIN_BLOCK_SIZE}"

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
        query, key, value = (t if t.stride(-1) == 1 else t.contiguous()
                             for t in (query, key, value))
        kern, md = self._kernels, metadata
        scales = self._scales_for(key_cache)
        kern.write_kv(key, value, key_cache, value_cache, md.slot_mapping, *scales)
        plan = self._get_plan(md, query.shape[1], key_cache.shape[2], query.device)
        out = torch.empty_like(query)
        nd = md.num_decodes
        if nd:
            kern.paged_decode(query[:nd], key_cache, value_cache, md.block_tables[:nd],
                              md.seq_lens[:nd], scale, out[:nd], plan.max_decode_len,
                              num_splits=plan.decode_splits, block_n=self._block_n,
                              k_scale=scales[0], v_scale=scales[1])
        if plan.prefill_tiles is not None:
            kern.paged_prefill(query, key_cache, value_cache, md.block_tables, md.seq_lens,
                               md.cu_seqlens_q, plan.prefill_tiles, plan.prefill_block_q,
                               scale, out, block_n=self._block_n,
                               k_scale=scales[0], v_scale=scales[1])
        return out

    def _scales_for(self, key_cache: torch.Tensor) -> tuple[float | None, float | None]:
        """(k_scale, v_scale) of an fp8 cache, (None, None) for a float one."""
        if not kv_quant.is_fp8(key_cache.dtype):
            return None, None
        if (key_cache.dtype == torch.float8_e4m3fn and key_cache.is_cuda
                and torch.cuda.get_device_capability(key_cache.device) < (8, 9)):
            # Triton has no e4m3 type before Ada/Hopper (checked: sm_80 refuses to compile)
            raise ValueError(
                "an fp8_e4m3 KV cache needs a GPU of compute capability 8.9 or newer (Ada, "
                "Hopper) with the triton backend; use --kv-cache-dtype fp8_e5m2 or "
                "--attention-backend torch")
        return self.kv_scales

    def _get_plan(self, md: AttentionMetadata, num_heads: int, kv_heads: int,
                  device: torch.device) -> _TritonPlan:
        """The step's plan, built at its first layer (cached by the metadata's identity:
        the runner builds a new metadata object every step)."""
        if self._plan_source is not md or self._plan is None:
            self._plan = self._build_plan(md, num_heads, kv_heads, device)
            self._plan_source = md
        return self._plan

    def _build_plan(self, md: AttentionMetadata, num_heads: int, kv_heads: int,
                    device: torch.device) -> _TritonPlan:
        nd, kern = md.num_decodes, self._kernels
        max_decode_len = max(md.seq_lens_cpu[:nd], default=0)
        splits = 1
        if nd:
            splits = kern.decode_num_splits(nd, kv_heads, max_decode_len, self._split_tokens,
                                            self._sm_count(device))
        block_q = kern.prefill_block_q(num_heads // kv_heads)
        tiles = None
        if nd < md.num_seqs:
            tiles = kern.prefill_tiles(md.query_lens_cpu, nd, block_q, device)
        return _TritonPlan(splits, max_decode_len, block_q, tiles)

    def _sm_count(self, device: torch.device) -> int:
        if self._num_sms is None:
            self._num_sms = (torch.cuda.get_device_properties(device).multi_processor_count
                             if device.type == "cuda" else 1)
        return self._num_sms
