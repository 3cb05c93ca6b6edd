"""Fused ops of the model's hot path: compiled on CPU, plain torch elsewhere.

On CPU a small model's step is a few GEMMs and many elementwise ops (norm, residual add,
SiLU-and-mul, rotary, the greedy argmax), each a dispatch and a pass over memory;
``csrc/fused_ops.cpp`` does each group in one pass. It is built on first use like the paged
decode kernel (``engine.attention.cpu_kernels``): when no compiler is there, the build
fails, the tensor is not float32 on CPU, or ``SPLITSERVE_FUSED_OPS=0``, the torch
composition runs instead.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import torch
import torch.nn.functional as F

from engine.cpu_kernels_build import compile_or_none

SOURCE = Path(__file__).parent / "csrc" / "fused_ops.cpp"


@functools.cache
def load():
    """The compiled module, or None when disabled or it cannot be built."""
    if os.environ.get("SPLITSERVE_FUSED_OPS", "1") == "0":
        return None
    # fast-math for the vectorised expf (libmvec); no FMA contraction, so products and sums
    # round as in the torch ops. Never at link time (it would set FTZ).
    return compile_or_none(
        "splitserve_fused_ops", SOURCE,
        ["-O3", "-march=native", "-ffast-math", "-ffp-contract=off", "-fopenmp"], "fused ops")


def _kernels(x: torch.Tensor):
    """The compiled ops when they apply to ``x`` (float32 on CPU), else None."""
    if not x.is_cpu or x.dtype != torch.float32:  # (cheaper than x.device.type)
        return None
    return load()


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(x + residual) * weight, x + residual); x, residual [T, N].

    Both inputs may be overwritten (the compiled path works in place): pass tensors the
    caller owns and does not read again."""
    ops = _kernels(x)
    if ops is not None and x.is_contiguous() and residual.is_contiguous() and x.dim() == 2:
        ops.fused_add_rms_norm_(x, residual, weight, eps)
        return x, residual
    residual = x + residual
    return rms_norm(residual, weight, eps), residual


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """weight * x / sqrt(mean(x^2) + eps) in float32, like Hugging Face's."""
    ops = _kernels(x)
    if ops is not None and x.is_contiguous() and x.dim() == 2:
        # The fused add-norm with a zero addend: ~15x cheaper than aten's rms_norm on a
        # decode batch here (it rewrites x with x + 0, the same values).
        out = torch.zeros_like(x)
        ops.fused_add_rms_norm_(out, x, weight, eps)
        return out
    if x.dtype == torch.float32:  # one op: same math, fewer launches
        return F.rms_norm(x, weight.shape, weight, eps)
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up [T, 2I] (gate | up) -> silu(gate) * up [T, I]."""
    ops = _kernels(gate_up)
    if ops is not None and gate_up.is_contiguous() and gate_up.dim() == 2:
        return ops.silu_and_mul(gate_up)
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def rotary_inplace(qk: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor,
                   num_heads: int, head_dim: int) -> bool:
    """Rotate the first ``num_heads`` heads of each row of ``qk`` [T, >= num_heads * D] in
    place. False (nothing done) when the compiled op does not apply: rotate in torch."""
    ops = _kernels(qk)
    if ops is None or qk.dim() != 2 or qk.stride(1) != 1 or not positions.is_contiguous():
        return False
    ops.rotary_(qk, positions, cos_sin, num_heads, head_dim)
    return True


def argmax_last(logits: torch.Tensor) -> torch.Tensor:
    """logits [n, V] -> [n] int64 argmax over the vocabulary. For the LM head's transposed
    view (a contiguous [V, n] underneath) one streaming pass; torch's strided argmax is
    ~10x slower there."""
    ops = _kernels(logits)
    if ops is not None and logits.dim() == 2 and logits.t().is_contiguous() and logits.shape[1]:
        return ops.argmax_dim0(logits.t())
    return logits.argmax(dim=-1)
