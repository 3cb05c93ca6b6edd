"""gather/scatter round trips and the wire header."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kv_transfer import blocks
from kv_transfer.header import CLOSE, DATA, HEADER_BYTES, TransferHeader, max_runs, run_window

from .helpers import BLOCKS, LAYERS, make_cache

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float8_e4m3fn]


@settings(max_examples=30, deadline=None)
@given(
    ids=st.lists(st.integers(0, BLOCKS - 1), min_size=1, max_size=8, unique=True),
    dst_seed=st.integers(0, 10_000),
    l0=st.integers(0, LAYERS - 1),
    dtype=st.sampled_from(DTYPES),
)
def test_gather_scatter_round_trip(ids, dst_seed, l0, dtype):
    src = make_cache(1, dtype)
    dst = make_cache(2, dtype)
    dst_ids = torch.randperm(BLOCKS, generator=torch.Generator().manual_seed(dst_seed))[: len(ids)]
    layers = slice(l0, LAYERS)
    buf = blocks.gather(src, ids, layers)
    assert buf.shape == (len(ids), LAYERS - l0, *src.shape[2:]) and buf.is_contiguous()
    before = dst.clone()
    blocks.scatter(dst, dst_ids, buf, layers)
    as_bytes = lambda t: t.view(torch.uint8)
    # The scattered blocks hold the source blocks, block i -> dst_ids[i], for those layers.
    assert torch.equal(as_bytes(dst[dst_ids, l0:]), as_bytes(src[ids, l0:]))
    # Nothing else changed.
    untouched = torch.ones(BLOCKS, dtype=torch.bool)
    untouched[dst_ids] = False
    assert torch.equal(as_bytes(dst[untouched]), as_bytes(before[untouched]))
    assert torch.equal(as_bytes(dst[:, :l0]), as_bytes(before[:, :l0]))


def test_cpu_fast_scatter_matches_index_copy():
    src, dst, ref = make_cache(1), make_cache(2), make_cache(2)
    buf = blocks.gather(src, [5, 0, 9], slice(1, 3))
    blocks.scatter(dst, [3, 7, 1], buf, slice(1, 3))  # numpy path (CPU, contiguous)
    ref[:, 1:3].index_copy_(0, torch.tensor([3, 7, 1]), buf)
    assert torch.equal(dst, ref)
    noncontig = make_cache(2).transpose(3, 4)  # not contiguous: index_copy_ path
    blocks.scatter(noncontig, [3, 7, 1], buf.transpose(3, 4), slice(1, 3))
    assert torch.equal(noncontig.transpose(3, 4), ref)


@pytest.mark.parametrize("layers,heads", [(slice(None), slice(None)), (slice(1, 3), slice(None)),
                                          (slice(None), slice(1, 3)), (slice(0, 2), slice(2, 3))])
def test_scatter_into_a_head_major_cache_matches_index_copy(layers, heads):
    src = make_cache(1, kv_heads=4)
    dst, ref = make_cache(2, heads_outer=True, kv_heads=4), make_cache(2, kv_heads=4)
    buf = blocks.gather(src, [5, 0, 9], layers, heads=heads)
    blocks.scatter(dst, [3, 7, 1], buf, layers, heads)  # numpy path, in memory order
    ref[:, layers, :, :, heads].index_copy_(0, torch.tensor([3, 7, 1]), buf)
    assert blocks.heads_outer(dst) and torch.equal(dst, ref)


def test_block_view_is_the_cache_memory_of_one_blocks_layers():
    kv = make_cache(1)
    view = blocks.BlockViews(kv)(5, (1, 3))
    assert view.dtype == torch.uint8 and view.is_contiguous()
    assert torch.equal(view, kv[5, 1:3].contiguous().view(torch.uint8).view(-1))
    view.zero_()  # writes land in the cache, in that block's layers only
    assert kv[5, 1:3].count_nonzero() == 0 and kv[5, 0].count_nonzero() > 0
    assert torch.equal(kv[4], make_cache(1)[4])


def test_block_views_cover_every_layer_range():
    kv = make_cache(1)
    views = blocks.BlockViews(kv)
    for l0, l1 in [(0, LAYERS), (1, 3), (LAYERS - 1, LAYERS)]:
        got = views(5, (l0, l1))
        assert got.data_ptr() == kv[5, l0].data_ptr()
        assert torch.equal(got, kv[5, l0:l1].contiguous().view(torch.uint8).view(-1))


def test_check_id_list_matches_check_ids():
    src = make_cache(1)
    assert blocks.check_id_list(src, torch.tensor([4, 0, 2])) == [4, 0, 2]
    assert blocks.check_id_list(src, (1, 3)) == [1, 3]
    for bad, match in [([0, BLOCKS], "outside"), ([-1], "outside"), ([2, 2], "duplicate")]:
        with pytest.raises(ValueError, match=match):
            blocks.check_id_list(src, bad)


def test_gather_into_out_buffer_and_shape_checks():
    src = make_cache(1)
    out = torch.empty(2, 1, *src.shape[2:])
    assert blocks.gather(src, [1, 3], slice(2, 3), out=out) is out
    assert torch.equal(out[:, 0], src[[1, 3], 2])
    with pytest.raises(ValueError, match="buffer shape"):
        blocks.scatter(src, [1, 3, 4], out, slice(2, 3))
    with pytest.raises(ValueError, match="outside"):
        blocks.check_ids(src, [0, BLOCKS])
    with pytest.raises(ValueError, match="duplicate"):
        blocks.check_ids(src, [2, 2])


def test_header_round_trip_and_errors():
    h = TransferHeader(DATA, "req-ü-42", 17, 3, 11, torch.bfloat16, (16, 8, 128))
    wire = h.encode()
    assert wire.dtype == torch.uint8 and wire.shape == (HEADER_BYTES,)
    assert TransferHeader.decode(wire) == h
    assert h.payload_shape() == (17, 8, 2, 16, 8, 128)
    assert h.block_nbytes() == 8 * 2 * 16 * 8 * 128 * 2
    assert TransferHeader.decode(TransferHeader(CLOSE).encode()).kind == CLOSE
    with pytest.raises(ValueError, match="longer than"):
        TransferHeader(DATA, "x" * HEADER_BYTES).encode()
    with pytest.raises(ValueError, match="not a KV transfer header"):
        TransferHeader.decode(torch.zeros(HEADER_BYTES, dtype=torch.uint8))


def test_header_carries_message_runs():
    h = TransferHeader(DATA, "r-1", 9, 0, 4, torch.bfloat16, (16, 8, 128), (4, 1, 3, 1))
    assert TransferHeader.decode(h.encode()) == h
    assert h.messages() == [(0, 4), (4, 1), (5, 3), (8, 1)]
    assert TransferHeader(DATA, "r", 3).messages() == [(0, 1), (1, 1), (2, 1)]
    too_many = (1,) * (max_runs("r") + 1)
    with pytest.raises(ValueError, match="do not fit"):
        TransferHeader(DATA, "r", len(too_many), runs=too_many).encode()
    with pytest.raises(ValueError, match="add up"):
        TransferHeader(DATA, "r", 5, runs=(2, 2)).encode()
    wire = TransferHeader(DATA, "r", 4, runs=(2, 2)).encode()
    wire[12] = 5  # num_blocks 5: the runs no longer add up
    with pytest.raises(ValueError, match="bad runs"):
        TransferHeader.decode(wire)


def test_contiguous_runs_split_where_either_side_jumps():
    assert blocks.contiguous_runs([4, 5, 6, 9, 10, 2], [0, 1, 2, 3, 7, 8], 100) == [3, 1, 1, 1]
    assert blocks.contiguous_runs([1, 2, 3, 4, 5], [7, 8, 9, 10, 11], 2) == [2, 2, 1]
    assert blocks.contiguous_runs([3, 2, 1], [1, 2, 3], 8) == [1, 1, 1]  # counting down
    assert blocks.contiguous_runs([], [], 8) == []


def test_block_views_of_a_run_are_one_contiguous_range():
    kv = make_cache(3)
    views = blocks.BlockViews(kv)
    run = views(5, (0, LAYERS), 3)
    assert run.data_ptr() == kv[5].data_ptr() and run.numel() == kv[5:8].numel() * 4
    assert torch.equal(run, kv[5:8].contiguous().view(torch.uint8).view(-1))
    with pytest.raises(ValueError, match="layer range is contiguous only in one block"):
        views(5, (1, LAYERS), 2)


def test_block_views_of_a_head_major_cache_are_its_memory():
    kv = make_cache(3, heads_outer=True, kv_heads=4)
    assert blocks.heads_outer(kv) and not blocks.heads_outer(kv.contiguous())
    memory = kv.permute(0, 4, 1, 2, 3, 5)  # [N, KVH, L, 2, bs, D], contiguous
    views = blocks.BlockViews(kv)
    run = views(5, (0, LAYERS), 3)  # whole blocks: a run is still one range
    assert run.data_ptr() == kv[5].data_ptr()
    assert torch.equal(run, memory[5:8].contiguous().view(torch.uint8).view(-1))
    part = views(6, (0, LAYERS), 1, (1, 3))  # heads 1, 2 of block 6, every layer
    assert part.data_ptr() == memory[6, 1].data_ptr()
    assert torch.equal(part, memory[6, 1:3].contiguous().view(torch.uint8).view(-1))
    with pytest.raises(ValueError, match="head slice"):
        views(6, (0, LAYERS), 2, (1, 3))  # two blocks' slices are not adjacent
    with pytest.raises(ValueError, match="layer range"):
        views(6, (0, 1))  # a layer of a block spans every head's memory


def test_run_window_keeps_the_same_blocks_in_flight():
    assert run_window(32, ()) == 32  # one message per block
    assert run_window(32, (4, 1, 4)) == 8  # 8 messages of up to 4 blocks
    assert run_window(32, (64,)) == 1  # at least one message
