"""The KV block pool: physical block ids, reference counts and the prefix cache.

Pure Python (no torch): blocks are integer ids; the tensors live in the model runner.

Invariants (``check_integrity``):
  * every block is either referenced (ref_count > 0) or in the free queue, never both;
  * a block carries a hash iff it is registered in ``_hash_to_block`` under that hash;
  * free queue order is deterministic: blocks never cached are handed out first, then
    cached-but-unreferenced blocks in least-recently-freed order (LRU eviction).
Blocks are shared two ways: prefix-cache hits (always full blocks below a request's last
token: see KVCacheManager.find_cached_prefix) and forks (``fork``: n > 1 siblings sharing a
prompt). A block is written only where a request computes new tokens; a writer first makes
its block private with ``copy_on_write``, so a shared block is never written.
"""

from __future__ import annotations

from collections import OrderedDict


class NoFreeBlocksError(RuntimeError):
    """Raised when an allocation asks for more blocks than are free."""


class BlockPool:
    def __init__(self, num_blocks: int, enable_prefix_caching: bool = True) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks={num_blocks} must be >= 1")
        self.num_blocks = num_blocks
        self.enable_prefix_caching = enable_prefix_caching
        self._ref_counts = [0] * num_blocks
        self._block_hash: list[int | None] = [None] * num_blocks
        self._hash_to_block: dict[int, int] = {}
        # Free blocks in hand-out order (front first). Values unused: an ordered set.
        self._free: OrderedDict[int, None] = OrderedDict((b, None) for b in range(num_blocks))
        # Prefix-cache events since the last take_cache_events() (for WorkerStats).
        self._added_hashes: list[int] = []
        self._evicted_hashes: list[int] = []

    # -- queries -------------------------------------------------------------------------
    @property
    def num_free(self) -> int:
        """Blocks that can be allocated now (including evictable cached ones)."""
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self._free)

    def ref_count(self, block_id: int) -> int:
        return self._ref_counts[block_id]

    def block_hash(self, block_id: int) -> int | None:
        """The prefix-cache hash a block is registered under, if any."""
        return self._block_hash[block_id]

    def lookup(self, block_hash: int) -> int | None:
        """Physical block caching ``block_hash``, if any (referenced or evictable)."""
        return self._hash_to_block.get(block_hash)

    def cached_hashes(self) -> list[int]:
        """Every hash now in the prefix cache (a full snapshot for the global scheduler)."""
        return list(self._hash_to_block)

    # -- mutations -----------------------------------------------------------------------
    def allocate(self, n: int) -> list[int]:
        """Take ``n`` fresh blocks (ref_count 1), evicting cached ones if needed; in
        ascending id order (which blocks is the LRU's choice; their order is free, and
        ascending ids make a request's blocks contiguous runs more often: a KV transfer
        moves each run as one message, and cached blocks come back from the LRU tail
        first, i.e. descending)."""
        if n > len(self._free):
            raise NoFreeBlocksError(f"asked for {n} blocks, {len(self._free)} free")
        out = []
        for _ in range(n):
            block_id, _ = self._free.popitem(last=False)
            self._evict(block_id)
            self._ref_counts[block_id] = 1
            out.append(block_id)
        out.sort()
        return out

    def touch(self, block_ids: list[int]) -> None:
        """Take one more reference on each block (prefix-cache hits); revives free ones."""
        for block_id in block_ids:
            if self._ref_counts[block_id] == 0:
                del self._free[block_id]
            self._ref_counts[block_id] += 1

    def fork(self, block_ids: list[int]) -> list[int]:
        """Share a request's blocks with another: one more reference on each (they must be
        in use). Returns the new owner's block table (the same ids)."""
        for block_id in block_ids:
            if self._ref_counts[block_id] <= 0:
                raise AssertionError(f"fork of free block {block_id}")
        for block_id in block_ids:
            self._ref_counts[block_id] += 1
        return list(block_ids)

    def copy_on_write(self, block_id: int) -> tuple[int, int] | None:
        """Make ``block_id`` private to a writer that holds one of its references: if it is
        shared, hand that reference over to a fresh block and return ``(src, dst)``, whose
        KV the model runner must copy before the write; None if it is not shared.
        Raises NoFreeBlocksError (changing nothing) when no block is free."""
        count = self._ref_counts[block_id]
        if count <= 0:
            raise AssertionError(f"copy-on-write of free block {block_id}")
        if count == 1:
            return None
        (dst,) = self.allocate(1)
        self._ref_counts[block_id] = count - 1  # still >= 1: the other sharers keep it
        return block_id, dst

    def free(self, block_ids: list[int]) -> None:
        """Drop one reference on each block. Pass a request's blocks in logical order: the
        tail is released first, so a prefix outlives its suffix in the LRU."""
        for block_id in reversed(block_ids):
            count = self._ref_counts[block_id] - 1
            if count < 0:
                raise AssertionError(f"double free of block {block_id}")
            self._ref_counts[block_id] = count
            if count == 0:
                self._free[block_id] = None  # cached: back of the LRU
                if self._block_hash[block_id] is None:
                    self._free.move_to_end(block_id, last=False)  # uncached: hand out first

    def cache_block(self, block_id: int, block_hash: int) -> None:
        """Register a full, computed block under its chained hash."""
        if not self.enable_prefix_caching or self._block_hash[block_id] is not None:
            return
        if block_hash in self._hash_to_block:
            return  # same content already cached in another block: keep the first
        self._block_hash[block_id] = block_hash
        self._hash_to_block[block_hash] = block_id
        self._added_hashes.append(block_hash)

    def reset_prefix_cache(self) -> None:
        """Forget every cached hash (e.g. after weights change)."""
        for block_id, block_hash in enumerate(self._block_hash):
            if block_hash is not None:
                self._evict(block_id)

    def take_cache_events(self) -> tuple[list[int], list[int]]:
        """Hashes added to / evicted from the prefix cache since the last call."""
        added, evicted = self._added_hashes, self._evicted_hashes
        self._added_hashes, self._evicted_hashes = [], []
        return added, evicted

    def _evict(self, block_id: int) -> None:
        block_hash = self._block_hash[block_id]
        if block_hash is None:
            return
        self._block_hash[block_id] = None
        del self._hash_to_block[block_hash]
        self._evicted_hashes.append(block_hash)

    # -- self-check ----------------------------------------------------------------------
    def check_integrity(self) -> None:
        """Raise AssertionError if any invariant is broken (run in tests and when idle)."""
        free = self._free
        assert len(free) == len(set(free)), "duplicate ids in free queue"
        for block_id, count in enumerate(self._ref_counts):
            assert count >= 0, f"negative ref count on block {block_id}"
            assert (count == 0) == (block_id in free), f"block {block_id}: ref {count} vs free"
        for block_hash, block_id in self._hash_to_block.items():
            assert self._block_hash[block_id] == block_hash, f"hash map broken at {block_id}"
        n_hashed = sum(h is not None for h in self._block_hash)
        assert n_hashed == len(self._hash_to_block), "stale block hashes"
        assert self.num_used + self.num_free == self.num_blocks
