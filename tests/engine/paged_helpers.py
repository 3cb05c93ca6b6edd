"""Test helpers: build AttentionMetadata for hand-made ragged, paged batches.

``build_metadata`` turns (block table, cached length, new tokens) per sequence into the
metadata a model runner would build; ``PagedSequence`` drives one sequence through a model
step by step (prefill chunks, then decodes) with a random non-contiguous block table.
"""

from __future__ import annotations

import random

import torch

from engine.attention.metadata import AttentionMetadata


def slots_for(block_table: list[int], start: int, end: int, block_size: int) -> list[int]:
    """Flat cache slots of positions ``start .. end-1`` of a sequence."""
    return [block_table[p // block_size] * block_size + p % block_size for p in range(start, end)]


def build_metadata(
    block_tables: list[list[int]],
    cached_lens: list[int],
    query_lens: list[int],
    block_size: int,
    device: torch.device | str = "cpu",
) -> AttentionMetadata:
    """Metadata for one step. Sequence i already has ``cached_lens[i]`` tokens in the cache
    and adds ``query_lens[i]``; put decodes (query_len 1) first."""
    seq_lens = [c + q for c, q in zip(cached_lens, query_lens, strict=True)]
    num_decodes = 0
    while num_decodes < len(query_lens) and query_lens[num_decodes] == 1:
        num_decodes += 1
    slots: list[int] = []
    for table, cached, seq_len in zip(block_tables, cached_lens, seq_lens, strict=True):
        assert len(table) * block_size >= seq_len, "block table too short"
        slots += slots_for(table, cached, seq_len, block_size)
    width = max(len(t) for t in block_tables)
    padded = [t + [0] * (width - len(t)) for t in block_tables]

    def cumsum(xs: list[int]) -> torch.Tensor:
        out = [0]
        for x in xs:
            out.append(out[-1] + x)
        return torch.tensor(out, dtype=torch.int32, device=device)

    return AttentionMetadata(
        slot_mapping=torch.tensor(slots, dtype=torch.int64, device=device),
        cu_seqlens_q=cumsum(query_lens),
        cu_seqlens_k=cumsum(seq_lens),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
        block_tables=torch.tensor(padded, dtype=torch.int32, device=device),
        query_lens_cpu=list(query_lens),
        seq_lens_cpu=seq_lens,
        num_decodes=num_decodes,
        max_query_len=max(query_lens),
        max_seq_len=max(seq_lens),
    )


def random_block_tables(
    num_seqs_blocks: list[int], num_blocks: int, rng: random.Random
) -> list[list[int]]:
    """Disjoint, shuffled (non-contiguous) block tables of the given lengths."""
    ids = rng.sample(range(num_blocks), sum(num_seqs_blocks))
    tables, start = [], 0
    for n in num_seqs_blocks:
        tables.append(ids[start : start + n])
        start += n
    return tables


class PagedSequence:
    """One sequence fed to a model step by step through its own random block table."""

    def __init__(
        self,
        max_len: int,
        block_size: int,
        num_blocks: int,
        seed: int = 0,
        device: torch.device | str = "cpu",
    ) -> None:
        rng = random.Random(seed)
        self.block_size = block_size
        self.device = device
        self.block_table = random_block_tables([-(-max_len // block_size)], num_blocks, rng)[0]
        self.num_cached = 0

    def step(self, token_ids: list[int]) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        """(input_ids [n], positions [n], metadata) for the next ``n`` tokens; advances."""
        n, start = len(token_ids), self.num_cached
        md = build_metadata([self.block_table], [start], [n], self.block_size, self.device)
        self.num_cached += n
        return (
            torch.tensor(token_ids, dtype=torch.int64, device=self.device),
            torch.arange(start, start + n, dtype=torch.int64, device=self.device),
            md,
        )
