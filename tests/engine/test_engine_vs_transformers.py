"""The correctness bar: greedy generation token-for-token identical to transformers.

Every supported architecture, float32, 8 prompts of mixed lengths decoded together, through
plain batching, chunked prefill (chunks of 1, 7, 16), prefix-cache hits and preemption.
"""

from __future__ import annotations

import random

import pytest
import torch

from engine import Engine, SamplingParams

ARCHS = ["llama", "llama3.1", "mistral", "qwen2", "qwen3"]
MAX_TOKENS = 12


def _prompts(vocab: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    lengths = [1, 3, 9, 16, 17, 31, 48, 70]  # block-aligned and not, single token, multi-block
    return [[rng.randrange(5, vocab) for _ in range(n)] for n in lengths]


@pytest.fixture(scope="module")
def reference(tiny_model_dir):
    """arch -> (model_dir, prompts, transformers' greedy continuations)."""
    from transformers import AutoModelForCausalLM

    cache = {}

    def get(arch: str):
        if arch not in cache:
            model_dir = tiny_model_dir(arch)
            hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
            prompts = _prompts(hf.config.vocab_size)
            outs = []
            for p in prompts:
                with torch.inference_mode():
                    out = hf.generate(torch.tensor([p]), max_new_tokens=MAX_TOKENS,
                                      min_new_tokens=MAX_TOKENS, do_sample=False,
                                      pad_token_id=0)
                outs.append(out[0, len(p):].tolist())
            cache[arch] = (model_dir, prompts, outs)
        return cache[arch]

    return get


def _engine(model_dir, **kw) -> Engine:
    kw.setdefault("block_size", 4)
    return Engine.from_pretrained(model_dir, dtype="float32", device="cpu",
                                  load_tokenizer=False, **kw)


GREEDY = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("chunk", [None, 1, 7, 16])
def test_greedy_matches_transformers(reference, arch, chunk):
    model_dir, prompts, expected = reference(arch)
    engine = _engine(model_dir, max_num_batched_tokens=chunk or 512, enable_prefix_caching=False)
    outs = engine.generate(prompts, GREEDY)
    assert [o.token_ids for o in outs] == expected
    assert all(o.finish_reason == "length" for o in outs)
    engine.check_integrity()
    assert engine.pool.num_free == engine.pool.num_blocks


@pytest.mark.parametrize("chunk", [None, 7, 16])
def test_compiled_cpu_attention_kernels_match_transformers(reference, chunk):
    """The vectorised kernels (paged decode, paged prefill) need head_dim 32/64/128 and, for
    prefill, 8-aligned blocks: tiny qwen3 (head_dim 32) with blocks of 16 takes them, chunks
    after a cached prefix and prefix-cache hits included."""
    from engine.attention import cpu_kernels

    kernels = cpu_kernels.load()
    if kernels is None:
        pytest.skip("no C++ compiler/ninja here: the compiled attention kernels cannot build")
    model_dir, prompts, expected = reference("qwen3")
    engine = _engine(model_dir, block_size=16, max_num_batched_tokens=chunk or 512)
    cfg = engine.model_config
    assert kernels.prefill_supported(cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, 16)
    for _ in range(2):  # the second pass hits the prefix cache
        outs = engine.generate(prompts, GREEDY)
        assert [o.token_ids for o in outs] == expected
    assert sum(o.num_cached_tokens for o in outs) > 0
    engine.check_integrity()


def test_compiled_decode_step_matches_the_python_layers(reference):
    """Decode-only steps of Llama-like models run as one compiled call on CPU
    (``decode_step``): same tokens and (to float noise) the same logprobs as the layers."""
    from engine import fused_ops
    from engine.attention import cpu_kernels

    if cpu_kernels.load() is None or fused_ops.load() is None:
        pytest.skip("no C++ compiler/ninja here (or SPLITSERVE_FUSED_OPS=0): no compiled step")
    model_dir, prompts, expected = reference("llama")
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True, logprobs=2)
    runs = {}
    for compiled in (True, False):
        engine = _engine(model_dir, block_size=16)
        llama = engine.model.model
        if not compiled:  # as if the compiled step did not apply: the Python layers
            llama._decode_step_checked, llama._decode_step = True, None
        runs[compiled] = engine.generate(prompts, params)
        assert (llama._decode_step is not None) == compiled
    for fast, slow, want in zip(runs[True], runs[False], expected, strict=True):
        assert fast.token_ids == slow.token_ids == want
        for a, b in zip(fast.logprobs, slow.logprobs, strict=True):
            assert a.logprob == pytest.approx(b.logprob, abs=1e-5)
            assert [t for t, _ in a.top] == [t for t, _ in b.top]


@pytest.mark.parametrize("arch", ARCHS)
def test_prefix_cache_hits_give_identical_output(reference, arch):
    model_dir, prompts, expected = reference(arch)
    engine = _engine(model_dir, max_num_batched_tokens=64)
    first = engine.generate(prompts, GREEDY)
    second = engine.generate(prompts, GREEDY)  # every prompt's full blocks are cached now
    assert [o.token_ids for o in first] == expected
    assert [o.token_ids for o in second] == expected
    assert sum(o.num_cached_tokens for o in second) > 0
    long_ones = [o for o, p in zip(second, prompts, strict=False) if len(p) > 4]
    assert all(o.num_cached_tokens > 0 for o in long_ones)
    engine.check_integrity()


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_preemption_under_memory_pressure_is_exact(reference, arch):
    model_dir, prompts, expected = reference(arch)
    # 24 blocks of 4 tokens cannot hold all 8 requests (~70 blocks at the end): preemption.
    engine = _engine(model_dir, num_blocks=24, max_num_batched_tokens=32,
                     enable_prefix_caching=False)
    outs = engine.generate(prompts, GREEDY)
    assert engine.scheduler.num_preemptions > 0
    assert [o.token_ids for o in outs] == expected
    engine.check_integrity()


def test_seeded_sampling_is_reproducible_whatever_the_batch(tiny_model_dir):
    engine = _engine(tiny_model_dir("llama"))
    vocab = engine.model_config.vocab_size
    prompts = _prompts(vocab, seed=1)
    seeded = SamplingParams(max_tokens=10, temperature=1.0, top_p=0.9, top_k=50, seed=1234,
                            ignore_eos=True)
    alone = engine.generate([prompts[3]], seeded)[0].token_ids
    others = SamplingParams(max_tokens=10, temperature=0.8, ignore_eos=True)
    mixed = engine.generate(prompts, [others] * 3 + [seeded] + [others] * 4)[3].token_ids
    assert alone == mixed
    different = SamplingParams(max_tokens=10, temperature=1.0, top_p=0.9, top_k=50, seed=99,
                               ignore_eos=True)
    assert engine.generate([prompts[3]], different)[0].token_ids != alone


def test_text_prompts_stop_strings_and_eos(tiny_model_dir):
    engine = Engine.from_pretrained(tiny_model_dir("llama"), block_size=4)
    greedy = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)
    full = engine.generate(["Hello world, this is"], greedy)[0]
    assert full.text == engine.tokenizer.decode(full.token_ids)
    # Stop at a string taken from the middle of the greedy text.
    mid = full.text[len(full.text) // 3 : len(full.text) // 3 + 2]
    if mid.strip():
        stopped = engine.generate(["Hello world, this is"],
                                  SamplingParams(max_tokens=20, temperature=0.0, stop=[mid],
                                                 ignore_eos=True))[0]
        assert stopped.finish_reason == "stop" and stopped.stop_reason == mid
        assert stopped.text == full.text[: full.text.index(mid)]
    # An EOS id as stop token: generation ends at its first occurrence.
    tok = full.token_ids[5]
    out = engine.generate(["Hello world, this is"],
                          SamplingParams(max_tokens=20, temperature=0.0, stop_token_ids=[tok],
                                         ignore_eos=True))[0]
    assert out.finish_reason == "stop" and out.token_ids[-1] == tok
    assert out.token_ids == full.token_ids[: full.token_ids.index(tok) + 1]


def test_bad_requests_raise_clear_errors(tiny_model_dir):
    from engine.errors import InvalidRequestError

    engine = _engine(tiny_model_dir("llama"), max_model_len=64)
    with pytest.raises(InvalidRequestError, match="empty"):
        engine.add_request("a", [], GREEDY)
    with pytest.raises(InvalidRequestError, match="maximum context length"):
        engine.add_request("b", [5] * 60, GREEDY)
    with pytest.raises(InvalidRequestError, match="token ids"):
        engine.add_request("c", [10**9], GREEDY)
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=-1)


def test_abort_frees_blocks_mid_generation(tiny_model_dir):
    engine = _engine(tiny_model_dir("llama"))
    engine.add_request("a", [7] * 30, SamplingParams(max_tokens=50, ignore_eos=True))
    engine.add_request("b", [8] * 30, SamplingParams(max_tokens=50, ignore_eos=True))
    for _ in range(5):
        engine.step()
    out = engine.abort("a")
    assert out.finish_reason == "abort" and len(out.token_ids) > 0
    assert engine.abort("a") is None
    while engine.has_unfinished_requests():
        engine.step()
    engine.check_integrity()
    assert engine.pool.num_free == engine.pool.num_blocks


def test_logprobs_match_log_softmax(tiny_model_dir):
    engine = _engine(tiny_model_dir("llama"))
    out = engine.generate([[5, 6, 7, 8]], SamplingParams(max_tokens=3, temperature=0.0,
                                                          logprobs=3, ignore_eos=True))[0]
    assert len(out.logprobs) == 3
    for tok, lp in zip(out.token_ids, out.logprobs, strict=False):
        assert lp.top[0][0] == tok  # greedy: the chosen token is the most likely
        assert lp.logprob == pytest.approx(lp.top[0][1])
        assert len(lp.top) == 3 and lp.top[0][1] >= lp.top[1][1] >= lp.top[2][1]


def test_last_chunk_hook_sees_the_final_prompt_blocks_once(tiny_model_dir):
    """The prefill worker announces a KV transfer from this hook: it must fire once per
    prefill-only request, before the step that computes its last chunk, with the blocks
    that will hold the prompt's KV (those the transfer then sends)."""
    engine = Engine.from_pretrained(tiny_model_dir("llama"), block_size=4,
                                    max_num_batched_tokens=8)
    seen: list[tuple[str, list[int], int]] = []
    engine.on_last_chunk_scheduled = lambda request: seen.append(
        (request.request_id, engine.prompt_block_ids(request), request.num_computed_tokens))
    params = SamplingParams(max_tokens=4, temperature=0.0)
    engine.add_request("long", list(range(3, 3 + 21)), params, prefill_only=True)  # 3 chunks
    engine.add_request("plain", list(range(5, 5 + 6)), params)  # not prefill-only: no call
    while engine.has_unfinished_requests():
        engine.step()
    assert [(rid, computed) for rid, _, computed in seen] == [("long", 16)]
    assert seen[0][1] == engine.prefilled_block_ids("long") and len(seen[0][1]) == 6
