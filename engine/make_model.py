"""Random-weight Hugging Face checkpoints of real architectures (weights cannot be downloaded).

``make_model(out_dir, arch, preset, seed)`` writes a directory that both ``transformers``
(``AutoModelForCausalLM`` / ``AutoTokenizer.from_pretrained``) and our engine load:

    config.json               transformers' own config class (LlamaConfig, MistralConfig,
                              Qwen2Config, Qwen3Config, MixtralConfig, Qwen3MoeConfig,
                              Qwen2MoeConfig); legacy ``rope_theta``/``rope_scaling``
                              keys are written beside transformers 5's ``rope_parameters``
    generation_config.json    bos / eos (a list: end-of-text and <|im_end|>) / pad ids
    model.safetensors         or model-0000i-of-0000N.safetensors + model.safetensors.index.json;
                              MoE experts one tensor per expert, as on the Hub and as
                              transformers 5 saves them (it stacks them only in memory)
    tokenizer.json            byte-level BPE trained here (make_model_tokenizer.py)
    tokenizer_config.json     + special_tokens_map.json, ChatML chat template
    splitserve_model.json     what built it (arch, preset, seed, dtype, format version)

Parameter names and shapes come from the transformers model class itself (instantiated on the
meta device, so a 7B preset needs no 28 GB of RAM); each tensor is then drawn from its own
generator seeded by ``(seed, name)``, so the same seed gives byte-identical files on any
machine and the big presets stream to disk shard by shard with a progress bar.

Initialisation (chosen so that greedy argmax is decided by the model, not by float noise, and
so that a random model does not collapse into repeating one token; see ``init_tensor``):
- linear weights ``N(0, (2/sqrt(fan_in))^2)``: every layer changes the residual stream a lot,
  so outputs depend on the whole prompt;
- output logits have a standard deviation of about 4 (lm_head, or the tied embedding, has
  std ``4/sqrt(hidden)``): on the tiny preset the median top-2 logit gap is ~0.9 and the
  smallest over ~300 positions ~1e-3 to 1e-2, far above float32 noise (~1e-5);
- MoE routers and experts are linear weights like any other: router logits have a standard
  deviation of about 2, so tokens spread over the experts; on the tiny presets the median gap
  between the k-th and the next router logit is ~0.5 and the smallest over the engine tests'
  ~600 routing decisions 3e-5 to 2e-4, above float32 noise (~1e-6);
- untied input embeddings ``N(0, 1)``; RMSNorm weights uniform in [0.8, 1.2] and biases
  ``N(0, 0.2^2)`` (not 1 and 0, so an engine that forgets a norm weight or a bias fails the
  comparison with transformers);
- embedding / lm_head rows past the tokenizer's size (real-shape presets, whose vocabulary is
  larger than our tokenizer) are zero: their logit is exactly 0, below the top in-vocab logit,
  so greedy decoding only produces ids the tokenizer can decode.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine.make_model_tokenizer import (
    SPECIAL_TOKENS,
    save_tokenizer,
    special_token_ids,
    train_tokenizer,
)

FORMAT_VERSION = 1
"""Bumped whenever the files written for a given (arch, preset, seed) change: invalidates caches."""

MARKER_FILE = "splitserve_model.json"

LLAMA31_ROPE_SCALING = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}
"""Llama 3.1's long-context RoPE frequency scaling."""

DTYPES = ("float32", "bfloat16", "float16")


class MakeModelError(ValueError):
    """A bad make_model request (unknown arch or preset, non-empty output directory...)."""


@dataclass(frozen=True)
class ArchSpec:
    config_class: str
    """Name of the transformers config class (imported lazily)."""
    add_bos: bool
    """The tokenizer prepends <|begin_of_text|> (Llama, Mistral) or not (Qwen)."""
    defaults: dict[str, Any] = field(default_factory=dict)
    """Config fields every preset of this architecture gets (a preset overrides them)."""


ARCHS: dict[str, ArchSpec] = {
    "llama": ArchSpec(
        "LlamaConfig", True, {"rope_theta": 500000.0, "rms_norm_eps": 1e-5,
                              "tie_word_embeddings": False},
    ),
    "mistral": ArchSpec(
        "MistralConfig", True, {"rope_theta": 1000000.0, "rms_norm_eps": 1e-5,
                                "sliding_window": None, "tie_word_embeddings": False},
    ),
    # Qwen2: q/k/v projections carry biases (always, in Qwen2's modeling code); tied embeddings.
    "qwen2": ArchSpec(
        "Qwen2Config", False, {"rope_theta": 1000000.0, "rms_norm_eps": 1e-6,
                               "tie_word_embeddings": True},
    ),
    # Qwen3: RMSNorm on q and k per head, head_dim set explicitly (not hidden / heads).
    "qwen3": ArchSpec(
        "Qwen3Config", False, {"rope_theta": 1000000.0, "rms_norm_eps": 1e-6,
                               "tie_word_embeddings": False},
    ),
    # Mixtral: Mistral's attention, every layer's MLP top-2 of 8 experts (always renormalised);
    # intermediate_size is one expert's width.
    "mixtral": ArchSpec(
        "MixtralConfig", True, {"rope_theta": 1000000.0, "rms_norm_eps": 1e-5,
                                "sliding_window": None, "tie_word_embeddings": False,
                                "num_local_experts": 8, "num_experts_per_tok": 2},
    ),
    # Qwen3-MoE: Qwen3's attention, top-2 of 8 experts renormalised (as Qwen3-30B-A3B).
    "qwen3_moe": ArchSpec(
        "Qwen3MoeConfig", False, {"rope_theta": 1000000.0, "rms_norm_eps": 1e-6,
                                  "tie_word_embeddings": False, "num_experts": 8,
                                  "num_experts_per_tok": 2, "norm_topk_prob": True},
    ),
    # Qwen2-MoE: Qwen2's attention (q/k/v bias), routed experts not renormalised (as
    # Qwen1.5-MoE) plus a shared expert behind a sigmoid gate.
    "qwen2_moe": ArchSpec(
        "Qwen2MoeConfig", False, {"rope_theta": 1000000.0, "rms_norm_eps": 1e-6,
                                  "tie_word_embeddings": False, "num_experts": 8,
                                  "num_experts_per_tok": 2, "norm_topk_prob": False},
    ),
}


@dataclass(frozen=True)
class Preset:
    shape: dict[str, Any]
    """Config fields (sizes). ``vocab_size`` absent means: exactly the tokenizer's size."""
    tokenizer_vocab: int
    """Target size of the trained BPE vocabulary (special tokens included)."""
    arch: str | None = None
    """The only architecture the preset fits (real-model shapes), or None for any."""
    per_arch: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Extra config fields for some architectures."""


_TINY = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
         "num_key_value_heads": 2, "intermediate_size": 128, "max_position_embeddings": 2048}
_LLAMA3_VOCAB = 128256
_QWEN_VOCAB = 151936

PRESETS: dict[str, Preset] = {
    # Tests: a few hundred thousand parameters. Qwen3 gets head_dim 32 != 64 / 4 on purpose;
    # tiny qwen2_moe has a dense layer (mlp_only_layers), as Qwen's MoE configs allow.
    "tiny": Preset(_TINY, 1024, per_arch={
        "qwen3": {"head_dim": 32},
        "qwen3_moe": {"head_dim": 32, "moe_intermediate_size": 64},
        "qwen2_moe": {"moe_intermediate_size": 64, "shared_expert_intermediate_size": 128,
                      "mlp_only_layers": [1]},
    }),
    "tiny-llama3.1": Preset(
        {**_TINY, "max_position_embeddings": 131072, "rope_scaling": LLAMA31_ROPE_SCALING},
        1024, arch="llama",
    ),
    # CPU benchmarks and the demo: 5.1 M parameters (llama); a 64-sequence decode step is
    # ~0.5 GFLOP of matmuls (~10 ms at the ~55 GFLOP/s two CPU cores reach).
    "small": Preset(
        {"hidden_size": 256, "num_hidden_layers": 4, "num_attention_heads": 8,
         "num_key_value_heads": 2, "head_dim": 32, "intermediate_size": 768,
         "max_position_embeddings": 4096},
        4096, per_arch={
            "mixtral": {"intermediate_size": 384},
            "qwen3_moe": {"moe_intermediate_size": 192},
            "qwen2_moe": {"moe_intermediate_size": 192, "shared_expert_intermediate_size": 384},
        },
    ),
    # Real shapes of public models (GPU use); big files.
    "llama-3.2-1b": Preset(
        {"hidden_size": 2048, "num_hidden_layers": 16, "num_attention_heads": 32,
         "num_key_value_heads": 8, "head_dim": 64, "intermediate_size": 8192,
         "vocab_size": _LLAMA3_VOCAB, "max_position_embeddings": 131072,
         "tie_word_embeddings": True, "rope_scaling": {**LLAMA31_ROPE_SCALING, "factor": 32.0}},
        8192, arch="llama",
    ),
    "llama-3.1-8b": Preset(
        {"hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32,
         "num_key_value_heads": 8, "intermediate_size": 14336, "vocab_size": _LLAMA3_VOCAB,
         "max_position_embeddings": 131072, "rope_scaling": LLAMA31_ROPE_SCALING},
        8192, arch="llama",
    ),
    "mistral-7b": Preset(  # v0.3: 32768 vocabulary, no sliding window
        {"hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32,
         "num_key_value_heads": 8, "intermediate_size": 14336, "vocab_size": 32768,
         "max_position_embeddings": 32768},
        8192, arch="mistral",
    ),
    "qwen2.5-0.5b": Preset(
        {"hidden_size": 896, "num_hidden_layers": 24, "num_attention_heads": 14,
         "num_key_value_heads": 2, "intermediate_size": 4864, "vocab_size": _QWEN_VOCAB,
         "max_position_embeddings": 32768},
        8192, arch="qwen2",
    ),
    "qwen2.5-7b": Preset(
        {"hidden_size": 3584, "num_hidden_layers": 28, "num_attention_heads": 28,
         "num_key_value_heads": 4, "intermediate_size": 18944, "vocab_size": 152064,
         "max_position_embeddings": 32768, "tie_word_embeddings": False},
        8192, arch="qwen2",
    ),
    "qwen3-0.6b": Preset(
        {"hidden_size": 1024, "num_hidden_layers": 28, "num_attention_heads": 16,
         "num_key_value_heads": 8, "head_dim": 128, "intermediate_size": 3072,
         "vocab_size": _QWEN_VOCAB, "max_position_embeddings": 40960,
         "tie_word_embeddings": True},
        8192, arch="qwen3",
    ),
    "mixtral-8x7b": Preset(  # 46.7 B parameters, 12.9 B active per token (top-2 of 8)
        {"hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32,
         "num_key_value_heads": 8, "intermediate_size": 14336, "vocab_size": 32000,
         "max_position_embeddings": 32768},
        8192, arch="mixtral",
    ),
    "qwen3-30b-a3b": Preset(  # 30.5 B parameters, 3.3 B active per token (top-8 of 128)
        {"hidden_size": 2048, "num_hidden_layers": 48, "num_attention_heads": 32,
         "num_key_value_heads": 4, "head_dim": 128, "intermediate_size": 6144,
         "moe_intermediate_size": 768, "num_experts": 128, "num_experts_per_tok": 8,
         "vocab_size": _QWEN_VOCAB, "max_position_embeddings": 40960},
        8192, arch="qwen3_moe",
    ),
    "qwen3-8b": Preset(
        {"hidden_size": 4096, "num_hidden_layers": 36, "num_attention_heads": 32,
         "num_key_value_heads": 8, "head_dim": 128, "intermediate_size": 12288,
         "vocab_size": _QWEN_VOCAB, "max_position_embeddings": 40960},
        8192, arch="qwen3",
    ),
}


def resolve(arch: str | None, preset: str) -> tuple[str, Preset]:
    """Validate ``(arch, preset)``; ``arch=None`` takes the preset's own arch (or llama)."""
    if preset not in PRESETS:
        raise MakeModelError(f"unknown preset {preset!r}; choose one of: {', '.join(PRESETS)}")
    spec = PRESETS[preset]
    arch = arch or spec.arch or "llama"
    if arch not in ARCHS:
        raise MakeModelError(f"unknown arch {arch!r}; choose one of: {', '.join(ARCHS)}")
    if spec.arch is not None and spec.arch != arch:
        raise MakeModelError(f"preset {preset!r} is a {spec.arch} model, not {arch}; "
                             f"pass --arch {spec.arch}")
    return arch, spec


def build_config(arch: str, preset: str, tokenizer_size: int, **overrides: Any) -> Any:
    """The transformers config object for ``(arch, preset)`` with our special token ids."""
    import transformers

    arch, spec = resolve(arch, preset)
    cls = getattr(transformers, ARCHS[arch].config_class)
    fields = {**ARCHS[arch].defaults, **spec.shape, **spec.per_arch.get(arch, {})}
    fields.setdefault("vocab_size", tokenizer_size)
    known = set(cls().to_dict()) | {"rope_theta", "rope_scaling"}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise MakeModelError(f"unknown {cls.__name__} field(s): {', '.join(unknown)}")
    fields.update(overrides)
    if fields["vocab_size"] < tokenizer_size:
        raise MakeModelError(f"vocab_size {fields['vocab_size']} < tokenizer size {tokenizer_size}")
    ids = special_token_ids()
    return cls(**fields, bos_token_id=ids["bos"], eos_token_id=[ids["eos"], ids["im_end"]],
               pad_token_id=ids["pad"])


def make_model(
    out_dir: str | os.PathLike[str],
    arch: str | None = "llama",
    preset: str = "tiny",
    seed: int = 0,
    dtype: str = "float32",
    *,
    overwrite: bool = False,
    max_shard_bytes: int = 2 * 1024**3,
    progress: bool | None = None,
    **config_overrides: Any,
) -> Path:
    """Write a random-weight checkpoint to ``out_dir`` and return its path.

    ``arch=None`` takes the preset's architecture (real-shape presets) or llama.
    ``overwrite`` replaces the checkpoint files of a non-empty directory (other files are
    left alone); ``progress=None`` shows a progress bar only for big checkpoints.
    Raises MakeModelError for bad arguments."""
    import torch
    import transformers

    from engine.make_model_weights import checkpoint_shapes, init_description, write_weights

    arch, spec = resolve(arch, preset)
    if dtype not in DTYPES:
        raise MakeModelError(f"unknown dtype {dtype!r}; choose one of: {', '.join(DTYPES)}")
    add_bos = ARCHS[arch].add_bos
    tokenizer = train_tokenizer(spec.tokenizer_vocab, add_bos)
    tokenizer_size = tokenizer.get_vocab_size(with_added_tokens=True)
    config = build_config(arch, preset, tokenizer_size, **config_overrides)  # validates
    with torch.device("meta"):  # names and shapes only: no memory, no init
        model = transformers.AutoModelForCausalLM.from_config(config)
    shapes = {name: tuple(p.shape) for name, p in model.named_parameters()}  # tied: once
    config.architectures = [type(model).__name__]
    shapes = checkpoint_shapes(shapes, config.architectures[0])  # MoE: one tensor per expert
    config.dtype = dtype
    out = _prepare_dir(Path(out_dir), overwrite)
    save_tokenizer(tokenizer, out, add_bos, config.max_position_embeddings)
    write_weights(out, shapes, config, seed, dtype, tokenizer_size, max_shard_bytes, progress)
    config.save_pretrained(out)
    _add_legacy_keys(out / "config.json")
    transformers.GenerationConfig(
        bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id,
    ).save_pretrained(out)
    marker = {"arch": arch, "preset": preset, "seed": seed, "dtype": dtype,
              "format_version": FORMAT_VERSION, "tokenizer_size": tokenizer_size,
              "init": init_description(), "config_overrides": config_overrides}
    (out / MARKER_FILE).write_text(json.dumps(marker, indent=2, default=str) + "\n")
    return out


# Files make_model writes; `overwrite` removes exactly these (never a user's other files).
_OWNED_PATTERNS = ("*.safetensors", "model.safetensors.index.json", "config.json",
                   "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                   "special_tokens_map.json", "chat_template.jinja", MARKER_FILE)


def _prepare_dir(out: Path, overwrite: bool) -> Path:
    if out.exists() and not out.is_dir():
        raise MakeModelError(f"{out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise MakeModelError(f"{out} is not empty; pass --force to overwrite it")
        for pattern in _OWNED_PATTERNS:
            for path in out.glob(pattern):
                path.unlink()
    out.mkdir(parents=True, exist_ok=True)
    return out


def _add_legacy_keys(config_path: Path) -> None:
    """transformers 5 writes ``rope_parameters`` and ``dtype``; older readers (transformers 4,
    engines written against real checkpoints) look for ``rope_theta``, ``rope_scaling`` and
    ``torch_dtype``. Both spellings are written, with the same values."""
    data = json.loads(config_path.read_text())
    data["torch_dtype"] = data.get("dtype")
    rope = dict(data.get("rope_parameters") or {})
    if "rope_theta" in rope:
        data["rope_theta"] = rope.pop("rope_theta")
        data["rope_scaling"] = rope if rope.get("rope_type", "default") != "default" else None
    config_path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def checkpoint_summary(model_dir: str | os.PathLike[str]) -> tuple[int, int]:
    """``(number of parameters, bytes of weight files)`` read from the safetensors headers."""
    from safetensors import safe_open

    num_params, num_bytes = 0, 0
    for path in sorted(Path(model_dir).glob("*.safetensors")):
        num_bytes += path.stat().st_size
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                shape = f.get_slice(name).get_shape()
                n = 1
                for dim in shape:
                    n *= dim
                num_params += n
    return num_params, num_bytes


def default_cache_root() -> Path:
    """``$SPLITSERVE_CACHE_DIR/models`` if set, else ``~/.cache/splitserve/models`` (read at
    call time, never at import)."""
    base = os.environ.get("SPLITSERVE_CACHE_DIR")
    return (Path(base) if base else Path.home() / ".cache" / "splitserve") / "models"


def default_model_dir(arch: str = "llama", preset: str = "tiny", seed: int = 0,
                      dtype: str = "float32") -> Path:
    """Where ``ensure_model`` keeps ``(arch, preset, seed)``: ``<root>/<arch>-<preset>-seed<seed>``
    (``-<dtype>`` appended when not float32). Outside the repository: never committed."""
    suffix = "" if dtype == "float32" else f"-{dtype}"
    return default_cache_root() / f"{arch}-{preset}-seed{seed}{suffix}"


def ensure_model(arch: str | None = "llama", preset: str = "tiny", seed: int = 0,
                 dtype: str = "float32", *, cache_dir: str | os.PathLike[str] | None = None,
                 progress: bool | None = None) -> Path:
    """The cached checkpoint for ``(arch, preset, seed)``, built on first use.

    Built in a private temporary directory and renamed into place (atomic), so concurrent
    processes never see a half-written model; the loser of a race discards its copy."""
    arch, _ = resolve(arch, preset)
    final = default_model_dir(arch, preset, seed, dtype)
    if cache_dir is not None:
        final = Path(cache_dir) / final.name
    if _is_current(final):
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        make_model(tmp, arch, preset, seed, dtype, progress=progress)
        if final.exists() and not _is_current(final):  # stale format: move it out of the way
            stale = final.parent / f".{final.name}.stale-{uuid.uuid4().hex[:8]}"
            os.rename(final, stale)
            shutil.rmtree(stale, ignore_errors=True)
        try:
            os.rename(tmp, final)
        except OSError:
            if not _is_current(final):  # not a lost race: a real error
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return final


def _is_current(model_dir: Path) -> bool:
    marker = model_dir / MARKER_FILE
    if not marker.is_file():
        return False
    return json.loads(marker.read_text()).get("format_version") == FORMAT_VERSION


__all__ = [
    "ARCHS", "DTYPES", "LLAMA31_ROPE_SCALING", "PRESETS", "SPECIAL_TOKENS", "MakeModelError",
    "build_config", "checkpoint_summary", "default_model_dir", "ensure_model", "make_model",
    "resolve",
]
