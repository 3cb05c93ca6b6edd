"""Mixture-of-experts models (Mixtral, Qwen3-MoE, Qwen2-MoE) against transformers, float32.

- The sparse block alone: routing (softmax, top-k, renormalisation as the config says) and
  the grouped-GEMM experts equal transformers' own MoE block on random inputs; split expert
  ranges (how tensor parallelism will shard experts) sum to the whole.
- Whole models through the real Engine, on ``make-model`` checkpoints: greedy tokens equal
  transformers' ``generate`` with plain batching, chunked prefill, prefix-cache hits and
  preemption, decode steps through the Python layers (the compiled CPU ``decode_step`` is
  for dense models only).
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
import transformers

from engine import Engine, SamplingParams
from engine.model_config import ModelConfig

ARCHS = ["mixtral", "qwen3_moe", "qwen2_moe"]
MAX_TOKENS = 12
GREEDY = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def moe_model_dir(tmp_path_factory):
    """arch -> a tiny random-weight checkpoint written by make_model (built once)."""
    from engine.make_model import make_model

    built: dict[str, Path] = {}

    def get(arch: str) -> Path:
        if arch not in built:
            out = tmp_path_factory.mktemp(f"moe-{arch}") / "ckpt"
            built[arch] = make_model(out, arch, "tiny", seed=0, progress=False)
        return built[arch]

    return get


def _prompts(vocab: int) -> list[list[int]]:
    rng = random.Random(0)
    lengths = [1, 3, 9, 16, 17, 31, 48, 70]  # block-aligned and not, single token, multi-block
    return [[rng.randrange(5, vocab) for _ in range(n)] for n in lengths]


@pytest.fixture(scope="module")
def reference(moe_model_dir):
    """arch -> (model_dir, prompts, transformers' greedy continuations)."""
    cache = {}

    def get(arch: str):
        if arch not in cache:
            model_dir = moe_model_dir(arch)
            hf = transformers.AutoModelForCausalLM.from_pretrained(
                model_dir, dtype=torch.float32).eval()
            prompts = _prompts(hf.config.vocab_size)
            outs = []
            for p in prompts:
                with torch.inference_mode():
                    out = hf.generate(torch.tensor([p]), max_new_tokens=MAX_TOKENS,
                                      min_new_tokens=MAX_TOKENS, do_sample=False, pad_token_id=0)
                outs.append(out[0, len(p):].tolist())
            cache[arch] = (model_dir, prompts, outs)
        return cache[arch]

    return get


def _engine(model_dir, **kw) -> Engine:
    kw.setdefault("block_size", 4)
    return Engine.from_pretrained(model_dir, dtype="float32", device="cpu",
                                  load_tokenizer=False, **kw)


# --- the sparse block alone ---------------------------------------------------------------

HF_BLOCKS = {  # arch -> (transformers config class, fields, architecture)
    "mixtral": (transformers.MixtralConfig, {"num_local_experts": 8},
                "MixtralForCausalLM"),
    "qwen3_moe": (transformers.Qwen3MoeConfig, {"num_experts": 8, "norm_topk_prob": True,
                                                "moe_intermediate_size": 48},
                  "Qwen3MoeForCausalLM"),
    "qwen2_moe": (transformers.Qwen2MoeConfig, {"num_experts": 8, "norm_topk_prob": False,
                                                "moe_intermediate_size": 48,
                                                "shared_expert_intermediate_size": 80},
                  "Qwen2MoeForCausalLM"),
}


def _hf_block_and_ours(arch: str, top_k: int, expert_range=None):
    """(transformers' sparse block with random weights, ours with the same weights)."""
    from engine.models.moe import SparseMoeBlock
    from engine.models.registry import get_arch_spec

    cls, fields, architecture = HF_BLOCKS[arch]
    hf_config = cls(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                    num_attention_heads=4, num_key_value_heads=2, vocab_size=64,
                    num_experts_per_tok=top_k, **fields)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(hf_config)
    hf_block = model.model.layers[0].mlp.eval()
    with torch.no_grad():
        for param in hf_block.parameters():
            param.normal_(0, 0.3)
    raw = {**hf_config.to_dict(), "architectures": [architecture]}
    config = ModelConfig.from_dict(raw)
    ours = SparseMoeBlock(32, config.moe, get_arch_spec(architecture).moe, expert_range)
    start, end = ours.experts.expert_start, ours.experts.expert_end
    hf_state = hf_block.state_dict()
    with torch.no_grad():  # transformers 5 stacks experts in memory as we do
        ours.gate.weight.copy_(hf_state["gate.weight"])
        ours.experts.w13.copy_(hf_state["experts.gate_up_proj"][start:end])
        ours.experts.w2.copy_(hf_state["experts.down_proj"][start:end])
        if ours.shared_expert is not None:
            ours.shared_expert.gate_up_proj.weight.copy_(torch.cat(
                [hf_state["shared_expert.gate_proj.weight"],
                 hf_state["shared_expert.up_proj.weight"]]))
            ours.shared_expert.down_proj.weight.copy_(hf_state["shared_expert.down_proj.weight"])
            ours.shared_expert_gate.weight.copy_(hf_state["shared_expert_gate.weight"])
    return hf_block, ours.eval()


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("top_k", [1, 2, 3])
def test_sparse_block_matches_transformers(arch, top_k):
    from engine.models.moe import route

    hf_block, ours = _hf_block_and_ours(arch, top_k)
    x = torch.randn(37, 32, generator=torch.Generator().manual_seed(top_k))
    with torch.no_grad():
        _, hf_weights, hf_ids = hf_block.gate(x)
        weights, ids = route(ours.gate(x), top_k, ours.renormalize)
        expected = hf_block(x[None])[0]
        got = ours(x)
    assert torch.equal(ids, hf_ids)
    torch.testing.assert_close(weights, hf_weights, rtol=0, atol=1e-6)
    if ours.renormalize:
        torch.testing.assert_close(weights.sum(-1), torch.ones(37))
    else:  # Qwen2-MoE without norm_topk_prob: plain softmax probabilities, summing below 1
        assert (weights.sum(-1) < 1).all()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_sparse_block_in_bfloat16_is_bitwise_transformers(arch):
    """Where rounding shows, the dtypes must be transformers' too: Mixtral weights and sums
    its experts' outputs in float32, Qwen in the activations' dtype."""
    hf_block, ours = _hf_block_and_ours(arch, 3)
    hf_block.to(torch.bfloat16)
    ours.to(torch.bfloat16)
    x = torch.randn(37, 32, generator=torch.Generator().manual_seed(1)).bfloat16()
    with torch.no_grad():
        expected, got = hf_block(x[None])[0], ours(x)
    assert got.dtype == torch.bfloat16
    assert torch.equal(got, expected), (got - expected).abs().max()


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe"])
@pytest.mark.parametrize("world_size", [2, 3])
def test_expert_ranges_sum_to_the_whole_block(arch, world_size):
    """Under tensor parallelism each rank will hold a range of experts and the layer's
    all-reduce will sum their outputs: the split must add up to the unsplit block. (The
    shared expert is not split here: only rank 0 keeps it in this check.)"""
    from engine.models.moe import expert_range

    ranges = [expert_range(8, rank, world_size) for rank in range(world_size)]
    assert ranges == ([(0, 4), (4, 8)] if world_size == 2 else [(0, 3), (3, 6), (6, 8)])
    _, whole = _hf_block_and_ours(arch, 2)
    x = torch.randn(23, 32, generator=torch.Generator().manual_seed(5))
    parts = [_hf_block_and_ours(arch, 2, r)[1] for r in ranges]
    for part in parts[1:]:
        part.shared_expert = None
    with torch.no_grad():
        total = sum(part(x) for part in parts)
        torch.testing.assert_close(total, whole(x), rtol=1e-5, atol=1e-5)
    assert [p.experts.w13.shape[0] for p in parts] == [end - start for start, end in ranges]
    with pytest.raises(ValueError, match="expert range"):
        _hf_block_and_ours(arch, 2, (4, 9))
    with pytest.raises(ValueError, match="at least one expert"):
        expert_range(8, 0, 9)


def test_loading_a_range_of_experts_reads_only_those(moe_model_dir):
    """A model holding experts [2, 6) loads from the full checkpoint: other experts' tensors
    are skipped, not reported as unexpected; its stacked weights are the full model's rows."""
    from engine.attention.torch_ref import TorchAttentionBackend
    from engine.models.loader import load_model, load_weights
    from engine.models.moe_model import MoeForCausalLM

    model_dir = moe_model_dir("mixtral")
    full = load_model(model_dir, torch.float32, torch.device("cpu"), TorchAttentionBackend())
    config = ModelConfig.from_pretrained(model_dir)
    part = MoeForCausalLM(config, TorchAttentionBackend(), expert_range=(2, 6))
    load_weights(part, model_dir)
    for layer_full, layer_part in zip(full.model.layers, part.model.layers, strict=True):
        experts_full, experts_part = layer_full.mlp.experts, layer_part.mlp.experts
        assert torch.equal(experts_part.w13, experts_full.w13[2:6])
        assert torch.equal(experts_part.w2, experts_full.w2[2:6])
        assert torch.equal(layer_part.mlp.gate.weight, layer_full.mlp.gate.weight)


def test_a_missing_expert_tensor_is_named(moe_model_dir, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    from engine.attention.torch_ref import TorchAttentionBackend
    from engine.models.loader import CheckpointError, load_model

    src = moe_model_dir("qwen3_moe")
    for f in src.iterdir():
        shutil.copy(f, tmp_path / f.name)
    tensors = load_file(str(src / "model.safetensors"))
    del tensors["model.layers.1.mlp.experts.5.down_proj.weight"]
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"missing tensor 'model\.layers\.1\.mlp\.experts"
                       r"\.5\.down_proj\.weight' \(expected shape \(64, 64\)\)"):
        load_model(tmp_path, torch.float32, torch.device("cpu"), TorchAttentionBackend())


def test_config_traits_are_read_per_architecture(moe_model_dir):
    mixtral = ModelConfig.from_pretrained(moe_model_dir("mixtral")).moe
    assert (mixtral.num_experts, mixtral.top_k, mixtral.renormalize) == (8, 2, True)
    assert mixtral.sparse_layers == (0, 1) and mixtral.intermediate_size == 128
    qwen2 = ModelConfig.from_pretrained(moe_model_dir("qwen2_moe"))
    assert qwen2.attention_bias and not qwen2.o_proj_bias
    assert qwen2.moe.sparse_layers == (0,)  # mlp_only_layers=[1]: layer 1 is dense
    assert (qwen2.moe.renormalize, qwen2.moe.shared_expert_intermediate_size) == (False, 128)
    qwen3 = ModelConfig.from_pretrained(moe_model_dir("qwen3_moe"))
    assert qwen3.qk_norm and qwen3.moe.renormalize and qwen3.moe.intermediate_size == 64


_HUB_BASE = {"hidden_size": 2048, "num_hidden_layers": 6, "num_attention_heads": 16,
             "num_key_value_heads": 4, "intermediate_size": 5632, "vocab_size": 151936,
             "hidden_act": "silu", "max_position_embeddings": 8192}


def test_hub_spellings_of_moe_configs():
    """Hub config.json files spell Qwen's expert count ``num_experts`` (transformers 5 writes
    ``num_local_experts``); sparse layers follow mlp_only_layers and decoder_sparse_step."""
    qwen15 = ModelConfig.from_dict({
        **_HUB_BASE, "architectures": ["Qwen2MoeForCausalLM"], "num_experts": 60,
        "num_experts_per_tok": 4, "moe_intermediate_size": 1408, "norm_topk_prob": False,
        "shared_expert_intermediate_size": 5632, "decoder_sparse_step": 1,
        "mlp_only_layers": [], "sliding_window": 32768, "use_sliding_window": False}).moe
    assert (qwen15.num_experts, qwen15.top_k, qwen15.intermediate_size) == (60, 4, 1408)
    assert not qwen15.renormalize and qwen15.shared_expert_intermediate_size == 5632
    assert qwen15.sparse_layers == (0, 1, 2, 3, 4, 5)
    qwen3 = ModelConfig.from_dict({
        **_HUB_BASE, "architectures": ["Qwen3MoeForCausalLM"], "num_experts": 128,
        "num_experts_per_tok": 8, "moe_intermediate_size": 768, "norm_topk_prob": True,
        "decoder_sparse_step": 2, "mlp_only_layers": [3]}).moe
    assert qwen3.renormalize and qwen3.shared_expert_intermediate_size == 0
    assert qwen3.sparse_layers == (1, 5)  # every 2nd layer, minus the listed dense one
    mixtral = ModelConfig.from_dict({
        **_HUB_BASE, "architectures": ["MixtralForCausalLM"], "num_local_experts": 8,
        "num_experts_per_tok": 2, "norm_topk_prob": False}).moe
    assert mixtral.renormalize  # Mixtral renormalises whatever the config says
    with pytest.raises(ValueError, match="num_experts, num_local_experts"):
        ModelConfig.from_dict({**_HUB_BASE, "architectures": ["Qwen3MoeForCausalLM"],
                               "num_experts_per_tok": 8, "moe_intermediate_size": 768})
    with pytest.raises(ValueError, match="num_experts_per_tok=9 must be in 1..8"):
        ModelConfig.from_dict({**_HUB_BASE, "architectures": ["MixtralForCausalLM"],
                               "num_local_experts": 8, "num_experts_per_tok": 9})


# --- whole models through the Engine --------------------------------------------------------

@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("chunk", [None, 1, 7, 16])
def test_greedy_matches_transformers(reference, arch, chunk):
    model_dir, prompts, expected = reference(arch)
    engine = _engine(model_dir, max_num_batched_tokens=chunk or 512, enable_prefix_caching=False)
    outs = engine.generate(prompts, GREEDY)
    assert [o.token_ids for o in outs] == expected
    engine.check_integrity()
    assert engine.pool.num_free == engine.pool.num_blocks


@pytest.mark.parametrize("arch", ARCHS)
def test_prefix_cache_hits_give_identical_output(reference, arch):
    model_dir, prompts, expected = reference(arch)
    engine = _engine(model_dir, max_num_batched_tokens=64)
    first = engine.generate(prompts, GREEDY)
    second = engine.generate(prompts, GREEDY)  # every prompt's full blocks are cached now
    assert [o.token_ids for o in first] == expected
    assert [o.token_ids for o in second] == expected
    long_ones = [o for o, p in zip(second, prompts, strict=True) if len(p) > 4]
    assert all(o.num_cached_tokens > 0 for o in long_ones)
    engine.check_integrity()


@pytest.mark.parametrize("arch", ["mixtral", "qwen3_moe"])
def test_preemption_under_memory_pressure_is_exact(reference, arch):
    model_dir, prompts, expected = reference(arch)
    # 24 blocks of 4 tokens cannot hold all 8 requests (~70 blocks at the end): preemption.
    engine = _engine(model_dir, num_blocks=24, max_num_batched_tokens=32,
                     enable_prefix_caching=False)
    outs = engine.generate(prompts, GREEDY)
    assert engine.scheduler.num_preemptions > 0
    assert [o.token_ids for o in outs] == expected
    engine.check_integrity()


@pytest.mark.parametrize(("arch", "chunk"), [("mixtral", None), ("qwen3_moe", 7)])
def test_moe_decode_steps_run_the_python_layers(reference, arch, chunk):
    """The compiled CPU ``decode_step`` has no sparse MLP: a MoE model must decide, once,
    not to use it where it builds. Mixtral (no bias, no q/k norm) gets as far as the MLP
    check; qwen3_moe (head_dim 32, blocks of 16) takes the compiled paged-attention
    kernels, prefill and decode, which serve MoE models as they serve dense ones."""
    from engine import fused_ops
    from engine.attention import cpu_kernels
    from engine.models.moe import SparseMoeBlock

    kernels = cpu_kernels.load()
    assert kernels is not None and fused_ops.load() is not None, (
        "no C++ compiler here: the compiled decode step was not in the running")
    model_dir, prompts, expected = reference(arch)
    engine = _engine(model_dir, block_size=16, max_num_batched_tokens=chunk or 512)
    cfg = engine.model_config
    if arch == "qwen3_moe":
        assert kernels.prefill_supported(cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, 16)
    for _ in range(2):  # the second pass hits the prefix cache
        outs = engine.generate(prompts, GREEDY)
        assert [o.token_ids for o in outs] == expected
    assert sum(o.num_cached_tokens for o in outs) > 0
    model = engine.model.model
    assert model._decode_step_checked and model._decode_step is None
    assert all(isinstance(layer.mlp, SparseMoeBlock) for layer in model.layers)
    engine.check_integrity()


@pytest.mark.gpu
@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe"])
def test_cuda_greedy_matches_transformers(moe_model_dir, arch):
    """On CUDA (skipped without it): the same expert code path, float32 without TF32, gives
    transformers' greedy tokens on CUDA, with chunked prefill."""
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        model_dir = moe_model_dir(arch)
        hf = transformers.AutoModelForCausalLM.from_pretrained(
            model_dir, dtype=torch.float32).cuda().eval()
        prompts = _prompts(hf.config.vocab_size)[:6]
        expected = []
        for p in prompts:
            with torch.inference_mode():
                out = hf.generate(torch.tensor([p], device="cuda"), max_new_tokens=MAX_TOKENS,
                                  min_new_tokens=MAX_TOKENS, do_sample=False, pad_token_id=0)
            expected.append(out[0, len(p):].tolist())
        engine = Engine.from_pretrained(model_dir, device="cuda", block_size=16,
                                        max_num_batched_tokens=16, load_tokenizer=False,
                                        kv_cache_memory_bytes=64 << 20)
        assert [o.token_ids for o in engine.generate(prompts, GREEDY)] == expected
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old
