"""Which part of each weight a tensor-parallel rank owns. Pure Python (no torch).

A ``Shard`` is (rank, size); its methods return half-open ``[start, stop)`` ranges and raise
``ValueError`` naming the dimension when the model cannot be split that way. A
``SourceSlice`` tells the loader which part of a checkpoint tensor fills a parameter, so
each rank reads only its slices (safetensors ``get_slice``).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SourceSlice:
    """The part of a checkpoint tensor a parameter (or packed part) holds on this rank."""

    dim: int
    """The split dimension: 0 for column-parallel rows, 1 for row-parallel columns."""
    start: int
    """First index read along ``dim``."""
    stop: int
    """One past the last index; may pass the tensor's size when ``pad`` (zero rows)."""
    zero: bool = False
    """Read nothing, fill with zeros: a row-parallel bias on ranks other than 0 (the bias
    is added once, before the all-reduce sums the ranks' outputs)."""
    pad: bool = False
    """Rows past the checkpoint tensor's end are zero (vocabulary padded to a multiple of
    the TP size; their logits are dropped after the gather)."""


ZERO = SourceSlice(0, 0, 0, zero=True)


@dataclass(frozen=True)
class Shard:
    rank: int
    size: int

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.size:
            raise ValueError(f"rank {self.rank} is not in [0, {self.size})")

    def split(self, n: int, what: str) -> tuple[int, int]:
        """This rank's equal part of ``n`` (heads, intermediate rows)."""
        if n % self.size:
            raise ValueError(f"{what} ({n}) is not divisible by tensor_parallel_size="
                             f"{self.size}; choose a size that divides it")
        per = n // self.size
        return self.rank * per, (self.rank + 1) * per

    def kv_heads(self, num_kv_heads: int, num_heads: int) -> tuple[int, int]:
        """This rank's KV heads: its equal part, or, when there are fewer KV heads than
        ranks, the one head its query heads use (replicated on ``size / num_kv_heads``
        ranks)."""
        self.split(num_heads, "attention heads")
        if self.size <= num_kv_heads:
            return self.split(num_kv_heads, "key/value heads")
        if self.size % num_kv_heads:
            raise ValueError(f"tensor_parallel_size={self.size} is neither a divisor nor a "
                             f"multiple of the model's {num_kv_heads} key/value heads")
        head = self.rank // (self.size // num_kv_heads)
        return head, head + 1

    def vocab(self, vocab_size: int) -> tuple[int, int]:
        """This rank's vocabulary rows; the vocabulary is padded to a multiple of the size
        (the last rank's rows may pass ``vocab_size``: zero rows)."""
        per = -(-vocab_size // self.size)
        return self.rank * per, (self.rank + 1) * per

    def rows(self, start: int, stop: int, dim: int = 0) -> SourceSlice:
        return SourceSlice(dim, start, stop)

    def bias_of_row_parallel(self) -> SourceSlice | None:
        """Row-parallel bias: read whole on rank 0 (None = the whole tensor), zeros on the
        others."""
        return None if self.rank == 0 else ZERO


def kv_heads_per_rank(config, tensor_parallel_size: int) -> int:
    """KV heads each rank's cache holds (``config``: a ``ModelConfig``)."""
    if tensor_parallel_size < 1:
        raise ValueError(f"tensor_parallel_size={tensor_parallel_size} must be >= 1")
    if tensor_parallel_size == 1:
        return config.num_kv_heads
    start, stop = Shard(0, tensor_parallel_size).kv_heads(config.num_kv_heads,
                                                          config.num_heads)
    return stop - start


def kv_heads_of_ranks(config, tensor_parallel_size: int) -> list[tuple[int, int]]:
    """Each rank's KV heads ``[start, stop)`` (global head indices), rank by rank: what a
    worker's KV transfer needs to know of its own ranks and of its peers'."""
    if tensor_parallel_size == 1:
        return [(0, config.num_kv_heads)]
    return [Shard(rank, tensor_parallel_size).kv_heads(config.num_kv_heads, config.num_heads)
            for rank in range(tensor_parallel_size)]
