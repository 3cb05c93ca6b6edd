"""Mixture-of-experts MLP: top-k routing as transformers computes it, experts as grouped GEMMs.

Routing (``route``): router logits ``[T, E] = x @ gate^T``; probabilities = softmax in
float32; their top k; divided by their sum when the config says so (Mixtral always, Qwen
when ``norm_topk_prob``) — the ops of transformers' ``*TopKRouter``, in the same order.

Experts (``MoeExperts``): the ``T * k`` (token, expert) assignments are sorted by expert, so
each expert's tokens form one contiguous slice of a gathered copy of x; each expert runs its
gated MLP as two GEMMs over its slice (one Python iteration per expert that got tokens,
never one per token); the results are scaled by the routing weights and summed back into
their tokens' rows (each token's k results summed in a fixed order: deterministic).

Expert parallelism (for tensor parallelism, later): a rank holds only experts
``[expert_start, expert_end)``; assignments to other experts are skipped here and the
layer's one all-reduce over the TP group sums the ranks' partial outputs, as it does for a
row-parallel down projection. With the full range (TP = 1) nothing is skipped. The router
is replicated (every rank routes the same tokens the same way); Qwen2-MoE's shared expert is
a dense MLP, to be split column/row-parallel like the others (every rank holds it whole
today, so a TP split must shard it or keep it on one rank).

Checkpoints store one tensor per expert and projection (Hugging Face's layout, also what
transformers 5 writes): ``{block}.experts.{e}.{gate|up|down}.weight``. ``checkpoint_views``
maps each to its slice of the stacked parameters (the loader's hook).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from engine import fused_ops as fused
from engine.model_config import MoeConfig
from engine.models.layers import GatedMLP
from engine.models.registry import MoeSpec


def route(router_logits: torch.Tensor, top_k: int, renormalize: bool,
          float32_weights: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """router_logits [T, E] -> (weights [T, k], expert ids [T, k] int64), highest
    probability first. The weights are float32 when ``float32_weights`` (Mixtral), else in
    the logits' dtype (Qwen), as transformers leaves them."""
    probs = torch.softmax(router_logits, dim=-1, dtype=torch.float)  # [T, E] float32
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights /= weights.sum(dim=-1, keepdim=True)
    return (weights if float32_weights else weights.to(router_logits.dtype)), ids


def expert_range(num_experts: int, rank: int, world_size: int) -> tuple[int, int]:
    """The contiguous experts ``[start, end)`` rank ``rank`` of ``world_size`` holds:
    ``num_experts / world_size`` each, the first ranks one more when it does not divide."""
    if not 0 <= rank < world_size <= num_experts:
        raise ValueError(f"cannot split {num_experts} experts over {world_size} ranks "
                         f"(rank {rank}): each rank needs at least one expert")
    base, extra = divmod(num_experts, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (rank < extra)


class MoeExperts(nn.Module):
    """The routed experts ``[expert_start, expert_end)`` of one layer, stacked:
    ``w13 [E_local, 2 * I, H]`` (gate rows, then up rows, as ``GatedMLP.gate_up_proj``) and
    ``w2 [E_local, H, I]``."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int,
                 expert_range: tuple[int, int] | None = None) -> None:
        super().__init__()
        start, end = expert_range or (0, num_experts)
        if not 0 <= start < end <= num_experts:
            raise ValueError(f"expert range [{start}, {end}) is not inside [0, {num_experts})")
        self.num_experts, self.expert_start, self.expert_end = num_experts, start, end
        self.intermediate_size = intermediate_size
        self.w13 = nn.Parameter(torch.empty(end - start, 2 * intermediate_size, hidden_size))
        self.w2 = nn.Parameter(torch.empty(end - start, hidden_size, intermediate_size))

    def forward(
        self,
        x: torch.Tensor,  # [T, H]
        weights: torch.Tensor,  # [T, k] routing weights
        ids: torch.Tensor,  # [T, k] int64 expert ids in [0, num_experts)
    ) -> torch.Tensor:  # [T, H]: sum over this rank's experts of weight * expert(x)
        T, k = ids.shape
        flat_ids = ids.reshape(-1)  # [T * k], assignment (slot) a = token a // k, choice a % k
        order = torch.argsort(flat_ids, stable=True)  # slots grouped by expert
        # One host sync per layer: the slice bounds of each expert.
        counts = torch.bincount(flat_ids, minlength=self.num_experts).tolist()
        lo = sum(counts[: self.expert_start])  # sorted slots of this rank's experts:
        hi = lo + sum(counts[self.expert_start : self.expert_end])  # [lo, hi)
        mine = order[lo:hi]  # [N] slots
        xs = x.index_select(0, mine // k)  # [N, H], grouped by expert
        ys = torch.empty_like(xs)  # [N, H]
        pos = 0
        for e, n in enumerate(counts[self.expert_start : self.expert_end]):
            if n:  # one grouped GEMM pair per expert over its contiguous token slice
                act = fused.silu_and_mul(torch.mm(xs[pos : pos + n], self.w13[e].t()))  # [n, I]
                torch.mm(act, self.w2[e].t(), out=ys[pos : pos + n])
                pos += n
        # Weighted outputs back in slot order, then each token's k summed in a fixed order
        # (transformers' grouped path does the same; index_add_ would be non-deterministic on
        # CUDA). Float32 weights (Mixtral) make the products and the sum float32.
        weighted = ys * weights.reshape(-1).index_select(0, mine).unsqueeze(1)  # [N, H]
        held_all = hi - lo == T * k
        slots = weighted.new_empty(T * k, x.shape[1]) if held_all else weighted.new_zeros(
            T * k, x.shape[1])  # slots of other ranks' experts add 0 here
        slots.index_copy_(0, mine, weighted)
        return slots.view(T, k, -1).sum(dim=1).to(x.dtype)

    def expert_views(self, prefix: str,
                     names: tuple[str, str, str]) -> dict[str, torch.Tensor | None]:
        """``{prefix}.{e}.{gate|up|down}.weight`` -> its slice of w13 / w2, for every expert
        of the model; None for experts another rank holds (the loader skips those)."""
        gate, up, down = names
        inter = self.intermediate_size
        views: dict[str, torch.Tensor | None] = {}
        for e in range(self.num_experts):
            local = e - self.expert_start
            held = self.expert_start <= e < self.expert_end
            w13, w2 = (self.w13.data[local], self.w2.data[local]) if held else (None, None)
            views[f"{prefix}.{e}.{gate}.weight"] = None if w13 is None else w13[:inter]
            views[f"{prefix}.{e}.{up}.weight"] = None if w13 is None else w13[inter:]
            views[f"{prefix}.{e}.{down}.weight"] = w2
        return views


class SparseMoeBlock(nn.Module):
    """A layer's MLP in a MoE model: router (``gate``), routed experts, and for Qwen2-MoE a
    shared expert scaled by ``sigmoid(shared_expert_gate(x))``."""

    def __init__(self, hidden_size: int, moe: MoeConfig, spec: MoeSpec,
                 expert_range: tuple[int, int] | None = None) -> None:
        super().__init__()
        self.top_k, self.renormalize, self.spec = moe.top_k, moe.renormalize, spec
        self.gate = nn.Linear(hidden_size, moe.num_experts, bias=False)  # the router
        self.experts = MoeExperts(moe.num_experts, hidden_size, moe.intermediate_size,
                                  expert_range)
        shared = moe.shared_expert_intermediate_size
        self.shared_expert = GatedMLP(hidden_size, shared, bias=False) if shared else None
        self.shared_expert_gate = nn.Linear(hidden_size, 1, bias=False) if shared else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [T, H] -> [T, H]
        weights, ids = route(self.gate(x), self.top_k, self.renormalize,
                             self.spec.float32_weights)  # [T, k] each
        out = self.experts(x, weights, ids)
        if self.shared_expert is not None:
            out += F.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return out

    def checkpoint_views(self, path: str) -> dict[str, torch.Tensor | None]:
        """Checkpoint tensor name -> the parameter (slice) it fills, for every parameter of
        this block; ``path`` is the block's module path, e.g. ``model.layers.3.mlp``."""
        prefix = f"{path.rpartition('.')[0]}.{self.spec.block_name}"  # the checkpoint's name
        views: dict[str, torch.Tensor | None] = {f"{prefix}.gate.weight": self.gate.weight.data}
        views.update(self.experts.expert_views(f"{prefix}.experts", self.spec.expert_names))
        if self.shared_expert is not None:
            mlp, inter = self.shared_expert, self.shared_expert.down_proj.in_features
            gate_up = mlp.gate_up_proj.weight.data  # [2 * I, H]: gate rows, then up rows
            views[f"{prefix}.shared_expert.gate_proj.weight"] = gate_up[:inter]
            views[f"{prefix}.shared_expert.up_proj.weight"] = gate_up[inter:]
            views[f"{prefix}.shared_expert.down_proj.weight"] = mlp.down_proj.weight.data
            views[f"{prefix}.shared_expert_gate.weight"] = self.shared_expert_gate.weight.data
        return views
