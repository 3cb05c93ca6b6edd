"""The route planner: every decode rank gets each of its heads exactly once, from a prefill
rank that holds it, over as few routes as the shards allow."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.parallel.shard import Shard
from kv_transfer.reshard import Route, parts_for, plan_routes, routes_from


def shards(num_kv_heads: int, num_heads: int, tp: int) -> list[tuple[int, int]]:
    return [Shard(r, tp).kv_heads(num_kv_heads, num_heads) for r in range(tp)]


@st.composite
def models_and_sizes(draw):
    """(num_kv_heads, num_heads, p, d) that Shard.kv_heads accepts on both sides."""
    num_kv_heads = draw(st.sampled_from([1, 2, 4, 8]))
    num_heads = num_kv_heads * draw(st.sampled_from([1, 2, 4]))

    def size():
        return draw(st.sampled_from([t for t in (1, 2, 4, 8, 16) if num_heads % t == 0
                                     and (t <= num_kv_heads and num_kv_heads % t == 0
                                          or t % num_kv_heads == 0)]))

    return num_kv_heads, num_heads, size(), size()


@settings(max_examples=300, deadline=None)
@given(models_and_sizes())
def test_every_destination_head_comes_once_from_a_holder(case):
    num_kv_heads, num_heads, p, d = case
    src, dst = shards(num_kv_heads, num_heads, p), shards(num_kv_heads, num_heads, d)
    routes = plan_routes(src, dst)
    for rank, (lo, hi) in enumerate(dst):
        got = [h for part in parts_for(routes, rank) for h in range(*part)]
        assert got == list(range(lo, hi))  # each head once, in order, nothing else
    for r in routes:
        assert src[r.src_rank][0] <= r.heads[0] < r.heads[1] <= src[r.src_rank][1]
    # Maximal: two routes between one pair never touch (they would have been one).
    pairs = [(r.src_rank, r.dst_rank, r.heads) for r in routes]
    for a, b in zip(pairs, pairs[1:], strict=False):
        assert not (a[:2] == b[:2] and a[2][1] == b[2][0])
    by_source = [r for s in range(p) for r in routes_from(routes, s)]
    assert sorted(by_source, key=repr) == sorted(routes, key=repr)


@settings(max_examples=100, deadline=None)
@given(models_and_sizes())
def test_replicas_share_the_sending(case):
    """When several prefill ranks hold a head, decode ranks holding it are served by
    different replicas (round robin by decode rank), not all by the first."""
    num_kv_heads, num_heads, p, d = case
    src, dst = shards(num_kv_heads, num_heads, p), shards(num_kv_heads, num_heads, d)
    routes = plan_routes(src, dst)
    for head in range(num_kv_heads):
        holders = [s for s, (lo, hi) in enumerate(src) if lo <= head < hi]
        senders = [r.src_rank for r in routes if r.heads[0] <= head < r.heads[1]]
        assert len(set(senders)) == min(len(holders), len(senders))


def test_examples_from_the_docstring_and_replication():
    assert plan_routes([(0, 4), (4, 8)], shards(8, 8, 4)) == [
        Route(0, 0, (0, 2)), Route(0, 1, (2, 4)), Route(1, 2, (4, 6)), Route(1, 3, (6, 8))]
    assert plan_routes([(0, 8)], [(0, 4), (4, 8)]) == [Route(0, 0, (0, 4)), Route(0, 1, (4, 8))]
    # 4 prefill ranks over 2 KV heads -> 1 decode rank: one route per head, from rank 0 and 2.
    assert plan_routes(shards(2, 8, 4), [(0, 2)]) == [Route(0, 0, (0, 1)), Route(2, 0, (1, 2))]
    # 1 -> 4 replicated: each decode rank gets its one head, each once.
    assert plan_routes([(0, 2)], shards(2, 8, 4)) == [
        Route(0, 0, (0, 1)), Route(0, 1, (0, 1)), Route(0, 2, (1, 2)), Route(0, 3, (1, 2))]
    # 4 replicated -> 4 replicated: each rank to its own counterpart.
    assert [(r.src_rank, r.dst_rank) for r in plan_routes(shards(2, 8, 4), shards(2, 8, 4))] \
        == [(0, 0), (1, 1), (2, 2), (3, 3)]


def test_a_head_nobody_holds_is_a_clear_error():
    with pytest.raises(ValueError, match=r"KV head 4 of decode rank 1 .* held by no prefill"):
        plan_routes([(0, 4)], [(0, 4), (4, 8)])
    with pytest.raises(ValueError, match="bad head range"):
        plan_routes([(2, 2)], [(0, 1)])
