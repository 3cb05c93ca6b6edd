"""Small caches and completion recorders shared by the kv_transfer tests."""

from __future__ import annotations

import threading

import torch

from kv_transfer import TransferError

# A tiny cache: [num_blocks, num_layers, 2, block_size, num_kv_heads, head_dim]
LAYERS, BLOCKS, BLOCK_SIZE, KV_HEADS, HEAD_DIM = 3, 24, 4, 2, 8


def make_cache(
    seed: int | None = 0,
    dtype: torch.dtype = torch.float32,
    num_blocks: int = BLOCKS,
    device: str = "cpu",
) -> torch.Tensor:
    """Random cache for ``seed`` (deterministic across processes), zeros for ``None``."""
    shape = (num_blocks, LAYERS, 2, BLOCK_SIZE, KV_HEADS, HEAD_DIM)
    if seed is None:
        return torch.zeros(shape, dtype=dtype, device=device)
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=gen).to(dtype).to(device)


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
