"""Which prefill rank sends which KV heads to which decode rank, when the two pools use
different tensor-parallel sizes. Pure Python (no torch): a plan of routes, nothing moved.

Each TP rank's cache holds a contiguous range of the model's KV heads
(``engine.parallel.shard.Shard.kv_heads``); with more ranks than KV heads a head is
replicated on ``tp / num_kv_heads`` ranks. A prefill pool with TP=p ships to a decode pool
with TP=d over pair channels between ranks, each decode rank receiving exactly its heads::

    prefill p=2 (8 heads)      decode d=4
    rank 0: [0, 4) ──────────▶ rank 0: [0, 2)     Route(0, 0, (0, 2))
                    └────────▶ rank 1: [2, 4)     Route(0, 1, (2, 4))
    rank 1: [4, 8) ──────────▶ rank 2: [4, 6)     Route(1, 2, (4, 6))
                    └────────▶ rank 3: [6, 8)     Route(1, 3, (6, 8))

Every (decode rank, head) it holds is covered by exactly one route, so a replicated head is
sent once per decode rank that holds it; a head several prefill ranks hold comes from one of
them, chosen by the decode rank's index so that the work spreads over the replicas. A
decode rank expects ``parts_for(routes, rank)`` (``KVReceiver.expect(..., parts=...)``); a
prefill rank sends ``routes_from(routes, rank)`` (``KVSender.send(..., heads=...)``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

HeadRange = tuple[int, int]  # [first, last + 1) global KV head indices


@dataclass(frozen=True)
class Route:
    """KV heads ``[heads[0], heads[1])`` (global indices) go from prefill rank ``src_rank``
    to decode rank ``dst_rank``: one payload per request on their pair channel."""

    src_rank: int
    dst_rank: int
    heads: HeadRange


def plan_routes(src_heads: Sequence[HeadRange], dst_heads: Sequence[HeadRange]) -> list[Route]:
    """The routes that give every decode rank (``dst_heads[r]``: the heads rank ``r`` holds)
    its heads from prefill ranks holding them (``src_heads``), ordered by decode rank then
    head. Consecutive heads from one source to one destination are one route. Raises
    ``ValueError`` if a destination head is held by no source rank (pools of different
    models, or a bad shard)."""
    _check(src_heads, "source")
    _check(dst_heads, "destination")
    routes: list[Route] = []
    for dst, (lo, hi) in enumerate(dst_heads):
        for head in range(lo, hi):
            holders = [src for src, (a, b) in enumerate(src_heads) if a <= head < b]
            if not holders:
                raise ValueError(
                    f"KV head {head} of decode rank {dst} (heads [{lo}, {hi})) is held by no "
                    f"prefill rank (their heads: {_ranges(src_heads)}); the two pools must "
                    "serve the same model")
            src = holders[dst % len(holders)]  # replicas share the work, deterministically
            last = routes[-1] if routes else None
            if last is not None and (last.src_rank, last.dst_rank, last.heads[1]) == (
                    src, dst, head):
                routes[-1] = Route(src, dst, (last.heads[0], head + 1))
            else:
                routes.append(Route(src, dst, (head, head + 1)))
    return routes


def parts_for(routes: Sequence[Route], dst_rank: int) -> list[HeadRange]:
    """The head ranges decode rank ``dst_rank`` receives, one per route, in head order."""
    return sorted(r.heads for r in routes if r.dst_rank == dst_rank)


def routes_from(routes: Sequence[Route], src_rank: int) -> list[Route]:
    """The routes prefill rank ``src_rank`` sends, in plan order."""
    return [r for r in routes if r.src_rank == src_rank]


def _check(heads: Sequence[HeadRange], side: str) -> None:
    if not heads:
        raise ValueError(f"no {side} ranks")
    for rank, (lo, hi) in enumerate(heads):
        if not 0 <= lo < hi:
            raise ValueError(f"{side} rank {rank} holds a bad head range [{lo}, {hi})")


def _ranges(heads: Sequence[HeadRange]) -> str:
    return ", ".join(f"[{lo}, {hi})" for lo, hi in heads)
