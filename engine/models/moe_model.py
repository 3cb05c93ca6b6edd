"""Mixture-of-experts models (Mixtral, Qwen2-MoE, Qwen3-MoE): the Llama family's model with a
sparse MLP (``engine.models.moe.SparseMoeBlock``) in the layers ``config.moe.sparse_layers``.

Attention, norms, rotary embedding, the paged KV cache and the LM head are Llama's,
configured by the same registry traits (Mixtral: Mistral's attention; Qwen3-MoE: Qwen3's
q/k norm; Qwen2-MoE: Qwen2's q/k/v bias). How the checkpoint names the sparse block and its
experts is the registry's ``MoeSpec``; the block maps its own tensors (``checkpoint_views``).

On CPU, decode-only steps of dense Llama-like models run as one compiled ``decode_step``
call; that call has no sparse MLP, so these models always run the Python layers (the check
is in ``LlamaModel._compiled_decode_step``). The fused elementwise ops (norms, rotary,
SiLU-and-mul inside each expert) still apply.
"""

from __future__ import annotations

import functools

from torch import nn

from engine.attention.base import AttentionBackend
from engine.model_config import ModelConfig
from engine.models.llama import LlamaForCausalLM, dense_mlp
from engine.models.moe import SparseMoeBlock
from engine.models.registry import get_arch_spec


def moe_mlp(config: ModelConfig, layer_idx: int,
            expert_range: tuple[int, int] | None = None) -> nn.Module:
    """Layer ``layer_idx``'s MLP: the sparse block, or a dense one where the config says."""
    moe, spec = config.moe, get_arch_spec(config.architecture).moe
    if moe is None or spec is None:
        raise ValueError(f"{config.architecture} is not a mixture-of-experts architecture")
    if layer_idx not in moe.sparse_layers:
        return dense_mlp(config, layer_idx)
    return SparseMoeBlock(config.hidden_size, moe, spec, expert_range)


class MoeForCausalLM(LlamaForCausalLM):
    """``expert_range = (start, end)``: the routed experts this model instance holds (under
    tensor parallelism, one rank's share); None holds them all."""

    def __init__(self, config: ModelConfig, backend: AttentionBackend,
                 expert_range: tuple[int, int] | None = None) -> None:
        super().__init__(config, backend,
                         functools.partial(moe_mlp, expert_range=expert_range))
