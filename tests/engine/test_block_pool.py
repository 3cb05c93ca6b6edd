import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.block_pool import BlockPool, NoFreeBlocksError


def test_allocate_is_deterministic_and_free_returns_blocks():
    pool = BlockPool(8)
    assert pool.allocate(3) == [0, 1, 2]
    assert pool.allocate(2) == [3, 4]
    pool.free([0, 1, 2])
    pool.check_integrity()
    assert pool.num_free == 6
    # Uncached freed blocks are handed out first, tail of the request first.
    assert pool.allocate(1) == [0]


def test_over_allocation_raises_and_changes_nothing():
    pool = BlockPool(4)
    pool.allocate(3)
    with pytest.raises(NoFreeBlocksError):
        pool.allocate(2)
    assert pool.num_free == 1
    pool.check_integrity()


def test_double_free_is_caught():
    pool = BlockPool(4)
    blocks = pool.allocate(1)
    pool.free(blocks)
    with pytest.raises(AssertionError, match="double free"):
        pool.free(blocks)


def test_cached_blocks_survive_free_and_are_evicted_lru():
    pool = BlockPool(4)
    a = pool.allocate(2)
    pool.cache_block(a[0], 111)
    pool.cache_block(a[1], 222)
    pool.free(a)
    assert pool.lookup(111) == a[0] and pool.num_free == 4
    pool.touch([a[0]])  # a hit revives the block
    assert pool.ref_count(a[0]) == 1 and pool.num_free == 3
    # Fresh allocations take never-cached blocks first, then evict the LRU cached one.
    assert pool.allocate(2) == [2, 3]
    assert pool.allocate(1) == [a[1]]
    assert pool.lookup(222) is None
    added, evicted = pool.take_cache_events()
    assert added == [111, 222] and evicted == [222]
    pool.check_integrity()


def test_duplicate_hash_keeps_first_block():
    pool = BlockPool(4)
    a, b = pool.allocate(2)
    pool.cache_block(a, 5)
    pool.cache_block(b, 5)
    assert pool.lookup(5) == a
    pool.free([a, b])
    pool.check_integrity()


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["alloc", "free", "cache", "touch"]),
                          st.integers(0, 5)), max_size=60))
def test_random_operations_keep_invariants(ops):
    pool = BlockPool(12)
    held: list[list[int]] = []
    next_hash = 1000
    for op, n in ops:
        if op == "alloc" and n <= pool.num_free:
            held.append(pool.allocate(n))
        elif op == "free" and held:
            pool.free(held.pop(n % len(held)))
        elif op == "cache" and held and held[n % len(held)]:
            pool.cache_block(held[n % len(held)][0], next_hash)
            next_hash += 1
        elif op == "touch" and held:
            blocks = held[n % len(held)]
            pool.touch(blocks)
            held.append(list(blocks))
        pool.check_integrity()
    for blocks in held:
        pool.free(blocks)
    pool.check_integrity()
    assert pool.num_free == pool.num_blocks
