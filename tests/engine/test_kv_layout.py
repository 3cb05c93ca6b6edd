"""The KV cache's memory layout (engine.kv_layout): indexed [N, L, 2, bs, KVH, D], stored
head-major, so that any head range of a block is one contiguous run of memory (what lets
a KV transfer between TP sizes move head slices without a copy)."""

from __future__ import annotations

import torch

from engine import Engine
from engine.kv_layout import head_major, is_head_major, new_kv_cache, storage_view


def test_a_new_cache_is_zeroed_and_head_major():
    kv = new_kv_cache(5, 3, 4, 2, 8, torch.bfloat16)
    assert kv.shape == (5, 3, 2, 4, 2, 8) and kv.dtype == torch.bfloat16
    assert kv.count_nonzero() == 0 and is_head_major(kv) and not kv.is_contiguous()
    memory = storage_view(kv)
    assert memory.shape == (5, 2, 3, 2, 4, 8) and memory.is_contiguous()
    kv[1, 2, 1, 3, 0] = 7  # block 1, layer 2, V, slot 3, KV head 0
    assert memory[1, 0, 2, 1, 3].eq(7).all() and memory.count_nonzero() == 8
    # heads [0, 1) of block 1 (every layer) are one contiguous run
    part = memory[1, 0:1]
    assert part.is_contiguous() and part.data_ptr() == kv[1].data_ptr()


def test_head_major_keeps_the_values_and_only_moves_them():
    x = torch.randn(3, 2, 2, 4, 4, 8)
    y = head_major(x)
    assert torch.equal(x, y) and is_head_major(y) and not is_head_major(x)


def test_the_engines_cache_is_head_major(tiny_model_dir):
    engine = Engine.from_pretrained(tiny_model_dir("llama"), dtype="float32", device="cpu",
                                    block_size=4, load_tokenizer=False,
                                    kv_cache_memory_bytes=1 << 20)
    assert is_head_major(engine.runner.kv_cache)
