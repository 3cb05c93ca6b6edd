"""Chained hashes of full KV blocks: the one definition of a prefix-cache key.

The engine's block allocator (to find cached blocks) and the global scheduler (to know which
worker caches which prefix) must compute identical keys, in different processes and on
different machines, so this module is pure Python with no salted hashing:

    tokens:  [t0 .. t15][t16 .. t31][t32 .. t47][t48 t49]     (block_size = 16)
    hashes:  h0 = H(ROOT, t0..t15)
             h1 = H(h0,   t16..t31)
             h2 = H(h1,   t32..t47)                          the partial block is not hashed

``H(parent, block)`` is BLAKE2b with an 8-byte digest over the parent hash (8 bytes,
little-endian) followed by the block's token ids as little-endian int64. A block's hash
therefore names the whole prefix that ends with it: two requests share block ``i`` only if
they share every token up to the end of block ``i``.

Why BLAKE2b and not ``hash(tuple(ids))``: tuple hashing of ints is not salted, but its value
depends on the Python build (32/64-bit, version); a digest of fixed bytes never changes.
Cost: the prompt is packed once; then one BLAKE2b call per block: about 2.5 µs of CPU per
block here (0.6 ms for a 4,096-token prompt at block size 16), linear in the prompt.
"""

from __future__ import annotations

import sys
from array import array
from collections.abc import Sequence
from hashlib import blake2b

# Parent of the first block. Callers may pass another root (e.g. a hash of the model name
# or a LoRA id) to keep caches of different models apart.
ROOT_HASH = 0

_DIGEST_BYTES = 8


def _pack(token_ids: Sequence[int]) -> bytes:
    """Token ids as little-endian int64 bytes, the same on every platform."""
    buf = array("q", token_ids)
    if sys.byteorder != "little":
        buf.byteswap()
    return buf.tobytes()


def hash_block(parent_hash: int, block_token_ids: Sequence[int]) -> int:
    """Hash of one block given its parent's hash: an unsigned 64-bit int."""
    h = blake2b(parent_hash.to_bytes(8, "little"), digest_size=_DIGEST_BYTES)
    h.update(_pack(block_token_ids))
    return int.from_bytes(h.digest(), "little")


def block_hashes(
    token_ids: Sequence[int], block_size: int, parent_hash: int = ROOT_HASH
) -> list[int]:
    """Chained hashes of every FULL block of ``token_ids`` (the trailing partial block is
    skipped), in order: ``len(result) == len(token_ids) // block_size``."""
    if block_size <= 0:
        raise ValueError(f"block_size must be positive, got {block_size}")
    num_blocks = len(token_ids) // block_size
    if num_blocks == 0:
        return []
    data = _pack(token_ids[: num_blocks * block_size])
    stride = block_size * 8
    out: list[int] = []
    parent = parent_hash.to_bytes(8, "little")  # the chain is carried as digest bytes
    from_bytes = int.from_bytes
    for offset in range(0, num_blocks * stride, stride):
        block = data[offset : offset + stride]
        parent = blake2b(parent + block, digest_size=_DIGEST_BYTES).digest()
        out.append(from_bytes(parent, "little"))
    return out
