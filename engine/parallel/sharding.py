"""Split a model built (on the meta device) for one rank of a tensor-parallel group.

``shard_model`` replaces the full-size modules of a Llama-family model (MoE included) by
this rank's shards, at the same attribute paths, so checkpoint names do not change. Each
sharded parameter's module carries ``tp_sources``: leaf name -> ``SourceSlice`` (a tuple,
one per part, for packed projections), which the loader reads with safetensors
``get_slice``. Row-parallel outputs are summed over the ranks by a forward hook calling
``comm.all_reduce`` — hooks only exist under TP, so a TP=1 model runs exactly as before.

Qwen2-MoE's shared expert is split like a dense MLP (gate/up rows, down columns), not kept
whole on every rank: each rank computes 1/tp of it and its partial sum joins the routed
experts' in the block's one all-reduce (``sigmoid(gate(x))`` is replicated and distributes
over the sum), so there is no replicated FLOP and no extra collective.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from engine.models.layers import GatedMLP, PackedLinear
from engine.models.moe import MoeExperts, SparseMoeBlock, expert_range
from engine.parallel.shard import Shard, SourceSlice


@dataclass(frozen=True)
class TPContext:
    shard: Shard
    comm: Any  # engine.parallel.comm.TPComm (None: build and load only, no forward)


class VocabParallelEmbedding(nn.Embedding):
    """Rows ``[start, start + num_embeddings)`` of the embedding; other ids give zeros,
    and the all-reduce adds the one rank's row that holds each id."""

    def __init__(self, start: int, stop: int, hidden_size: int, comm: Any) -> None:
        super().__init__(stop - start, hidden_size)
        self.start, self.comm = start, comm

    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # [T] -> [T, hidden]
        local = ids - self.start
        outside = (local < 0) | (local >= self.num_embeddings)  # [T]
        out = F.embedding(local.masked_fill(outside, 0), self.weight)
        out.masked_fill_(outside.unsqueeze(1), 0.0)
        return self.comm.all_reduce(out)


def _all_reduce_output(comm: Any, module: nn.Module, args: Any, output: torch.Tensor):
    return comm.all_reduce(output)


def _gather_logits(comm: Any, vocab_size: int, local: torch.Tensor) -> torch.Tensor | None:
    """local [V / tp, n] -> rank 0: float32 logits [n, vocab] (a transposed view, as the
    TP=1 model returns); None elsewhere. Padding rows past the vocabulary are dropped."""
    full = comm.gather_logits(local)
    return None if full is None else full[:vocab_size].t().float()


def shard_model(model: nn.Module, tp: TPContext) -> None:
    """Turn ``model`` (a ``LlamaForCausalLM`` or subclass, on the meta device) into rank
    ``tp.shard.rank``'s shard. Raises ValueError when a dimension does not split."""
    cfg, shard, comm = model.config, tp.shard, tp.comm
    reduce = functools.partial(_all_reduce_output, comm)
    llama = model.model
    # The compiled CPU decode_step runs every layer in one call, with no all-reduce between
    # them: under TP decode steps run the Python layers (attention kernels still compiled).
    llama._decode_step_checked, llama._decode_step = True, None
    v0, v1 = shard.vocab(cfg.vocab_size)
    llama.embed_tokens = VocabParallelEmbedding(v0, v1, cfg.hidden_size, comm)
    llama.embed_tokens.tp_sources = {"weight": SourceSlice(0, v0, v1, pad=True)}
    for layer in llama.layers:
        _shard_attention(layer.self_attn, cfg, shard, reduce)
        if isinstance(layer.mlp, SparseMoeBlock):
            _shard_moe(layer.mlp, shard)
        else:
            layer.mlp = _shard_gated_mlp(layer.mlp, shard, "intermediate_size")
        layer.mlp.register_forward_hook(reduce)
    if model.lm_head is not None:
        model.lm_head = nn.Linear(cfg.hidden_size, v1 - v0, bias=False)
        model.lm_head.tp_sources = {"weight": SourceSlice(0, v0, v1, pad=True)}
    model.gather_logits = functools.partial(_gather_logits, comm, cfg.vocab_size)


def _shard_attention(attn: nn.Module, cfg: Any, shard: Shard, reduce: Any) -> None:
    D = cfg.head_dim
    h0, h1 = shard.split(cfg.num_heads, "attention heads")
    k0, k1 = shard.kv_heads(cfg.num_kv_heads, cfg.num_heads)
    attn.num_heads, attn.num_kv_heads = h1 - h0, k1 - k0
    q, kv = (h1 - h0) * D, (k1 - k0) * D
    attn.qkv_proj = PackedLinear(cfg.hidden_size, [q, kv, kv], attn.qkv_proj.bias is not None)
    parts = (SourceSlice(0, h0 * D, h1 * D), SourceSlice(0, k0 * D, k1 * D),
             SourceSlice(0, k0 * D, k1 * D))
    attn.qkv_proj.tp_sources = {"weight": parts, "bias": parts}
    attn.o_proj = nn.Linear(q, cfg.hidden_size, bias=attn.o_proj.bias is not None)
    attn.o_proj.tp_sources = {"weight": SourceSlice(1, h0 * D, h1 * D),
                              "bias": shard.bias_of_row_parallel()}
    attn.o_proj.register_forward_hook(reduce)


def _shard_gated_mlp(mlp: GatedMLP, shard: Shard, what: str) -> GatedMLP:
    """A column(gate, up)/row(down)-parallel copy of ``mlp``; the caller adds the reduce."""
    hidden, inter = mlp.down_proj.out_features, mlp.down_proj.in_features
    i0, i1 = shard.split(inter, what)
    out = GatedMLP(hidden, i1 - i0, mlp.down_proj.bias is not None)
    rows = (SourceSlice(0, i0, i1), SourceSlice(0, i0, i1))
    out.gate_up_proj.tp_sources = {"weight": rows, "bias": rows}
    out.down_proj.tp_sources = {"weight": SourceSlice(1, i0, i1),
                                "bias": shard.bias_of_row_parallel()}
    return out


def _shard_moe(block: SparseMoeBlock, shard: Shard) -> None:
    """Experts split over the ranks, router replicated, shared expert split like a dense
    MLP. The block maps its own checkpoint names, so the shared expert's slices are listed
    by name suffix (``tp_checkpoint_sources``) for the loader."""
    old = block.experts
    block.experts = MoeExperts(old.num_experts, old.w13.shape[2], old.intermediate_size,
                               expert_range(old.num_experts, shard.rank, shard.size))
    if block.shared_expert is None:
        return
    block.shared_expert = _shard_gated_mlp(block.shared_expert, shard,
                                           "shared_expert_intermediate_size")
    rows = block.shared_expert.gate_up_proj.tp_sources["weight"][0]  # [i0, i1) of inter
    block.tp_checkpoint_sources = {
        "shared_expert.gate_proj.weight": rows,
        "shared_expert.up_proj.weight": rows,
        "shared_expert.down_proj.weight": SourceSlice(1, rows.start, rows.stop),
    }
