"""Per-request block tables on top of the BlockPool (pure Python, no torch).

Block/slot arithmetic, for block_size 4 and a request holding blocks [7, 2]::

    logical block:     0            1
    physical block:    7            2
    token positions:   0  1  2  3 | 4  5  .  .
    slots:            28 29 30 31 | 8  9

A request's ``block_hashes`` are the chained hashes of its full blocks (prompt and output);
``block_ids[:k]`` for the first k full, computed blocks are registered in the prefix cache.

n > 1 siblings share blocks through ``fork``: the child's table starts with the parent's
blocks (one more reference each) and the block its next write lands in is copied at once
(copy-on-write), so both only ever write blocks they hold alone::

    parent [7, 2, 5]: block 5 holds positions 8 and 9; the parent writes 10 next.
    fork of its first 9 tokens: child [7, 2, 5'], 5' a copy of 5 (7 and 2: two refs each);
    the child writes position 9 into 5', the parent writes 10 into 5.
"""

from __future__ import annotations

from engine.block_pool import BlockPool, NoFreeBlocksError
from engine.prefix_hash import block_hashes, hash_block
from engine.request import Request


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


class KVCacheManager:
    def __init__(self, pool: BlockPool, block_size: int) -> None:
        self.pool = pool
        self.block_size = block_size
        # Prefix-cache counters for the hit rate metric.
        self.num_prefix_queries = 0  # prompt tokens looked up
        self.num_prefix_hits = 0  # of which found cached

    def update_hashes(self, request: Request) -> None:
        """Extend ``request.block_hashes`` to cover every full block of its tokens."""
        hashes, bs = request.block_hashes, self.block_size
        num_full = request.num_tokens // bs
        if not hashes:
            hashes.extend(block_hashes(request.token_ids, bs))
            return
        for i in range(len(hashes), num_full):  # decode fills one block at a time
            hashes.append(hash_block(hashes[-1], request.token_ids[i * bs : (i + 1) * bs]))

    def find_cached_prefix(self, request: Request) -> list[int]:
        """Cached blocks holding the request's leading tokens. Stops one token short of the
        end, so the last token is always recomputed (its logits are needed) and never lands
        in a shared block. None for a request asking for prompt logprobs: every prompt
        position's logits are needed."""
        if not self.pool.enable_prefix_caching or request.params.prompt_logprobs is not None:
            return []
        self.update_hashes(request)
        max_blocks = (request.num_tokens - 1) // self.block_size
        hits = []
        for block_hash in request.block_hashes[:max_blocks]:
            block_id = self.pool.lookup(block_hash)
            if block_id is None:
                break
            hits.append(block_id)
        return hits

    def num_blocks_needed(self, request: Request, num_new_tokens: int) -> int:
        total = request.num_computed_tokens + num_new_tokens
        return max(0, cdiv(total, self.block_size) - len(request.block_ids))

    def can_admit(self, request: Request, cached: list[int], num_new_tokens: int) -> bool:
        """Would a waiting request (no blocks yet) fit with ``cached`` prefix blocks adopted
        and ``num_new_tokens`` computed after them?"""
        # Reviving an evictable cached block consumes a free block too.
        revived = sum(1 for b in cached if self.pool.ref_count(b) == 0)
        total = len(cached) * self.block_size + num_new_tokens
        need = cdiv(total, self.block_size) - len(cached)
        return need + revived <= self.pool.num_free

    def adopt_cached(self, request: Request, cached: list[int]) -> None:
        """Start a request's block table with cached prefix blocks (they count as computed)."""
        assert not request.block_ids, "adopt_cached on a request that holds blocks"
        self.pool.touch(cached)
        request.block_ids = list(cached)
        request.num_computed_tokens = len(cached) * self.block_size
        request.num_registered_blocks = len(cached)
        self.num_prefix_queries += request.num_tokens
        self.num_prefix_hits += request.num_computed_tokens

    def allocate_slots(self, request: Request, num_new_tokens: int) -> bool:
        """Grow the block table to hold ``num_new_tokens`` more tokens; False (and no
        change) when the pool has too few free blocks."""
        need = self.num_blocks_needed(request, num_new_tokens)
        if need > self.pool.num_free:
            return False
        if need:
            request.block_ids.extend(self.pool.allocate(need))
        return True

    def cache_computed_blocks(self, request: Request) -> None:
        """Register the request's full, computed blocks in the prefix cache."""
        if not self.pool.enable_prefix_caching:
            return
        num_full = min(request.num_computed_tokens // self.block_size, len(request.block_ids))
        if num_full <= request.num_registered_blocks:
            return  # the common decode step: no block filled up
        self.update_hashes(request)
        for i in range(request.num_registered_blocks, num_full):
            self.pool.cache_block(request.block_ids[i], request.block_hashes[i])
        request.num_registered_blocks = num_full

    def fork(self, parent: Request, child: Request, num_tokens: int) -> tuple[int, int] | None:
        """Start ``child``'s block table from ``parent``'s first ``num_tokens`` tokens, whose KV
        is computed: their blocks are shared by reference, and the child will compute from
        ``num_tokens`` on. The block that write lands in is made private to the child at
        once (copy-on-write): returns the ``(src, dst)`` copy the runner must do first, or
        None. Raises NoFreeBlocksError (nothing changed) when that copy has no block."""
        assert not child.block_ids, "fork into a request that holds blocks"
        assert 0 < num_tokens <= parent.num_computed_tokens, "fork past the computed KV"
        shared = parent.block_ids[: cdiv(num_tokens, self.block_size)]
        if num_tokens // self.block_size < len(shared) and self.pool.num_free == 0:
            raise NoFreeBlocksError("no free block for the forked request's copy")
        child.block_ids = self.pool.fork(shared)
        child.num_computed_tokens = num_tokens
        child.num_registered_blocks = min(parent.num_registered_blocks,
                                          num_tokens // self.block_size)
        return self.make_writable(child)

    def make_writable(self, request: Request) -> tuple[int, int] | None:
        """Copy-on-write of the block the request's next computed token is written to, if
        that block is shared; returns the ``(src, dst)`` block copy, or None."""
        index = request.num_computed_tokens // self.block_size
        if index >= len(request.block_ids):
            return None  # the next token starts a block not allocated yet
        copy = self.pool.copy_on_write(request.block_ids[index])
        if copy is not None:
            request.block_ids[index] = copy[1]
        return copy

    def free(self, request: Request) -> None:
        self.pool.free(request.block_ids)
        request.block_ids = []
        request.num_registered_blocks = 0
