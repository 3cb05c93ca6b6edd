"""Small caches and completion recorders shared by the kv_transfer tests."""

from __future__ import annotations

import threading

import torch

from engine.kv_layout import head_major
from kv_transfer import TransferError

# A tiny cache: [num_blocks, num_layers, 2, block_size, num_kv_heads, head_dim]
LAYERS, BLOCKS, BLOCK_SIZE, KV_HEADS, HEAD_DIM = 3, 24, 4, 2, 8


def make_cache(
    seed: int | None = 0,
    dtype: torch.dtype = torch.float32,
    num_blocks: int = BLOCKS,
    device: str = "cpu",
    heads_outer: bool = False,
    kv_heads: int = KV_HEADS,
) -> torch.Tensor:
    """Random cache for ``seed`` (deterministic across processes), zeros for ``None``;
    contiguous (token-major), or ``heads_outer`` laid out as the engine's."""
    shape = (num_blocks, LAYERS, 2, BLOCK_SIZE, kv_heads, HEAD_DIM)
    if seed is None:
        kv = torch.zeros(shape, dtype=dtype, device=device)
    else:
        gen = torch.Generator().manual_seed(seed)
        kv = torch.randn(shape, generator=gen).to(dtype).to(device)
    return head_major(kv) if heads_outer else kv


class Completions:
    """An ``on_done`` callback that records outcomes in order and signals each one."""

    def __init__(self) -> None:
        self.order: list[str] = []
        self.errors: dict[str, TransferError | None] = {}
        self._cond = threading.Condition()

    def __call__(self, request_id: str, error: TransferError | None) -> None:
        with self._cond:
            self.order.append(request_id)
            self.errors[request_id] = error
            self._cond.notify_all()

    def wait_for(self, *request_ids: str, timeout: float = 10.0) -> None:
        with self._cond:
            ok = self._cond.wait_for(lambda: all(r in self.errors for r in request_ids), timeout)
        assert ok, f"no completion for {[r for r in request_ids if r not in self.errors]}"
