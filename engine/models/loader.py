"""Load a Hugging Face safetensors checkpoint into one of our models, checking every tensor.

1. Read ``config.json`` -> ``ModelConfig`` -> the registered model class.
2. Build the model on the ``meta`` device (no memory, no random init), give it ``dtype``,
   then allocate it uninitialised on ``device`` and recompute its non-persistent buffers.
3. Map checkpoint names to destinations. Names are Hugging Face's except the packed
   projections: ``...self_attn.q_proj.weight`` lands in rows ``[0, q_size)`` of
   ``...self_attn.qkv_proj.weight``, ``k_proj`` in the next ``kv_size`` rows, and so on
   (the model's ``packed_modules`` and each ``PackedLinear.output_sizes`` say how). A module
   with ``checkpoint_views`` (MoE block: per-expert tensors stacked in one parameter) maps
   its own tensors, and may mark some as held by another rank (skipped).
4. Check before copying anything: every destination has a tensor of the right shape, and
   every tensor in the files has a destination (except known-ignorable ones). Problems are
   reported together, naming tensors and files.
5. Copy, converting dtype and device, with a progress bar for big models or a terminal.

Tensor parallelism (``tp``): the model is split on the meta device first
(``engine.parallel.sharding``); sharded modules name the slice of each checkpoint tensor
they hold (``tp_sources``), which is read alone (safetensors ``get_slice``), so a rank
reads only its part of the files. With ``tp=None`` every tensor is read whole, as before.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import safe_open
from torch import nn
from tqdm import tqdm

from engine.attention.base import AttentionBackend
from engine.model_config import ModelConfig
from engine.models.registry import model_class

if TYPE_CHECKING:
    from engine.parallel.shard import SourceSlice
    from engine.parallel.sharding import TPContext

# Checkpoint tensors we know we do not need (buffers some exporters save).
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
PROGRESS_MIN_BYTES = 1 << 30  # show the progress bar for checkpoints this big, even without a TTY
MAX_LISTED = 10  # problems listed per kind in an error message


class CheckpointError(ValueError):
    """The checkpoint does not match the model: missing, unexpected or mis-shaped tensors."""


def load_model(
    model_dir: str | Path,
    dtype: torch.dtype,
    device: torch.device,
    attn_backend: AttentionBackend,
    tp: TPContext | None = None,
) -> nn.Module:
    """Build the model described by ``model_dir/config.json`` and load its safetensors
    (``tp``: only this tensor-parallel rank's shard)."""
    model_dir = Path(model_dir)
    config = ModelConfig.from_pretrained(model_dir)
    cls = model_class(config.architecture)
    with torch.device("meta"):
        model = cls(config, attn_backend)
        if tp is not None:
            from engine.parallel.sharding import shard_model

            shard_model(model, tp)
    model = model.to(dtype=dtype).to_empty(device=device)
    model.reset_buffers()
    load_weights(model, model_dir)
    return model.eval()


def load_weights(model: nn.Module, model_dir: Path) -> None:
    """Fill every parameter of ``model`` from the safetensors files in ``model_dir``."""
    files = checkpoint_files(model_dir)  # tensor name -> file
    views = weight_destinations(model)  # tensor name -> view of a parameter, or None
    sources = weight_sources(model, views)  # tensor name -> this rank's slice (TP only)
    zeros = [name for name, src in sources.items() if src.zero]
    destinations = {name: view for name, view in views.items()
                    if view is not None and name not in zeros}
    # Tensors another rank holds (other experts) may be in the files and are not read.
    ignored = _ignored_names(model, files) | (views.keys() - destinations.keys())
    _check(files, destinations, ignored, sources)
    by_file: dict[Path, list[str]] = {}
    for name in destinations:
        by_file.setdefault(files[name], []).append(name)
    total_bytes = sum(path.stat().st_size for path in by_file)
    show = sys.stderr.isatty() or total_bytes >= PROGRESS_MIN_BYTES
    with (
        torch.no_grad(),
        tqdm(
            total=len(destinations), desc="loading weights", unit="tensor", disable=not show
        ) as bar,
    ):
        for path, names in by_file.items():
            with safe_open(str(path), framework="pt", device="cpu") as f:
                for name in names:
                    _read(f, name, destinations[name], sources.get(name))
                    bar.update(1)
        for name in zeros:
            views[name].zero_()


def _read(f, name: str, dest: torch.Tensor, src: SourceSlice | None) -> None:
    """Copy tensor ``name`` (or only the slice ``src`` of it) into ``dest``."""
    if src is None:
        dest.copy_(f.get_tensor(name))
        return
    tensor = f.get_slice(name)
    stop = min(src.stop, tensor.get_shape()[src.dim])  # past the end: padding rows
    index = (slice(None),) * src.dim + (slice(src.start, stop),)
    dest.narrow(src.dim, 0, stop - src.start).copy_(tensor[index])
    if stop < src.stop:
        dest.narrow(src.dim, stop - src.start, src.stop - stop).zero_()


def checkpoint_files(model_dir: Path) -> dict[str, Path]:
    """Tensor name -> the safetensors file holding it (single file or sharded index)."""
    index = model_dir / "model.safetensors.index.json"
    single = model_dir / "model.safetensors"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        for file_name in sorted(set(weight_map.values())):
            if not (model_dir / file_name).is_file():
                raise CheckpointError(f"{index} lists {file_name}, which is not in {model_dir}")
        return {name: model_dir / file_name for name, file_name in weight_map.items()}
    if single.is_file():
        with safe_open(str(single), framework="pt") as f:
            return {name: single for name in f.keys()}
    raise CheckpointError(
        f"no model.safetensors or model.safetensors.index.json in {model_dir}; only safetensors "
        "checkpoints are supported (re-save with save_pretrained(..., safe_serialization=True))"
    )


def weight_destinations(model: nn.Module) -> dict[str, torch.Tensor | None]:
    """Checkpoint tensor name -> the parameter (or slice of a packed one) it fills.

    A module with a ``checkpoint_views(module_path)`` method (a MoE block: one checkpoint
    tensor per expert, stacked here) names the destinations of all its parameters itself;
    a None there is a checkpoint tensor this model does not hold (another rank's expert)."""
    packed = getattr(model, "packed_modules", {})
    out: dict[str, torch.Tensor | None] = {}
    self_mapped: set[int] = set()  # ids of parameters a checkpoint_views already covers
    for path, module in model.named_modules():
        views = getattr(module, "checkpoint_views", None)
        if callable(views):
            out.update(views(path))
            self_mapped.update(id(p) for p in module.parameters())
    for name, param in model.named_parameters():  # tied parameters appear once
        if id(param) in self_mapped:
            continue
        module_path, _, leaf = name.rpartition(".")
        sizes = getattr(model.get_submodule(module_path), "output_sizes", None)
        if sizes is None:
            out[name] = param.data
            continue
        parent, _, packed_name = module_path.rpartition(".")
        offset = 0
        for part, size in zip(packed[packed_name], sizes, strict=True):
            out[f"{parent}.{part}.{leaf}"] = param.data.narrow(0, offset, size)
            offset += size
    return out


def weight_sources(model: nn.Module,
                   views: dict[str, torch.Tensor | None]) -> dict[str, SourceSlice]:
    """Checkpoint tensor name -> the slice this tensor-parallel rank reads, for every
    sharded tensor (empty for an unsharded model). Modules name their slices in
    ``tp_sources`` (leaf -> slice, or one slice per packed part); a module mapping its own
    checkpoint names lists them by name suffix in ``tp_checkpoint_sources``."""
    packed = getattr(model, "packed_modules", {})
    out: dict[str, SourceSlice] = {}
    for path, module in model.named_modules():
        by_suffix = getattr(module, "tp_checkpoint_sources", None)
        if by_suffix:
            parent = path.rpartition(".")[0]  # the layer: the block's checkpoint names start so
            for name in views:
                for suffix, src in by_suffix.items():
                    if name.startswith(parent + ".") and name.endswith("." + suffix):
                        out[name] = src
        for leaf, src in getattr(module, "tp_sources", {}).items():
            if src is None:
                continue
            if isinstance(src, tuple):  # a packed projection: one slice per part
                parent, _, packed_name = path.rpartition(".")
                for part, part_src in zip(packed[packed_name], src, strict=True):
                    out[f"{parent}.{part}.{leaf}"] = part_src
            else:
                out[f"{path}.{leaf}"] = src
    return {name: src for name, src in out.items() if name in views}


def _ignored_names(model: nn.Module, files: dict[str, Path]) -> set[str]:
    ignored = {name for name in files if name.endswith(IGNORED_SUFFIXES)}
    config = getattr(model, "config", None)
    if config is not None and config.tie_word_embeddings and "lm_head.weight" in files:
        ignored.add("lm_head.weight")  # some exporters save the tied copy too
    return ignored


def _check(
    files: dict[str, Path], destinations: dict[str, torch.Tensor], ignored: set[str],
    sources: dict[str, SourceSlice],
) -> None:
    """Raise CheckpointError listing missing, unexpected and mis-shaped tensors."""
    paths = sorted({str(p) for p in files.values()})
    where = (
        ", ".join(paths) if len(paths) <= 3 else f"{len(paths)} files in {Path(paths[0]).parent}"
    )
    problems = [
        f"missing tensor {name!r} (expected shape {tuple(destinations[name].shape)}) in {where}"
        for name in destinations
        if name not in files
    ]
    problems += [
        f"unexpected tensor {name!r} in {files[name]} (this model has no such weight)"
        for name in files
        if name not in destinations and name not in ignored
    ]
    problems += _shape_problems(files, destinations, sources)
    if problems:
        shown = problems[:MAX_LISTED]
        more = (
            f"\n  ... and {len(problems) - MAX_LISTED} more" if len(problems) > MAX_LISTED else ""
        )
        raise CheckpointError(
            "checkpoint does not match the model config:\n  " + "\n  ".join(shown) + more
        )


def _shape_problems(files: dict[str, Path], destinations: dict[str, torch.Tensor],
                    sources: dict[str, SourceSlice]) -> list[str]:
    by_file: dict[Path, list[str]] = {}
    for name in destinations:
        if name in files:
            by_file.setdefault(files[name], []).append(name)
    problems = []
    for path, names in by_file.items():
        with safe_open(str(path), framework="pt") as f:
            for name in names:
                shape = tuple(f.get_slice(name).get_shape())
                expected = tuple(destinations[name].shape)
                src = sources.get(name)
                if src is not None:  # a shard: compare the full tensor's expected shape
                    expected = _full_shape(expected, src, shape)
                if shape != expected:
                    problems.append(
                        f"tensor {name!r} in {path} has shape {shape}, expected {expected}"
                    )
    return problems


def _full_shape(shard_shape: tuple[int, ...], src: SourceSlice,
                file_shape: tuple[int, ...]) -> tuple[int, ...]:
    """The checkpoint shape a shard of ``shard_shape`` read as ``src`` implies: the split
    dimension must cover ``src`` (padding may run past its end)."""
    shape = list(shard_shape)
    if src.dim >= len(shape):
        return tuple(shape)
    full = file_shape[src.dim] if src.dim < len(file_shape) else 0
    fits = src.start < full and (src.stop <= full or src.pad)
    shape[src.dim] = full if fits else src.stop
    return tuple(shape)
