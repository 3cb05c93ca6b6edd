"""Resharding test setups shared by the backends' tests: one full source cache sliced into
TP ranks' caches, empty destination ranks' caches, the routes between them, and the check
that every destination rank got exactly its heads of the source blocks."""

from __future__ import annotations

import torch

from engine.kv_layout import head_major
from engine.parallel.shard import Shard
from kv_transfer import blocks
from kv_transfer.reshard import plan_routes

from .helpers import BLOCK_SIZE, BLOCKS, HEAD_DIM, LAYERS

# (num_kv_heads, num_heads, prefill TP, decode TP); the last two replicate heads
CASES = [(8, 8, 1, 2), (8, 8, 2, 1), (8, 8, 2, 2), (8, 8, 1, 4), (8, 8, 4, 2),
         (2, 8, 4, 1), (2, 8, 1, 4)]
# Source and reserved ids: runs contiguous in both, in one side only, and single blocks.
SRC_IDS = [3, 4, 5, 9, 10, 17, 0, 1]
DST_IDS = [12, 13, 14, 2, 3, 7, 20, 21]
# Memory layouts (prefill caches, decode caches): head-major is the engine's
# (engine.kv_layout); token-major caches are contiguous; the last two mix them.
LAYOUTS = {"head-major": (True, True), "token-major": (False, False),
           "head-to-token": (True, False), "token-to-head": (False, True)}


def case_id(case: tuple[int, int, int, int]) -> str:
    kvh, _, p, d = case
    return f"{p}to{d}-kvh{kvh}"


def full_cache(num_kv_heads: int, seed: int = 0, dtype: torch.dtype = torch.float32
               ) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    shape = (BLOCKS, LAYERS, 2, BLOCK_SIZE, num_kv_heads, HEAD_DIM)
    return torch.randn(shape, generator=gen).to(dtype)


def rank_heads(num_kv_heads: int, num_heads: int, tp: int) -> list[tuple[int, int]]:
    return [Shard(r, tp).kv_heads(num_kv_heads, num_heads) for r in range(tp)]


class Setup:
    """Caches and routes of one p -> d case (no senders/receivers: each backend makes its)."""

    def __init__(self, case: tuple[int, int, int, int], seed: int = 0,
                 dtype: torch.dtype = torch.float32, layout: str = "token-major") -> None:
        kvh, heads, p, d = case
        src_outer, dst_outer = LAYOUTS[layout]
        self.full = full_cache(kvh, seed, dtype)
        self.src_heads, self.dst_heads = rank_heads(kvh, heads, p), rank_heads(kvh, heads, d)
        lay = lambda kv, outer: head_major(kv) if outer else kv.contiguous()  # noqa: E731
        self.src_caches = [lay(self.full[:, :, :, :, lo:hi], src_outer)
                           for lo, hi in self.src_heads]
        self.dst_caches = [lay(torch.zeros_like(self.full[:, :, :, :, lo:hi]), dst_outer)
                           for lo, hi in self.dst_heads]
        self.routes = plan_routes(self.src_heads, self.dst_heads)

    def check_landed(self, src_ids: list[int] = SRC_IDS, dst_ids: list[int] = DST_IDS,
                     ranks: list[int] | None = None) -> None:
        """Each destination rank's reserved blocks hold its heads of the source blocks, and
        every other block is untouched (zero)."""
        for rank in ranks if ranks is not None else range(len(self.dst_caches)):
            lo, hi = self.dst_heads[rank]
            cache = self.dst_caches[rank]
            want = blocks.gather(self.full, src_ids)[:, :, :, :, lo:hi]
            assert torch.equal(blocks.gather(cache, dst_ids).view(torch.uint8),
                               want.contiguous().view(torch.uint8)), f"decode rank {rank}"
            others = [b for b in range(cache.shape[0]) if b not in dst_ids]
            assert cache[others].view(torch.uint8).count_nonzero() == 0, f"rank {rank} others"
