"""The Llama family (Llama 2/3.x, Mistral, Qwen2/2.5, Qwen3) as one model driven by config traits.

Differences between the architectures are data in ``ModelConfig`` (biases, q/k norm, head
dim, rope scaling, tied embeddings), filled from the model registry. The model runs ragged,
paged batches: ``input_ids``/``positions`` are flat ``[num_tokens]`` over every scheduled
sequence, K/V go to the paged cache through the attention backend.

Parameter names follow Hugging Face's, except the packed projections: ``qkv_proj`` holds
q_proj, k_proj, v_proj stacked along the output dim, ``gate_up_proj`` holds gate_proj and
up_proj (see ``packed_modules``; the loader fills them).

Each layer's MLP comes from a factory (``make_mlp``): dense ``GatedMLP`` here, a sparse
mixture-of-experts block in some layers of ``engine.models.moe_model``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from engine.attention.base import AttentionBackend
from engine.attention.metadata import AttentionMetadata
from engine.model_config import ModelConfig
from engine.models.layers import (
    COLUMN_MLP_MAX_ROWS,
    GatedMLP,
    PackedLinear,
    RMSNorm,
    RotaryEmbedding,
)


class LlamaAttention(nn.Module):
    def __init__(
        self, config: ModelConfig, rotary: RotaryEmbedding, backend: AttentionBackend
    ) -> None:
        super().__init__()
        self.num_heads = config.num_heads
        self.num_kv_heads = config.num_kv_heads
        self.head_dim = config.head_dim
        self.scale = config.head_dim**-0.5
        self.qkv_proj = PackedLinear(
            config.hidden_size,
            [config.q_size, config.kv_size, config.kv_size],
            bias=config.attention_bias,
        )
        self.o_proj = nn.Linear(config.q_size, config.hidden_size, bias=config.o_proj_bias)
        self.q_norm = RMSNorm(config.head_dim, config.rms_norm_eps) if config.qk_norm else None
        self.k_norm = RMSNorm(config.head_dim, config.rms_norm_eps) if config.qk_norm else None
        self.rotary = rotary  # shared by all layers (one table)
        self.backend = backend

    def forward(
        self,
        x: torch.Tensor,  # [T, hidden]
        positions: torch.Tensor,  # [T] int64
        kv_cache: torch.Tensor,  # [2, num_blocks, block_size, KVH, D]: this layer's K and V
        metadata: AttentionMetadata,
    ) -> torch.Tensor:  # [T, hidden]
        T, H, KVH, D = x.shape[0], self.num_heads, self.num_kv_heads, self.head_dim
        qkv = self.qkv_proj(x)  # [T, (H + 2*KVH) * D]
        v = qkv[:, (H + KVH) * D :].view(T, KVH, D)
        if self.q_norm is None and self.rotary.rotate_inplace(positions, qkv, H + KVH):
            # q and k rotated in place inside qkv (compiled CPU op)
            q = qkv[:, : H * D].view(T, H, D)
            k = qkv[:, H * D : (H + KVH) * D].view(T, KVH, D)
        elif self.q_norm is None:
            # q and k rotated in one go: [T, H + KVH, D]
            qk = self.rotary(positions, qkv[:, : (H + KVH) * D].view(T, H + KVH, D))
            q, k = qk[:, :H], qk[:, H:]  # [T, H, D], [T, KVH, D]
        else:
            q = self.rotary(positions, self.q_norm(qkv[:, : H * D].view(T, H, D)))
            k = self.rotary(positions, self.k_norm(qkv[:, H * D : (H + KVH) * D].view(T, KVH, D)))
        out = self.backend.forward(q, k, v, kv_cache[:, 0], kv_cache[:, 1], metadata,
                                   self.scale)
        return self.o_proj(out.reshape(T, H * D))  # out: [T, H, D]


MlpFactory = Callable[[ModelConfig, int], nn.Module]
"""(config, layer index) -> that layer's MLP, a [T, hidden] -> [T, hidden] module."""


def dense_mlp(config: ModelConfig, layer_idx: int) -> nn.Module:
    return GatedMLP(config.hidden_size, config.intermediate_size, config.mlp_bias)


class LlamaDecoderLayer(nn.Module):
    def __init__(
        self, config: ModelConfig, rotary: RotaryEmbedding, backend: AttentionBackend,
        mlp: nn.Module,
    ) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = LlamaAttention(config, rotary, backend)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = mlp  # dense GatedMLP, or a MoE model's sparse block

    def forward(
        self,
        x: torch.Tensor,  # [T, hidden] the previous layer's output (embeddings at layer 0)
        residual: torch.Tensor | None,  # [T, hidden] residual stream before x; None at layer 0
        positions: torch.Tensor,
        kv_cache: torch.Tensor,
        metadata: AttentionMetadata,
    ) -> tuple[torch.Tensor, torch.Tensor]:  # (this layer's output, residual before it)
        # The residual stream is h = residual + x, added lazily so that each add fuses with
        # the norm after it (one pass on CPU). x and residual are consumed (may be reused).
        if residual is None:
            residual, x = x, self.input_layernorm(x)
        else:
            x, residual = self.input_layernorm.add_forward(x, residual)
        x = self.self_attn(x, positions, kv_cache, metadata)
        x, residual = self.post_attention_layernorm.add_forward(x, residual)
        return self.mlp(x), residual


class LlamaModel(nn.Module):
    def __init__(self, config: ModelConfig, backend: AttentionBackend,
                 make_mlp: MlpFactory = dense_mlp) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.rotary_emb = RotaryEmbedding(
            config.head_dim, config.max_position_embeddings, config.rope_theta, config.rope_scaling
        )
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(config, self.rotary_emb, backend, make_mlp(config, i))
            for i in range(config.num_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.config = config
        self._decode_step: tuple | None = None  # (kernels, weights), built at first use
        self._decode_step_checked = False

    def forward(
        self,
        input_ids: torch.Tensor,  # [T] int64
        positions: torch.Tensor,  # [T] int64
        kv_cache: torch.Tensor,  # [num_blocks, L, 2, block_size, KVH, D]
        metadata: AttentionMetadata,
    ) -> torch.Tensor:  # [T, hidden]
        x, residual = self.embed_tokens(input_ids), None  # [T, hidden]
        if metadata.num_decodes == metadata.num_seqs and x.is_cpu and x.dtype == torch.float32:
            step = self._compiled_decode_step()
            if step is not None:  # the same layers in one compiled call (CPU, decode-only)
                kernels, weights = step
                c = self.config
                return kernels.decode_step(
                    x, positions, self.rotary_emb.cos_sin, weights, self.norm.weight, kv_cache,
                    *metadata.slot_index(kv_cache.shape[3]), metadata.block_tables,
                    metadata.seq_lens, c.num_heads, c.num_kv_heads, c.head_dim,
                    c.rms_norm_eps, c.head_dim**-0.5, COLUMN_MLP_MAX_ROWS)
        for i, layer in enumerate(self.layers):
            # layer i's cache: a [N, 2, bs, kvh, D] strided view of the block-major cache
            x, residual = layer(x, residual, positions, kv_cache[:, i], metadata)
        return self.norm.add_forward(x, residual)[0]

    def _compiled_decode_step(self) -> tuple | None:
        """(kernels, per-layer weights) when ``decode_step`` of the compiled CPU kernels runs
        this model's decode-only steps: CPU paged attention, the fused ops on, no biases,
        no q/k norm and dense MLPs (Llama, Mistral; MoE models run the Python layers, whose
        sparse blocks route per token). Checked once."""
        if not self._decode_step_checked:
            self._decode_step_checked = True
            from engine import fused_ops
            from engine.attention import cpu_kernels
            from engine.attention.cpu_paged import CpuPagedAttentionBackend

            c, layers = self.config, list(self.layers)
            kernels = cpu_kernels.load()
            fits = (
                kernels is not None and fused_ops.load() is not None and not c.qk_norm
                and all(isinstance(layer.self_attn.backend, CpuPagedAttentionBackend)
                        and layer.self_attn.qkv_proj.bias is None
                        and layer.self_attn.o_proj.bias is None
                        and isinstance(layer.mlp, GatedMLP) and layer.mlp._no_bias
                        for layer in layers)
            )
            if fits:
                weights = [w for layer in layers for w in (
                    layer.input_layernorm.weight, layer.self_attn.qkv_proj.weight,
                    layer.self_attn.o_proj.weight, layer.post_attention_layernorm.weight,
                    layer.mlp.gate_up_proj.weight, layer.mlp.down_proj.weight)]
                self._decode_step = (kernels, weights)
        return self._decode_step


class LlamaForCausalLM(nn.Module):
    """The model the runner calls: ``forward`` -> hidden states, ``compute_logits`` -> logits."""

    # Our packed module -> the checkpoint modules stacked in it, in order (for the loader).
    packed_modules = {
        "qkv_proj": ("q_proj", "k_proj", "v_proj"),
        "gate_up_proj": ("gate_proj", "up_proj"),
    }

    def __init__(self, config: ModelConfig, backend: AttentionBackend,
                 make_mlp: MlpFactory = dense_mlp) -> None:
        super().__init__()
        self.config = config
        self.model = LlamaModel(config, backend, make_mlp)
        # Tied models have no lm_head: the logits reuse the embedding matrix.
        self.lm_head = (
            None
            if config.tie_word_embeddings
            else nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        )
        # Tensor parallelism: this rank's logits [V / tp, n] -> rank 0's [n, vocab] (None on
        # the other ranks); set by engine.parallel.sharding, None at TP=1.
        self.gather_logits: Callable[[torch.Tensor], torch.Tensor | None] | None = None

    def forward(
        self,
        input_ids: torch.Tensor,  # [T] int64, all scheduled tokens of the step, flattened
        positions: torch.Tensor,  # [T] int64, position of each token in its sequence
        kv_cache: torch.Tensor,  # [num_blocks, L, 2, block_size, KVH, D]
        metadata: AttentionMetadata,
    ) -> torch.Tensor:  # [T, hidden]
        return self.model(input_ids, positions, kv_cache, metadata)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """hidden [n, hidden] (only the rows sampled from) -> float32 logits [n, vocab]
        (under tensor parallelism: on rank 0; None on the other ranks)."""
        weight = self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        # weight @ hidden.T, returned as a transposed view: the same product, but CPU BLAS
        # runs this [vocab, hidden] x [hidden, n] layout ~1.5x faster than F.linear's at
        # decode batch sizes; argmax and softmax over dim -1 read the view as is.
        if self.gather_logits is not None:  # TP: this rank's vocabulary rows, gathered
            return self.gather_logits(torch.mm(weight, hidden.t()))
        return torch.mm(weight, hidden.t()).t().float()

    def reset_buffers(self) -> None:
        """Recompute non-persistent buffers (rotary tables) after ``to_empty``."""
        self.model.rotary_emb.reset_buffers()
