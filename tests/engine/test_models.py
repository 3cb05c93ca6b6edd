"""Our Llama-family models vs Hugging Face transformers, on tiny random checkpoints (float32).

Each architecture is built with transformers, its weights randomised (norm weights and
biases too, which HF initialises to constants), saved as safetensors, loaded with our
loader, and run through paged KV: whole-prompt prefill, chunked prefill + decodes, and a
ragged multi-sequence step. Logits must match HF's to 1e-4.
"""

from __future__ import annotations

import json
import random

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

from engine.attention.torch_ref import TorchAttentionBackend
from engine.model_config import ModelConfig
from engine.models.loader import CheckpointError, load_model
from tests.engine.paged_helpers import PagedSequence, build_metadata, random_block_tables

COMMON = dict(
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=96,
    vocab_size=128,
    max_position_embeddings=128,
    initializer_range=0.1,
)
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 16,  # small, so the scaling changes frequencies used
}
ARCHS = {
    "llama": (LlamaConfig, {}),
    "llama3_rope": (LlamaConfig, {"rope_scaling": LLAMA3_ROPE, "rope_theta": 500000.0}),
    "mistral": (MistralConfig, {"sliding_window": None}),
    "qwen2_tied": (Qwen2Config, {"tie_word_embeddings": True}),
    "qwen3": (Qwen3Config, {"head_dim": 32, "attention_bias": True}),
}
BLOCK_SIZE, NUM_BLOCKS = 4, 48
TOKENS = random.Random(0).choices(range(128), k=21)


def make_hf_model(arch: str, seed: int = 0):
    config_cls, extra = ARCHS[arch]
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(
        config_cls(**COMMON, **extra), attn_implementation="eager"
    )
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.normal_(1.0, 0.2)
            elif name.endswith("bias"):
                param.normal_(0.0, 0.2)
    return model.eval()


@pytest.fixture(scope="module", params=list(ARCHS))
def checkpoint(request, tmp_path_factory):
    """(arch, HF model, folder with its safetensors checkpoint)."""
    hf = make_hf_model(request.param)
    path = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(path, safe_serialization=True)
    return request.param, hf, path


def hf_logits(hf, tokens: list[int]) -> torch.Tensor:  # [len(tokens), vocab]
    with torch.no_grad():
        return hf(torch.tensor([tokens])).logits[0].float()


def load(path):
    return load_model(path, torch.float32, torch.device("cpu"), TorchAttentionBackend())


def new_kv_cache(cfg: ModelConfig) -> torch.Tensor:
    # Random finite garbage: stale and padded slots must be masked, not merely zero.
    shape = (NUM_BLOCKS, cfg.num_layers, 2, BLOCK_SIZE, cfg.num_kv_heads, cfg.head_dim)
    return torch.randn(shape)


def run_chunks(model, chunks: list[list[int]]) -> torch.Tensor:
    """Feed one sequence chunk by chunk; logits of every fed token [sum(len), vocab]."""
    seq = PagedSequence(sum(map(len, chunks)), BLOCK_SIZE, NUM_BLOCKS, seed=1)
    kv = new_kv_cache(model.config)
    rows = []
    with torch.inference_mode():
        for chunk in chunks:
            ids, pos, md = seq.step(chunk)
            rows.append(model.compute_logits(model(ids, pos, kv, md)))
    return torch.cat(rows)


def test_full_prefill_matches_hf(checkpoint):
    arch, hf, path = checkpoint
    model = load(path)
    expected = hf_logits(hf, TOKENS)
    assert len(set(TOKENS)) > 10 and expected.std() > 0.1  # not a near-constant comparison
    got = run_chunks(model, [TOKENS])
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_chunked_prefill_then_decode_matches_hf(checkpoint):
    arch, hf, path = checkpoint
    model = load(path)
    prompt, rest = TOKENS[:11], TOKENS[11:]
    chunks = [prompt[i : i + 3] for i in range(0, len(prompt), 3)] + [[t] for t in rest]
    torch.testing.assert_close(
        run_chunks(model, chunks), hf_logits(hf, TOKENS), atol=1e-4, rtol=1e-4
    )


def test_ragged_multi_sequence_steps_match_hf(checkpoint):
    """Step 1: three prompts prefilled together. Step 2: two decodes + a chunk continuing the
    third. Every row must equal HF's logits of that sequence at that position."""
    arch, hf, path = checkpoint
    model = load(path)
    seqs = [TOKENS[:6], TOKENS[3:12], TOKENS[:14]]
    steps = [([0, 0, 0], [5, 8, 9]), ([5, 8, 9], [1, 1, 5])]  # (cached, new) per sequence
    tables = random_block_tables([4, 4, 4], NUM_BLOCKS, random.Random(2))
    kv = new_kv_cache(model.config)
    with torch.inference_mode():
        for cached, new in steps:
            spans = list(zip(seqs, cached, new, strict=True))
            ids = torch.tensor([t for s, c, n in spans for t in s[c : c + n]])
            pos = torch.cat([torch.arange(c, c + n) for _, c, n in spans])
            md = build_metadata(tables, cached, new, BLOCK_SIZE)
            logits = model.compute_logits(model(ids, pos, kv, md))
            expected = torch.cat([hf_logits(hf, s[: c + n])[c:] for s, c, n in spans])
            torch.testing.assert_close(logits, expected, atol=1e-4, rtol=1e-4)


def test_wrong_positions_are_detected(checkpoint):
    """Negative control: the comparison above is sensitive to positions (RoPE is relative,
    so stretch the positions rather than shift them)."""
    arch, hf, path = checkpoint
    model = load(path)
    seq = PagedSequence(len(TOKENS), BLOCK_SIZE, NUM_BLOCKS)
    ids, pos, md = seq.step(TOKENS)
    with torch.inference_mode():
        got = model.compute_logits(model(ids, pos * 2, new_kv_cache(model.config), md))
    assert (got - hf_logits(hf, TOKENS)).abs().max() > 1e-2


def test_tied_checkpoint_has_no_lm_head(tmp_path):
    hf = make_hf_model("qwen2_tied")
    hf.save_pretrained(tmp_path, safe_serialization=True)
    assert "lm_head.weight" not in load_file(tmp_path / "model.safetensors")
    model = load(tmp_path)
    assert model.lm_head is None and ModelConfig.from_pretrained(tmp_path).attention_bias


@pytest.mark.gpu
def test_model_on_cuda_matches_hf(tmp_path):
    hf = make_hf_model("qwen3")
    hf.save_pretrained(tmp_path, safe_serialization=True)
    cuda = torch.device("cuda")
    model = load_model(tmp_path, torch.float32, cuda, TorchAttentionBackend())
    seq = PagedSequence(len(TOKENS), BLOCK_SIZE, NUM_BLOCKS, device=cuda)
    kv = new_kv_cache(model.config).to(cuda)
    rows = []
    with torch.inference_mode():
        for chunk in [TOKENS[:7], TOKENS[7:15]] + [[t] for t in TOKENS[15:]]:
            ids, pos, md = seq.step(chunk)
            rows.append(model.compute_logits(model(ids, pos, kv, md)).cpu())
    torch.testing.assert_close(torch.cat(rows), hf_logits(hf, TOKENS), atol=1e-3, rtol=1e-3)


# ---- loader errors and sharding ------------------------------------------------------------


@pytest.fixture
def llama_dir(tmp_path):
    make_hf_model("llama").save_pretrained(tmp_path, safe_serialization=True)
    return tmp_path


def _rewrite(path, edit):
    tensors = load_file(path / "model.safetensors")
    edit(tensors)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})


def test_missing_tensor_is_named_with_file(llama_dir):
    _rewrite(llama_dir, lambda t: t.pop("model.layers.1.self_attn.k_proj.weight"))
    with pytest.raises(
        CheckpointError,
        match=r"missing tensor 'model.layers.1.self_attn.k_proj.weight'.*model.safetensors",
    ):
        load(llama_dir)


def test_misshaped_and_unexpected_tensors_are_named(llama_dir):
    def edit(t):
        t["model.norm.weight"] = torch.ones(63)
        t["model.layers.0.mlp.extra.weight"] = torch.ones(2)
        t["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)  # ignorable

    _rewrite(llama_dir, edit)
    with pytest.raises(CheckpointError) as err:
        load(llama_dir)
    message = str(err.value)
    assert "'model.norm.weight'" in message and "(63,), expected (64,)" in message
    assert "unexpected tensor 'model.layers.0.mlp.extra.weight'" in message
    assert "inv_freq" not in message


def test_unsupported_architecture_is_named(llama_dir):
    config_path = llama_dir / "config.json"
    raw = json.loads(config_path.read_text())
    raw["architectures"] = ["GPT2LMHeadModel"]
    config_path.write_text(json.dumps(raw))
    with pytest.raises(ValueError, match="'GPT2LMHeadModel'.*LlamaForCausalLM.*Qwen3ForCausalLM"):
        load(llama_dir)


def test_sharded_checkpoint_loads(tmp_path):
    hf = make_hf_model("llama")
    hf.save_pretrained(tmp_path, safe_serialization=True, max_shard_size="60KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 1
    got = run_chunks(load(tmp_path), [TOKENS])
    torch.testing.assert_close(got, hf_logits(hf, TOKENS), atol=1e-4, rtol=1e-4)


# ---- ModelConfig parsing ---------------------------------------------------------------------


def _raw(arch="LlamaForCausalLM", **extra):
    base = dict(
        architectures=[arch],
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=96,
        vocab_size=128,
        max_position_embeddings=4096,
    )
    return {**base, **extra}


def test_config_classic_rope_keys_and_defaults():
    cfg = ModelConfig.from_dict(
        _raw(rope_theta=5e5, rope_scaling={"type": "llama3", "factor": 8.0}, eos_token_id=[7, 8])
    )
    assert cfg.rope_theta == 5e5 and cfg.rope_scaling == {"rope_type": "llama3", "factor": 8.0}
    assert cfg.num_kv_heads == 4 and cfg.head_dim == 16 and cfg.eos_token_ids == (7, 8)
    plain = ModelConfig.from_dict(_raw(rope_parameters={"rope_type": "default", "rope_theta": 1e6}))
    assert plain.rope_theta == 1e6 and plain.rope_scaling is None


def test_config_merges_generation_eos_and_arch_traits():
    cfg = ModelConfig.from_dict(_raw("Qwen2ForCausalLM", eos_token_id=5), {"eos_token_id": [5, 9]})
    assert cfg.eos_token_ids == (5, 9) and cfg.attention_bias and not cfg.o_proj_bias
    assert ModelConfig.from_dict(_raw("Qwen3ForCausalLM", head_dim=32)).qk_norm


def test_config_sliding_window_rules():
    with pytest.raises(ValueError, match="sliding-window attention is not supported"):
        ModelConfig.from_dict(_raw("MistralForCausalLM", sliding_window=1024))
    assert (
        ModelConfig.from_dict(_raw("MistralForCausalLM", sliding_window=4096)).sliding_window
        is None
    )
    qwen = _raw("Qwen2ForCausalLM", sliding_window=1024, use_sliding_window=False)
    assert ModelConfig.from_dict(qwen).sliding_window is None


def test_config_rejects_unknown_rope_type():
    with pytest.raises(ValueError, match="rope type 'yarn' is not supported"):
        ModelConfig.from_dict(_raw(rope_scaling={"rope_type": "yarn", "factor": 4.0}))
    with pytest.raises(ValueError, match="partial rotary"):
        ModelConfig.from_dict(_raw(partial_rotary_factor=0.5))
    with pytest.raises(ValueError, match="hidden_act='gelu' is not supported"):
        ModelConfig.from_dict(_raw(hidden_act="gelu"))
