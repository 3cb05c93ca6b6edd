"""fp8 KV cache (``engine.attention.kv_quant``): rounding, sizes, the torch backend on an fp8
cache, the registry's refusals, and the engine's greedy agreement / logprob drift against a
float32 cache on a fixed prompt set. (The Triton kernels' fp8 path is checked against the
torch backend's in test_triton_attention.py, under Triton's interpreter.)"""

from __future__ import annotations

import random

import pytest
import torch

from engine.attention import kv_quant
from engine.attention.registry import select_backend
from engine.attention.torch_ref import TorchAttentionBackend
from engine.config import KV_CACHE_DTYPES, CacheConfig
from tests.engine.paged_helpers import build_metadata, random_block_tables, slots_for
from tests.engine.test_attention import dense_reference, layer_caches

FP8 = [torch.float8_e4m3fn, torch.float8_e5m2]


def test_config_names_and_sizes():
    assert set(KV_CACHE_DTYPES) == set(kv_quant.KV_CACHE_DTYPES)
    with pytest.raises(ValueError, match="kv_cache_dtype='fp8'.*auto, fp8_e4m3, fp8_e5m2"):
        CacheConfig(kv_cache_dtype="fp8")
    with pytest.raises(ValueError, match="must be positive"):
        CacheConfig(kv_cache_dtype="fp8_e4m3", k_scale=0.0)
    assert kv_quant.cache_dtype("auto", torch.bfloat16) == torch.bfloat16
    assert kv_quant.cache_dtype("fp8_e5m2", torch.bfloat16) == torch.float8_e5m2
    dims = (16, 16, 8, 128)  # layers, block size, KV heads, head_dim
    bf16 = kv_quant.bytes_per_block(*dims, torch.bfloat16)
    fp8 = kv_quant.bytes_per_block(*dims, kv_quant.cache_dtype("fp8_e4m3", torch.bfloat16))
    assert bf16 == 2 * fp8  # twice the blocks per byte of a 16-bit cache
    assert kv_quant.bytes_per_block(*dims, torch.float32) == 4 * fp8


@pytest.mark.parametrize("dtype", FP8)
def test_quantize_rounds_to_nearest_within_half_an_ulp_and_saturates(dtype):
    mant = {torch.float8_e4m3fn: 3, torch.float8_e5m2: 2}[dtype]
    finfo = torch.finfo(dtype)
    x = torch.randn(4096) * torch.logspace(-1, 1.5, 4096)  # x / 0.5: normal, < 448
    q = kv_quant.dequantize(kv_quant.quantize(x, dtype, 0.5), torch.float32, 0.5)
    # half an ulp: relative for normal values, absolute below them (half the subnormal step,
    # times the scale 0.5)
    half_ulp = torch.clamp(x.abs() * 2.0 ** -(mant + 1),
                           min=0.5 * finfo.smallest_normal * 2.0**-mant * 0.5)
    assert ((q - x).abs() <= half_ulp).all()
    big = kv_quant.quantize(torch.tensor([1e9, -1e9]), dtype, 1.0).float()
    assert big.tolist() == [finfo.max, -finfo.max]  # saturated, not NaN


@pytest.mark.parametrize("dtype", FP8)
@pytest.mark.parametrize("block_size", [4, 16])
def test_torch_backend_on_fp8_cache_equals_attention_over_the_dequantised_kv(dtype, block_size):
    """Decodes and chunks (fresh, after a cached prefix) on an fp8 cache give exactly the
    attention over the quantise-dequantise round trip of K and V: nothing else is lost."""
    H, KVH, D = 4, 2, 32
    cached, new = [9, 2 * block_size, 0, 11], [1, 1, 7, 5]
    gen = torch.Generator().manual_seed(block_size)
    scales = (0.5, 2.0)
    seq_lens = [c + n for c, n in zip(cached, new, strict=True)]
    tables = random_block_tables([-(-s // block_size) for s in seq_lens], 64, random.Random(0))
    k_cache, v_cache = layer_caches(torch.zeros(64, 2, 2, block_size, KVH, D, dtype=dtype))
    backend = TorchAttentionBackend()
    backend.set_kv_scales(*scales)
    full_k = [torch.randn(s, KVH, D, generator=gen) * 3 for s in seq_lens]
    full_v = [torch.randn(s, KVH, D, generator=gen) for s in seq_lens]
    for table, c, k, v in zip(tables, cached, full_k, full_v, strict=True):
        if c:  # the cached prefixes, written as a previous step would have
            slots = torch.tensor(slots_for(table, 0, c, block_size))
            k_cache.index_put_((slots // block_size, slots % block_size),
                               kv_quant.quantize(k[:c], dtype, scales[0]))
            v_cache.index_put_((slots // block_size, slots % block_size),
                               kv_quant.quantize(v[:c], dtype, scales[1]))
    queries = [torch.randn(n, H, D, generator=gen) for n in new]
    out = backend.forward(
        torch.cat(queries), torch.cat([k[c:] for k, c in zip(full_k, cached, strict=True)]),
        torch.cat([v[c:] for v, c in zip(full_v, cached, strict=True)]), k_cache, v_cache,
        build_metadata(tables, cached, new, block_size), D**-0.5)
    rt = lambda x, s: kv_quant.dequantize(kv_quant.quantize(x, dtype, s), torch.float32, s)  # noqa: E731
    want = torch.cat([dense_reference(q, rt(k, scales[0]), rt(v, scales[1]), D**-0.5)
                      for q, k, v in zip(queries, full_k, full_v, strict=True)])
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
    exact = torch.cat([dense_reference(q, k, v, D**-0.5)
                       for q, k, v in zip(queries, full_k, full_v, strict=True)])
    assert (out - exact).abs().max() > 1e-3  # the cache really is fp8 (lossy)


def test_registry_refuses_backends_that_cannot_read_fp8():
    cpu = torch.device("cpu")
    backend = select_backend("auto", cpu, 16, "fp8_e4m3", (0.5, 0.25))
    assert isinstance(backend, TorchAttentionBackend)
    assert type(backend) is TorchAttentionBackend  # not the compiled CPU kernels' subclass
    assert backend.kv_scales == (0.5, 0.25)
    for name in ("cpu_paged", "flash_attn"):
        with pytest.raises(ValueError, match=rf"'{name}' cannot read an fp8 KV cache.*"
                                             r"--kv-cache-dtype auto.*torch, triton"):
            select_backend(name, cpu, 256, "fp8_e5m2")


def test_cpu_paged_backend_refuses_an_fp8_cache_it_is_handed():
    from engine.attention.cpu_paged import CpuPagedAttentionBackend

    k_cache, v_cache = layer_caches(torch.zeros(4, 2, 2, 16, 2, 32, dtype=torch.float8_e4m3fn))
    md = build_metadata([[1]], [3], [1], 16)
    with pytest.raises(ValueError, match="float32 KV caches.*--attention-backend torch"):
        CpuPagedAttentionBackend().forward(torch.zeros(1, 4, 32), torch.zeros(1, 2, 32),
                                           torch.zeros(1, 2, 32), k_cache, v_cache, md, 0.1)


def test_copy_on_write_copies_fp8_blocks():
    from engine.model_runner import ModelRunner

    runner = object.__new__(ModelRunner)  # only the cache is needed for a block copy
    runner.device = torch.device("cpu")
    runner.kv_cache = kv_quant.quantize(torch.randn(4, 2, 2, 16, 2, 8), torch.float8_e4m3fn, 1.0)
    before = runner.kv_cache.view(torch.uint8).clone()
    runner.copy_blocks([(1, 3)])
    assert torch.equal(runner.kv_cache.view(torch.uint8)[3], before[1])
    assert torch.equal(runner.kv_cache.view(torch.uint8)[:3], before[:3])


# -- the engine: greedy agreement and logprob drift vs a float32 cache ----------------------
PROMPT_LENGTHS = (1, 3, 9, 16, 17, 31, 48, 70)
MAX_TOKENS = 16


def _engine_with_kv_cache(model_dir, kv_cache_dtype: str):
    """An engine whose KV cache has ``kv_cache_dtype``: what the engine's allocation does
    once it takes ``CacheConfig.kv_cache_dtype`` (the cache re-made in that dtype and the
    backend chosen for it)."""
    from engine import Engine

    engine = Engine.from_pretrained(model_dir, block_size=16, load_tokenizer=False,
                                    enable_prefix_caching=False)
    if kv_cache_dtype != "auto":
        dtype = kv_quant.cache_dtype(kv_cache_dtype, engine.dtype)
        engine.runner.kv_cache = torch.zeros_like(engine.runner.kv_cache, dtype=dtype)
        backend = select_backend("auto", engine.device, 16, kv_cache_dtype)
        for layer in engine.model.model.layers:
            layer.self_attn.backend = backend
    return engine


def agreement_and_drift(base, outs) -> tuple[int, int, float]:
    """(first tokens equal, tokens equal before each sequence's first divergence, max
    |logprob difference| of the same token at the same context)."""
    first = sum(o.token_ids[0] == b.token_ids[0] for o, b in zip(outs, base, strict=True))
    agree, drift = 0, 0.0
    for o, b in zip(outs, base, strict=True):
        for t, bt, lp, blp in zip(o.token_ids, b.token_ids, o.logprobs, b.logprobs,
                                  strict=True):
            if t != bt:
                break
            agree += 1
            drift = max(drift, abs(lp.logprob - blp.logprob))
    return first, agree, drift


# Bounds, from runs of tiny qwen3 (K/V rms ~1-2, max ~8: no saturation at scale 1), which
# measured e4m3: 8/8 first tokens, 70/128 tokens before divergence, drift 0.33 nats; e5m2:
# 6/8, 33/128, 0.60. fp8 rounding (relative error <= 1/16 for e4m3, 1/8 for e5m2) on this
# random, near-tied model moves logprobs by tenths of a nat and flips near-ties later in a
# sequence; a broken path (scales not applied, bytes misread) flips the first tokens and
# moves logprobs by nats. The bounds leave room for float noise, not for such a break.
BOUNDS = {"fp8_e4m3": (7, 50, 0.5), "fp8_e5m2": (5, 20, 1.0)}


def test_fp8_cache_greedy_agreement_and_logprob_drift_vs_float32(tiny_model_dir):
    from engine import SamplingParams

    model_dir = tiny_model_dir("qwen3")
    rng = random.Random(0)
    prompts = [[rng.randrange(5, 1000) for _ in range(n)] for n in PROMPT_LENGTHS]
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True,
                            logprobs=0)
    base = _engine_with_kv_cache(model_dir, "auto").generate(prompts, params)
    for name, (min_first, min_agree, max_drift) in BOUNDS.items():
        engine = _engine_with_kv_cache(model_dir, name)
        outs = engine.generate(prompts, params)
        assert engine.runner.kv_cache.dtype == kv_quant.KV_CACHE_DTYPES[name]
        first, agree, drift = agreement_and_drift(base, outs)
        print(f"{name}: first tokens {first}/{len(prompts)}, tokens before divergence "
              f"{agree}/{len(prompts) * MAX_TOKENS}, max logprob drift {drift:.3f} nats")
        assert first >= min_first and agree >= min_agree and drift <= max_drift


def test_engine_option_kv_cache_dtype_doubles_the_blocks_of_a_16_bit_cache(tiny_model_dir):
    """``Engine.from_pretrained(kv_cache_dtype=...)``: the same KV memory holds twice the
    blocks of a bfloat16 cache, the cache really is fp8, and greedy generation runs."""
    from engine import Engine, SamplingParams

    model = tiny_model_dir("llama")
    make = lambda kv: Engine.from_pretrained(  # noqa: E731
        model, dtype="bfloat16", attention_backend="torch", block_size=4,
        kv_cache_memory_bytes=1 << 20, load_tokenizer=False, kv_cache_dtype=kv)
    bf16, fp8 = make("auto"), make("fp8_e4m3")
    assert fp8.num_blocks == 2 * bf16.num_blocks
    assert fp8.runner.kv_cache.dtype == torch.float8_e4m3fn
    out = fp8.generate([[5, 6, 7, 8, 9]], SamplingParams(max_tokens=4, temperature=0.0))
    assert len(out[0].token_ids) == 4
