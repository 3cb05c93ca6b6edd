"""Copy-on-write in the block pool (n > 1 forking): unit tests with exact ids, and a
hypothesis state machine over the KV cache manager (admissions with prefix-cache hits,
decode writes, forks at any computed length, frees) that checks after every operation:
the pool's integrity, no leak (each block's ref count is the number of tables holding it),
no double free, a shared or cached block is never written, and every request reads back
its own tokens through its block table (so each copy-on-write copied the right block)."""

from __future__ import annotations

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from engine.block_pool import BlockPool, NoFreeBlocksError
from engine.kv_cache_manager import KVCacheManager
from engine.request import Request
from engine.sampling_params import SamplingParams

BS = 4
PARAMS = SamplingParams(max_tokens=1000)


def test_fork_shares_and_copy_on_write_hands_over_one_reference():
    pool = BlockPool(6)
    blocks = pool.allocate(2)
    assert pool.fork(blocks) == [0, 1] and pool.ref_count(0) == 2
    assert pool.copy_on_write(1) == (1, 2)  # the writer moves to block 2
    assert pool.ref_count(1) == 1 and pool.ref_count(2) == 1
    assert pool.copy_on_write(1) is None  # no longer shared: written in place
    pool.check_integrity()
    pool.free([0, 2])
    pool.free([0, 1])
    pool.check_integrity()
    assert pool.num_free == 6
    with pytest.raises(AssertionError, match="fork of free block"):
        pool.fork([0])
    with pytest.raises(AssertionError, match="copy-on-write of free block"):
        pool.copy_on_write(0)


def test_copy_on_write_without_a_free_block_changes_nothing():
    pool = BlockPool(2)
    blocks = pool.allocate(2)
    pool.fork(blocks)
    with pytest.raises(NoFreeBlocksError):
        pool.copy_on_write(1)
    assert pool.ref_count(1) == 2 and pool.num_free == 0
    pool.check_integrity()


def test_fork_copies_only_the_partial_block_the_child_writes():
    pool = BlockPool(8)
    kv = KVCacheManager(pool, BS)
    parent = Request("p", list(range(10)), PARAMS)  # blocks 0 1 2, the last holds 2 tokens
    assert kv.allocate_slots(parent, 10)
    parent.num_computed_tokens = 10
    child = Request("c", list(range(10)), PARAMS)
    assert kv.fork(parent, child, 10) == (2, 3)
    assert child.block_ids == [0, 1, 3] and parent.block_ids == [0, 1, 2]
    aligned = Request("a", list(range(8)), PARAMS)  # block-aligned: nothing to copy
    assert kv.fork(parent, aligned, 8) is None and aligned.block_ids == [0, 1]
    assert [pool.ref_count(b) for b in range(4)] == [3, 3, 1, 1]
    for r in (parent, child, aligned):
        kv.free(r)
    pool.check_integrity()
    assert pool.num_free == 8


class CowMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.pool = BlockPool(24, enable_prefix_caching=True)
        self.kv = KVCacheManager(self.pool, BS)
        self.live: list[Request] = []
        self.content: dict[int, dict[int, int]] = {}  # block -> {offset: token written}
        self.ids = 0

    def _new_id(self) -> str:
        self.ids += 1
        return f"r{self.ids}"

    def _write(self, request: Request, pos: int) -> None:
        block = request.block_ids[pos // BS]
        assert self.pool.ref_count(block) == 1, f"write into shared block {block}"
        assert self.pool.block_hash(block) is None, f"write into cached block {block}"
        self.content.setdefault(block, {})[pos % BS] = request.token_ids[pos]

    def _copy(self, copy) -> None:
        if copy is not None:
            src, dst = copy
            self.content[dst] = dict(self.content.get(src, {}))

    @rule(prompt=st.lists(st.integers(0, 2), min_size=1, max_size=14))
    def admit(self, prompt):
        """A waiting request admitted as the scheduler does: cached prefix, then compute."""
        request = Request(self._new_id(), prompt, PARAMS)
        cached = self.kv.find_cached_prefix(request)
        n = request.num_tokens - len(cached) * BS
        if not self.kv.can_admit(request, cached, n):
            return
        self.kv.adopt_cached(request, cached)
        assert self.kv.allocate_slots(request, n)
        for pos in range(request.num_computed_tokens, request.num_tokens):
            self._write(request, pos)
        request.num_computed_tokens = request.num_tokens
        self.kv.cache_computed_blocks(request)
        self.live.append(request)

    @precondition(lambda self: self.live)
    @rule(i=st.integers(0, 100), token=st.integers(0, 2))
    def decode(self, i, token):
        request = self.live[i % len(self.live)]
        try:
            copy = self.kv.make_writable(request)
        except NoFreeBlocksError:
            return
        self._copy(copy)
        if not self.kv.allocate_slots(request, 1):
            return
        request.token_ids.append(token)
        self._write(request, request.num_computed_tokens)
        request.num_computed_tokens += 1
        self.kv.cache_computed_blocks(request)

    @precondition(lambda self: self.live)
    @rule(i=st.integers(0, 100), cut=st.integers(0, 100))
    def fork(self, i, cut):
        parent = self.live[i % len(self.live)]
        k = 1 + cut % parent.num_computed_tokens
        child = Request(self._new_id(), parent.token_ids[:k], PARAMS)
        refs = [self.pool.ref_count(b) for b in range(self.pool.num_blocks)]
        try:
            copy = self.kv.fork(parent, child, k)
        except NoFreeBlocksError:  # nothing changed
            assert refs == [self.pool.ref_count(b) for b in range(self.pool.num_blocks)]
            return
        self._copy(copy)
        self.live.append(child)

    @precondition(lambda self: self.live)
    @rule(i=st.integers(0, 100))
    def free(self, i):
        self.kv.free(self.live.pop(i % len(self.live)))

    @invariant()
    def consistent(self):
        self.pool.check_integrity()
        holders = [0] * self.pool.num_blocks
        for request in self.live:
            assert len(set(request.block_ids)) == len(request.block_ids)
            for block in request.block_ids:
                holders[block] += 1
            for pos in range(request.num_computed_tokens):  # reads back its own tokens
                block = request.block_ids[pos // BS]
                assert self.content[block][pos % BS] == request.token_ids[pos]
        assert holders == [self.pool.ref_count(b) for b in range(self.pool.num_blocks)]

    def teardown(self):
        for request in self.live:
            self.kv.free(request)
        self.pool.check_integrity()
        assert self.pool.num_free == self.pool.num_blocks


CowMachine.TestCase.settings = settings(max_examples=150, stateful_step_count=40,
                                        deadline=None)
test_copy_on_write_state_machine = CowMachine.TestCase
