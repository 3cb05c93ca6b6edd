"""Attention backends vs a dense causal reference, on ragged batches over paged KV."""

from __future__ import annotations

import random

import pytest
import torch

from engine.attention.metadata import split_slots
from engine.attention.registry import select_backend
from engine.attention.torch_ref import TorchAttentionBackend, write_kv_cache
from engine.kv_layout import head_major, new_kv_cache, storage_view
from tests.engine.paged_helpers import build_metadata, random_block_tables, slots_for

H, KVH, D = 4, 2, 8  # GQA: two query heads per KV head
NUM_BLOCKS = 64


def dense_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float
) -> torch.Tensor:
    """softmax(QK^T)V for one sequence on contiguous K/V. q [n, H, D] are the last n tokens
    of the context k, v [S, KVH, D]; query i sits at position S - n + i."""
    n, S = q.shape[0], k.shape[0]
    group = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(group, dim=1)  # [S, H, D]
    v = v.repeat_interleave(group, dim=1)
    scores = torch.einsum("nhd,shd->hns", q.double(), k.double()) * scale  # [H, n, S]
    query_pos = torch.arange(S - n, S)[:, None]
    scores = scores.masked_fill(torch.arange(S)[None, :] > query_pos, float("-inf"))
    return torch.einsum("hns,shd->nhd", scores.softmax(-1), v.double()).float()


def layer_caches(kv: torch.Tensor, layer: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """One layer's K and V of a block-major cache ``[N, L, 2, bs, KVH, D]``: strided views,
    as the engine passes them (the block stride spans every layer)."""
    return kv[:, layer, 0], kv[:, layer, 1]


def run_mixed_step(block_size, cached, new, seed, backend, device="cpu", num_blocks=NUM_BLOCKS,
                   dims=(H, KVH, D), heads_outer=True):
    """Fill each sequence's cached context, run one step, return (output, reference).
    ``dims``: (query heads, KV heads, head_dim); ``heads_outer``: the cache laid out as the
    engine's (``engine.kv_layout``), else token-major (a token's heads adjacent)."""
    H, KVH, D = dims
    gen = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    seq_lens = [c + n for c, n in zip(cached, new, strict=True)]
    tables = random_block_tables([-(-s // block_size) for s in seq_lens], num_blocks, rng)
    # Garbage everywhere (finite): padded and stale slots must be masked, not zero.
    kv = torch.randn(num_blocks, 3, 2, block_size, KVH, D, generator=gen)
    k_cache, v_cache = layer_caches(head_major(kv) if heads_outer else kv)
    full_k = [torch.randn(s, KVH, D, generator=gen) for s in seq_lens]
    full_v = [torch.randn(s, KVH, D, generator=gen) for s in seq_lens]
    for table, c, k, v in zip(tables, cached, full_k, full_v, strict=True):
        if c:
            slots = torch.tensor(slots_for(table, 0, c, block_size))
            write_kv_cache(k[:c], v[:c], k_cache, v_cache, split_slots(slots, block_size))
    queries = [torch.randn(n, H, D, generator=gen) for n in new]
    md = build_metadata(tables, cached, new, block_size, device=device)
    scale = D**-0.5
    to = lambda t: t.to(device)  # noqa: E731
    out = backend.forward(
        to(torch.cat(queries)),
        to(torch.cat([k[c:] for k, c in zip(full_k, cached, strict=True)])),
        to(torch.cat([v[c:] for v, c in zip(full_v, cached, strict=True)])),
        to(k_cache),
        to(v_cache),
        md,
        scale,
    ).cpu()
    ref = torch.cat(
        [dense_reference(q, k, v, scale) for q, k, v in zip(queries, full_k, full_v, strict=True)]
    )
    return out, ref


@pytest.mark.parametrize("heads_outer", [True, False], ids=["head-major", "token-major"])
@pytest.mark.parametrize("block_size", [1, 4, 16])
def test_torch_backend_matches_dense_reference_on_mixed_batch(block_size, heads_outer):
    # Three decodes (one at a block boundary), then prefill chunks: fresh, continuing a
    # cached context, and a single-token chunk.
    cached = [5, block_size * 2 - 1, 17, 0, 11, 9]
    new = [1, 1, 1, 7, 6, 3]
    out, ref = run_mixed_step(block_size, cached, new, seed=block_size,
                              backend=TorchAttentionBackend(), heads_outer=heads_outer)
    assert out.shape == (sum(new), H, D)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "cached,new", [([3, 8], [1, 1]), ([0], [9]), ([12], [4]), ([0, 6], [5, 2])]
)
def test_torch_backend_decode_only_and_prefill_only(cached, new):
    out, ref = run_mixed_step(4, cached, new, seed=7, backend=TorchAttentionBackend())
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_many_decodes_of_mixed_lengths_are_grouped_and_exact():
    # Enough decodes to be split into length groups; rows come back in batch order.
    from engine.attention.torch_ref import MIN_GROUP_ROWS

    rng = random.Random(3)
    n = MIN_GROUP_ROWS * 4 + 3
    cached = [rng.randint(1, 60) for _ in range(n)]
    out, ref = run_mixed_step(4, cached + [5], [1] * n + [4], seed=3,
                              backend=TorchAttentionBackend(), num_blocks=2048)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def _cpu_paged_backend():
    from engine.attention.cpu_paged import CpuPagedAttentionBackend

    if not CpuPagedAttentionBackend.is_available(torch.device("cpu")):
        pytest.skip("no C++ compiler/ninja here: the compiled decode kernel cannot build")
    return CpuPagedAttentionBackend()


# head_dim 8 takes the kernels' plain paths (decodes) and the torch path (chunks); head_dim
# 32 with 8-aligned blocks the vectorised decode kernel and the prefill kernel.
@pytest.mark.parametrize("block_size,dims", [(1, (H, KVH, D)), (4, (H, KVH, D)),
                                             (16, (H, KVH, D)), (16, (8, 2, 32)),
                                             (8, (6, 2, 32))])
@pytest.mark.parametrize("heads_outer", [True, False], ids=["head-major", "token-major"])
def test_cpu_paged_kernels_match_dense_reference(block_size, dims, heads_outer):
    backend = _cpu_paged_backend()
    from engine.attention import cpu_kernels

    assert cpu_kernels.load().prefill_supported(*dims, block_size) == (dims[2] == 32)
    rng = random.Random(block_size)
    n = 20
    cached = [rng.randint(1, 70) for _ in range(n)]
    # Decode-only step, then mixed steps: one chunk after a cached context; a fresh chunk
    # and a continued one; then prefill-only steps, long chunks across many blocks (the
    # kernel's query tiles and the diagonal inside a block).
    for new, ctx in (([1] * n, cached), ([1] * n + [6], cached + [9]),
                     ([1] * n + [5, 3], cached + [0, 12]), ([70, 1, 33], [0, 0, 45]),
                     ([17, 40], [100, 3])):
        out, ref = run_mixed_step(block_size, ctx, new, seed=5, backend=backend,
                                  num_blocks=4096, dims=dims, heads_outer=heads_outer)
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_plan_is_rebuilt_for_each_step():
    backend = TorchAttentionBackend()
    out1, ref1 = run_mixed_step(4, [3, 0], [1, 5], seed=1, backend=backend)
    out2, ref2 = run_mixed_step(4, [6, 9, 2], [1, 1, 4], seed=2, backend=backend)
    torch.testing.assert_close(out1, ref1, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out2, ref2, atol=1e-5, rtol=1e-5)


def test_slot_mapping_writes_land_in_their_blocks():
    block_size = 4
    kv = new_kv_cache(8, 2, block_size, KVH, D, torch.float32)
    k_cache, v_cache = layer_caches(kv, 0)
    table = [7, 2]  # positions 0..3 -> block 7, 4..5 -> block 2
    slots = torch.tensor(slots_for(table, 0, 6, block_size))
    assert slots.tolist() == [28, 29, 30, 31, 8, 9]
    key = torch.arange(6, dtype=torch.float)[:, None, None].expand(6, KVH, D) + 1
    write_kv_cache(key, -key, k_cache, v_cache, split_slots(slots, block_size))
    assert torch.equal(k_cache[7, :, 0, 0], torch.tensor([1.0, 2, 3, 4]))
    assert torch.equal(k_cache[2, :2, 1, 3], torch.tensor([5.0, 6]))
    assert torch.equal(v_cache[2, :2, 0, 0], torch.tensor([-5.0, -6]))
    assert kv[:, 1].count_nonzero() == 0  # the other layer's blocks are untouched
    assert k_cache[2, 2:].abs().sum() == 0 and k_cache[:2].abs().sum() == 0  # nothing else touched
    # in memory, head-major: block 2's KV head 1, layer 0, K, rows 0..1
    assert torch.equal(storage_view(kv)[2, 1, 0, 0, :2, 3], torch.tensor([5.0, 6]))


def test_registry_picks_torch_on_cpu():
    backend = select_backend(None, torch.device("cpu"), 16)
    assert isinstance(backend, TorchAttentionBackend)
    assert isinstance(select_backend("auto", torch.device("cpu"), 3), TorchAttentionBackend)
    assert isinstance(select_backend("torch", torch.device("cpu"), 1), TorchAttentionBackend)


def test_registry_rejects_bad_block_size_for_flash_attn():
    with pytest.raises(ValueError, match=r"divisible by 256 \(got 16\).*--block-size 256.*torch"):
        select_backend("flash_attn", torch.device("cuda"), 16)


def test_registry_rejects_unknown_and_unavailable_backends():
    with pytest.raises(ValueError, match="unknown attention backend 'xformers'.*torch"):
        select_backend("xformers", torch.device("cpu"), 16)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="not available on cpu.*flash-attn"):
            select_backend("flash_attn", torch.device("cpu"), 256)


@pytest.mark.gpu
def test_torch_backend_on_cuda_matches_dense_reference():
    cached, new = [5, 31, 17, 0, 11], [1, 1, 1, 7, 6]
    out, ref = run_mixed_step(16, cached, new, 5, TorchAttentionBackend(), device="cuda")
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_flash_attn_matches_torch_backend_on_cuda(dtype):
    pytest.importorskip("flash_attn")
    cuda = torch.device("cuda")
    flash = _Cast(select_backend("flash_attn", cuda, 256), dtype)
    torch_ref = _Cast(TorchAttentionBackend(), dtype)
    cached, new = [300, 511, 0, 256], [1, 1, 200, 40]
    out, ref = run_mixed_step(256, cached, new, 3, flash, device=cuda, num_blocks=8)
    out_torch, _ = run_mixed_step(256, cached, new, 3, torch_ref, device=cuda, num_blocks=8)
    torch.testing.assert_close(out, ref, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(out, out_torch, atol=2e-2, rtol=2e-2)


class _Cast:
    """Runs a backend in a low-precision dtype (flash-attn takes fp16/bf16 only)."""

    def __init__(self, backend, dtype):
        self.backend, self.dtype = backend, dtype

    def forward(self, q, k, v, k_cache, v_cache, md, scale):
        args = (t.to(self.dtype) for t in (q, k, v, k_cache, v_cache))
        return self.backend.forward(*args, md, scale).float()
