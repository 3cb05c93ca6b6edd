"""Random weights for make_model: one seeded generator per tensor, streamed to safetensors shards.

Each tensor is drawn from ``torch.Generator().manual_seed(hash(seed, name))``, so a tensor does
not depend on which others exist or in which order they are made, and the same seed gives
byte-identical files. Shards are planned from the shapes first (names follow transformers:
``model-00001-of-00003.safetensors`` + ``model.safetensors.index.json``; a single shard is
``model.safetensors``), then filled one at a time, so memory stays at about one shard.
The initialisation rules and why they were chosen are in make_model.py's docstring.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any

import torch

LINEAR_GAIN = 2.0
"""Linear weights ~ N(0, (LINEAR_GAIN / sqrt(fan_in))^2)."""
LOGIT_STD = 4.0
"""lm_head (or tied embedding) std is LOGIT_STD / sqrt(hidden): logits have std ~LOGIT_STD."""
EMBED_STD = 1.0
"""Std of untied input embeddings."""
BIAS_STD = 0.2
"""Std of biases (Qwen2's q/k/v)."""
NORM_RANGE = (0.8, 1.2)
"""RMSNorm weights are uniform in this range."""

_EMBEDDINGS = ("model.embed_tokens.weight", "lm_head.weight")


def init_description() -> dict[str, Any]:
    """The initialisation constants, recorded in the checkpoint's splitserve_model.json."""
    return {"linear_gain": LINEAR_GAIN, "logit_std": LOGIT_STD, "embed_std": EMBED_STD,
            "bias_std": BIAS_STD, "norm_range": list(NORM_RANGE),
            "tensor_seed": "sha256(f'{seed}:{name}')[:8] little-endian"}


def tensor_seed(seed: int, name: str) -> int:
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def init_tensor(name: str, shape: tuple[int, ...], seed: int, hidden: int, tied: bool,
                tokenizer_size: int) -> torch.Tensor:
    """The float32 initial value of parameter ``name`` (see make_model.py for the rules)."""
    gen = torch.Generator().manual_seed(tensor_seed(seed, name))
    if name.endswith("norm.weight"):  # input/post-attention/final norms, Qwen3's q_norm/k_norm
        low, high = NORM_RANGE
        return low + (high - low) * torch.rand(shape, generator=gen)
    if name.endswith(".bias"):
        return BIAS_STD * torch.randn(shape, generator=gen)
    if name in _EMBEDDINGS:
        output_side = tied or name == "lm_head.weight"
        std = LOGIT_STD / math.sqrt(hidden) if output_side else EMBED_STD
        weight = std * torch.randn(shape, generator=gen)
        weight[tokenizer_size:] = 0.0  # ids the tokenizer cannot produce: logit exactly 0
        return weight
    if len(shape) == 2:  # [out_features, in_features]
        return (LINEAR_GAIN / math.sqrt(shape[1])) * torch.randn(shape, generator=gen)
    raise ValueError(f"make_model has no init rule for parameter {name} of shape {shape}")


def plan_shards(shapes: dict[str, tuple[int, ...]], itemsize: int,
                max_shard_bytes: int) -> list[list[str]]:
    """Group parameter names, in order, into shards of at most ``max_shard_bytes`` (a tensor
    larger than that gets a shard of its own)."""
    shards: list[list[str]] = [[]]
    size = 0
    for name, shape in shapes.items():
        nbytes = math.prod(shape) * itemsize
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


def write_weights(out: Path, shapes: dict[str, tuple[int, ...]], config: Any, seed: int,
                  dtype: str, tokenizer_size: int, max_shard_bytes: int,
                  progress: bool | None) -> None:
    """Write every parameter in ``shapes`` (name -> shape, tied duplicates already removed)."""
    from safetensors.torch import save_file
    from tqdm import tqdm

    torch_dtype = getattr(torch, dtype)
    itemsize = torch.empty((), dtype=torch_dtype).element_size()
    shards = plan_shards(shapes, itemsize, max_shard_bytes)
    total = sum(math.prod(s) for s in shapes.values()) * itemsize
    names = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    show = total > 256 * 1024**2 if progress is None else progress
    tied = bool(getattr(config, "tie_word_embeddings", False))
    with tqdm(total=total, unit="B", unit_scale=True, desc="writing weights",
              disable=not show) as bar:
        for file_name, shard in zip(names, shards, strict=True):
            tensors = {}
            for name in shard:
                value = init_tensor(name, shapes[name], seed, config.hidden_size, tied,
                                    tokenizer_size)
                tensors[name] = value.to(torch_dtype).contiguous()
                bar.update(tensors[name].numel() * itemsize)
            save_file(tensors, str(out / file_name), metadata={"format": "pt"})
            del tensors
    if len(shards) > 1:
        pairs = zip(names, shards, strict=True)
        weight_map = {name: file for file, shard in pairs for name in shard}
        index = {"metadata": {"total_size": total,
                              "total_parameters": sum(math.prod(s) for s in shapes.values())},
                 "weight_map": dict(sorted(weight_map.items()))}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def checkpoint_shapes(shapes: dict[str, tuple[int, ...]],
                      architecture: str) -> dict[str, tuple[int, ...]]:
    """The tensors a checkpoint of ``architecture`` holds, from transformers' in-memory
    parameter shapes. Identical for dense models. For MoE models transformers 5 stacks the
    experts (``mlp.experts.gate_up_proj [E, 2I, H]``, ``mlp.experts.down_proj [E, H, I]``) but
    saves, as real checkpoints hold, one tensor per expert and projection under the
    architecture's names (Mixtral: ``block_sparse_moe.experts.{e}.w1/w3/w2.weight``)."""
    from engine.models.registry import get_arch_spec

    moe = get_arch_spec(architecture).moe
    if moe is None:
        return shapes
    gate, up, down = moe.expert_names
    out: dict[str, tuple[int, ...]] = {}
    for name, shape in shapes.items():
        layer, sep, rest = name.partition(".mlp.")
        if not sep:
            out[name] = shape
        elif rest == "experts.gate_up_proj":  # [E, 2I, H]: gate rows, then up rows
            num, inter = shape[0], shape[1] // 2
            for e in range(num):
                out[f"{layer}.{moe.block_name}.experts.{e}.{gate}.weight"] = (inter, shape[2])
                out[f"{layer}.{moe.block_name}.experts.{e}.{up}.weight"] = (inter, shape[2])
        elif rest == "experts.down_proj":  # [E, H, I]
            for e in range(shape[0]):
                out[f"{layer}.{moe.block_name}.experts.{e}.{down}.weight"] = shape[1:]
        elif rest.startswith(("gate.", "shared_expert")):  # router, shared expert
            out[f"{layer}.{moe.block_name}.{rest}"] = shape
        else:  # a dense layer's MLP (Qwen's mlp_only_layers)
            out[name] = shape
    return out
