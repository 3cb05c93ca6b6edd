"""GPU paths (skipped automatically without CUDA): the engine on CUDA is token-exact against
transformers on CUDA in float32, runs in bfloat16, and the flash-attn backend (when
installed) agrees with the torch backend."""

from __future__ import annotations

import random

import pytest
import torch

from engine import Engine, SamplingParams

pytestmark = pytest.mark.gpu


@pytest.fixture(autouse=True)
def _exact_fp32():
    # TF32 matmuls would make float32 differ from the CPU reference by more than ties allow.
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
@pytest.mark.parametrize("chunk", [7, 512])
def test_cuda_greedy_matches_transformers(tiny_model_dir, arch, chunk):
    from transformers import AutoModelForCausalLM

    model_dir = tiny_model_dir(arch)
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).cuda().eval()
    rng = random.Random(0)
    prompts = [[rng.randrange(5, 1000) for _ in range(n)] for n in (1, 5, 16, 33, 64)]
    expected = []
    for p in prompts:
        with torch.inference_mode():
            out = hf.generate(torch.tensor([p], device="cuda"), max_new_tokens=10,
                              min_new_tokens=10, do_sample=False, pad_token_id=0)
        expected.append(out[0, len(p):].tolist())
    engine = Engine.from_pretrained(model_dir, device="cuda", block_size=16,
                                    max_num_batched_tokens=chunk, load_tokenizer=False,
                                    kv_cache_memory_bytes=64 << 20)
    outs = engine.generate(prompts, SamplingParams(max_tokens=10, temperature=0.0,
                                                   ignore_eos=True))
    assert [o.token_ids for o in outs] == expected
    assert engine.runner.kv_cache.is_cuda


def test_cuda_bfloat16_generates(tiny_model_dir):
    engine = Engine.from_pretrained(tiny_model_dir("qwen2"), device="cuda", dtype="bfloat16",
                                    load_tokenizer=False, kv_cache_memory_bytes=64 << 20)
    outs = engine.generate([[5, 6, 7]] * 4, SamplingParams(max_tokens=8, temperature=0.7,
                                                            seed=3, ignore_eos=True))
    assert all(len(o.token_ids) == 8 for o in outs)
    assert len({tuple(o.token_ids) for o in outs}) == 1  # same seed, same tokens
    engine.check_integrity()


def test_flash_attn_engine_matches_torch_backend(tiny_model_dir):
    pytest.importorskip("flash_attn")
    model_dir = tiny_model_dir("llama")
    prompts = [[5 + i for i in range(n)] for n in (3, 40, 300)]
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    outs = {}
    for backend in ("torch", "flash_attn"):
        engine = Engine.from_pretrained(model_dir, device="cuda", block_size=256,
                                        attention_backend=backend, load_tokenizer=False,
                                        kv_cache_memory_bytes=64 << 20)
        outs[backend] = [o.token_ids for o in engine.generate(prompts, params)]
    assert outs["torch"] == outs["flash_attn"]
