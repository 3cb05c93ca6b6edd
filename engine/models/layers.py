"""Building blocks of the Llama family: RMSNorm, rotary embedding, packed linear, gated MLP.

Everything works on flat token batches ``[num_tokens, ...]`` (no batch/sequence dims): the
engine runs ragged batches, and positions say where each token sits in its sequence.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from engine import fused_ops as fused


class RMSNorm(nn.Module):
    """y = w * x / sqrt(mean(x^2) + eps), computed in float32 like Hugging Face's."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))  # [dim]

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [..., dim] -> [..., dim]
        return fused.rms_norm(x, self.weight, self.eps)

    def add_forward(self, x: torch.Tensor,
                    residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(norm(x + residual), x + residual), x and residual [T, dim]: the residual add and
        the norm in one pass on CPU. Both inputs may be overwritten."""
        return fused.add_rms_norm(x, residual, self.weight, self.eps)


def rope_inv_freq(head_dim: int, theta: float, scaling: dict[str, Any] | None) -> torch.Tensor:
    """Inverse frequencies [head_dim // 2] (float32), with linear or llama3 scaling applied."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim))
    rope_type = (scaling or {}).get("rope_type", "default")
    if rope_type == "default":
        return inv_freq
    if rope_type == "linear":
        return inv_freq / scaling["factor"]
    if rope_type == "llama3":
        return _llama3_inv_freq(inv_freq, scaling)
    raise ValueError(f"rope type {rope_type!r} is not supported (default, linear, llama3)")


def _llama3_inv_freq(inv_freq: torch.Tensor, s: dict[str, Any]) -> torch.Tensor:
    """Llama 3.1's frequency-dependent scaling: long wavelengths / factor, short kept, smooth
    interpolation between (same formula as transformers' ``_compute_llama3_parameters``)."""
    factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    old_len = s["original_max_position_embeddings"]
    low_freq_wavelen, high_freq_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


class RotaryEmbedding(nn.Module):
    """Rotary position embedding (rotate-half / NeoX layout, as in Hugging Face Llama).

    cos and sin are tabulated once for every position up to ``max_positions`` and indexed by
    the tokens' positions: no trigonometry per step.
    """

    def __init__(
        self, head_dim: int, max_positions: int, theta: float, scaling: dict[str, Any] | None
    ) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.max_positions = max_positions
        self.theta = theta
        self.scaling = scaling
        # [max_positions, head_dim]: cos in the first half of the last dim, sin in the second.
        self.register_buffer("cos_sin", self._table(), persistent=False)

    def _table(self) -> torch.Tensor:
        inv_freq = rope_inv_freq(self.head_dim, self.theta, self.scaling)  # [D/2]
        # Same float32 product as transformers (position * inv_freq), so tables match exactly.
        freqs = torch.arange(self.max_positions, dtype=torch.float)[:, None] * inv_freq  # [P, D/2]
        return torch.cat([freqs.cos(), freqs.sin()], dim=-1)

    def reset_buffers(self) -> None:
        """Refill the table in place (after ``to_empty`` left it uninitialised)."""
        with torch.no_grad():
            self.cos_sin.copy_(self._table())

    def rotate_inplace(self, positions: torch.Tensor, x: torch.Tensor, num_heads: int) -> bool:
        """Rotate the first ``num_heads`` heads of each row of x [T, >= num_heads * D] in
        place, in one pass (compiled CPU op). False when that op does not apply: use
        ``forward``."""
        return fused.rotary_inplace(x, positions, self.cos_sin, num_heads, self.head_dim)

    def forward(self, positions: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """positions [T] int64, x [T, num_heads, D] -> rotated copy [T, num_heads, D]."""
        cos, sin = self.cos_sin[positions].unsqueeze(1).chunk(2, dim=-1)  # [T, 1, D/2] each
        x1, x2 = x.chunk(2, dim=-1)  # [T, H, D/2] each
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


class PackedLinear(nn.Linear):
    """A Linear whose output rows are several checkpoint projections stacked along dim 0.

    ``output_sizes`` lists the rows of each part in order (q, k, v or gate, up); the loader
    fills part i from the checkpoint tensor named by the model's ``packed_modules``.
    One matmul instead of several: fewer kernel launches per layer.
    """

    def __init__(self, in_features: int, output_sizes: list[int], bias: bool) -> None:
        super().__init__(in_features, sum(output_sizes), bias=bias)
        self.output_sizes = tuple(output_sizes)


# Up to this many rows (decode batches) the MLP runs on transposed activations on CPU.
COLUMN_MLP_MAX_ROWS = 256


class GatedMLP(nn.Module):
    """down(silu(gate(x)) * up(x)), with gate and up packed into one matmul."""

    def __init__(self, hidden_size: int, intermediate_size: int, bias: bool) -> None:
        super().__init__()
        self.gate_up_proj = PackedLinear(hidden_size, [intermediate_size] * 2, bias=bias)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [T, hidden] -> [T, hidden]
        if x.shape[0] <= COLUMN_MLP_MAX_ROWS and x.device.type == "cpu" and self._no_bias:
            return self._forward_columns(x)
        return self.down_proj(fused.silu_and_mul(self.gate_up_proj(x)))  # [T, inter] between

    @property
    def _no_bias(self) -> bool:
        return self.gate_up_proj.bias is None and self.down_proj.bias is None

    def _forward_columns(self, x: torch.Tensor) -> torch.Tensor:
        """The same MLP on transposed activations ([features, T]): CPU BLAS runs W @ x^T
        faster than x @ W^T at decode batch sizes (whole MLP, dev VM: -20% at 16-32 rows,
        -10% at 64). Gate rows come first, then up rows, so the activation is the flat
        first half times the flat second half."""
        T, inter = x.shape[0], self.down_proj.in_features
        gate_up_t = torch.mm(self.gate_up_proj.weight, x.t())  # [2 * inter, T]
        act_t = fused.silu_and_mul(gate_up_t.view(1, -1)).view(inter, T)
        return torch.mm(self.down_proj.weight, act_t).t().contiguous()
