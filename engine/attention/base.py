"""The attention backend interface. Backends are chosen by capability through the registry."""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from engine.attention.metadata import AttentionMetadata


class AttentionBackend(ABC):
    """Paged attention over a ragged batch.

    The KV cache of one layer is two tensors ``[num_blocks, block_size, num_kv_heads,
    head_dim]``: strided views of the block-major engine cache (the block stride spans every
    layer; the rows inside a block are contiguous). ``forward`` first writes the new tokens'
    K/V into their slots, then attends each query token to its sequence's whole context
    (causal within the new tokens).
    """

    name: str = ""
    # Device types ``auto`` may pick this backend for (None: wherever it is available).
    auto_device_types: tuple[str, ...] | None = None
    # Whether it reads an fp8 KV cache (``kv_quant``); the registry refuses the others then.
    supports_fp8_kv: bool = False
    # Whether its forward can be captured in a CUDA graph for decode-only steps planned
    # from ``AttentionMetadata.static_shapes`` (no host sync, launch shapes from the batch
    # size alone); the engine runs the others eagerly (engine.cuda_graphs).
    supports_cuda_graphs: bool = False
    # (k_scale, v_scale) of an fp8 cache: it stores x / scale (see ``kv_quant``).
    kv_scales: tuple[float, float] = (1.0, 1.0)

    def set_kv_scales(self, k_scale: float, v_scale: float) -> None:
        """The per-tensor scales of an fp8 cache (unused for a float cache)."""
        self.kv_scales = (float(k_scale), float(v_scale))

    @classmethod
    @abstractmethod
    def is_available(cls, device: torch.device) -> bool:
        """True when this backend can run on ``device`` (kernels installed, right hardware)."""

    @classmethod
    @abstractmethod
    def supports_block_size(cls, block_size: int) -> bool:
        """True when the backend's kernels accept KV blocks of ``block_size`` tokens."""

    @classmethod
    def block_size_requirement(cls) -> str:
        """Human-readable statement of the block sizes accepted (used in error messages)."""
        return "any positive block size"

    @abstractmethod
    def forward(
        self,
        query: torch.Tensor,  # [num_tokens, num_heads, head_dim]
        key: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
        value: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
        key_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
        value_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
        metadata: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor:  # [num_tokens, num_heads, head_dim]
        ...
