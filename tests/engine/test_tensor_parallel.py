"""Tensor parallelism: TP=2 (two local processes over gloo) against TP=1 and transformers.

- Sharding arithmetic (pure): heads, replicated KV heads, padded vocabulary, clear errors.
- Greedy output with ``tensor_parallel_size=2`` equals TP=1 and transformers (float32) token
  for token for llama, qwen3, mixtral, qwen3_moe and qwen2_moe (shared expert), through
  chunked prefill, preemption and prefix-cache hits, in one engine per model (each TP=2
  engine costs a process start: a fork from the forkserver after the first).
- A model whose KV heads are fewer than the ranks (replicated KV), whose vocabulary does
  not split evenly (padded rows) and whose LM head is the embedding (tied).
- Seeded sampling under TP=2 equals TP=1; a fork's copy-on-write reaches every rank.
- Killing rank 1 fails every request in flight with a clear error, fast, and the engine
  stays failed (no hang); so does a rank that stops answering, after the timeout; an
  error after the last collective (sampling) is not fatal; ``close`` stops the ranks.
"""

from __future__ import annotations

import os
import random
import signal
import time

import pytest
import torch

from engine import Engine, SamplingParams
from engine.parallel.shard import Shard

MAX_TOKENS = 12
GREEDY = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)


# -- sharding arithmetic ---------------------------------------------------------------------
def test_shard_ranges_and_errors():
    assert [Shard(r, 2).split(8, "heads") for r in range(2)] == [(0, 4), (4, 8)]
    # 4 ranks, 2 KV heads: ranks 0, 1 share head 0 (their query heads 0-1, 2-3 use it)
    assert [Shard(r, 4).kv_heads(2, 8) for r in range(4)] == [(0, 1), (0, 1), (1, 2), (1, 2)]
    assert [Shard(r, 2).kv_heads(2, 4) for r in range(2)] == [(0, 1), (1, 2)]
    assert [Shard(r, 2).vocab(1021) for r in range(2)] == [(0, 511), (511, 1022)]  # padded
    with pytest.raises(ValueError, match="attention heads .4. is not divisible by "
                                         "tensor_parallel_size=3"):
        Shard(0, 3).kv_heads(2, 4)
    with pytest.raises(ValueError, match="neither a divisor nor a multiple"):
        Shard(0, 6).kv_heads(4, 12)


def test_a_size_that_does_not_split_the_model_fails_before_starting_ranks(tiny_model_dir):
    with pytest.raises(ValueError, match=r"attention heads \(4\) is not divisible by "
                                         "tensor_parallel_size=3"):
        _engine(tiny_model_dir("llama"), tp=3)


# -- models and references -------------------------------------------------------------------
def _prompts(vocab: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    lengths = [1, 3, 9, 16, 17, 31, 48, 70]  # block-aligned and not, single token, multi-block
    return [[rng.randrange(5, vocab) for _ in range(n)] for n in lengths]


def _hf_greedy(model_dir, prompts) -> list[list[int]]:
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    outs = []
    for p in prompts:
        with torch.inference_mode():
            out = hf.generate(torch.tensor([p]), max_new_tokens=MAX_TOKENS,
                              min_new_tokens=MAX_TOKENS, do_sample=False, pad_token_id=0)
        outs.append(out[0, len(p):].tolist())
    return outs


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir, tmp_path_factory):
    """name -> a tiny checkpoint: the shared dense ones, or a MoE one built here."""
    from engine.make_model import make_model

    built = {}

    def get(name: str):
        if name in ("llama", "qwen3"):
            return tiny_model_dir(name)
        if name not in built:
            out = tmp_path_factory.mktemp(f"tp-{name}") / "ckpt"
            built[name] = make_model(out, name, "tiny", seed=0, progress=False)
        return built[name]

    return get


def _engine(model_dir, tp: int = 1, **kw) -> Engine:
    kw.setdefault("block_size", 4)
    return Engine.from_pretrained(model_dir, dtype="float32", device="cpu",
                                  load_tokenizer=False, tensor_parallel_size=tp, **kw)


def _two_passes(engine: Engine, prompts) -> tuple[list, list]:
    first = engine.generate(prompts, GREEDY)
    # Last finished first: their full blocks are the last evicted, so they hit the cache.
    second = engine.generate(prompts[::-1], GREEDY)[::-1]
    engine.check_integrity()
    assert engine.pool.num_free == engine.pool.num_blocks
    return first, second


# -- greedy equality -------------------------------------------------------------------------
# Blocks of 4 tokens, except qwen3: blocks of 16 let each rank's shapes (2 query heads, 1 KV
# head of 32) take the compiled paged-prefill kernel. Either way ~100 tokens of KV for 8
# requests needing ~200: preemption.
KV_LAYOUT = {"qwen3": dict(block_size=16, num_blocks=7)}


@pytest.mark.timeout(240)
@pytest.mark.parametrize("arch", ["llama", "qwen3", "mixtral", "qwen3_moe", "qwen2_moe"])
def test_tp2_greedy_equals_tp1_and_transformers(model_dir, arch):
    """Chunks of 16 tokens (prompts of 17..70 are chunked), too few KV blocks for the 8
    requests (preemption), prefix caching on (the second pass hits). qwen2_moe: the
    shared expert split like a dense MLP."""
    path = model_dir(arch)
    config = dict(KV_LAYOUT.get(arch, dict(num_blocks=24)), max_num_batched_tokens=16)
    one = _engine(path, **config)
    prompts = _prompts(one.model_config.vocab_size)
    expected = _hf_greedy(path, prompts)
    runs = {1: _two_passes(one, prompts)}
    two = _engine(path, tp=2, **config)
    try:
        assert two.kv_heads_per_rank == one.kv_heads_per_rank // 2
        _check_prefill_kernel(two)
        runs[2] = _two_passes(two, prompts)
        assert two.scheduler.num_preemptions == one.scheduler.num_preemptions > 0
    finally:
        two.close()
    for tp, (first, second) in runs.items():
        assert [o.token_ids for o in first] == expected, f"TP={tp}, first pass"
        assert [o.token_ids for o in second] == expected, f"TP={tp}, prefix-cache pass"
        assert sum(o.num_cached_tokens for o in second) > 0
    assert ([o.num_cached_tokens for o in runs[2][1]]
            == [o.num_cached_tokens for o in runs[1][1]])


def _check_prefill_kernel(engine: Engine) -> None:
    """With blocks of 16 on an AVX2 machine, the per-rank shapes take paged_prefill."""
    from engine.attention import cpu_kernels

    kernels, cfg = cpu_kernels.load(), engine.model_config
    if kernels is None or engine.cache_config.block_size != 16:
        return
    local = (cfg.num_heads // 2, engine.kv_heads_per_rank, cfg.head_dim, 16)
    assert engine.attn_backend.name == "cpu_paged"
    assert kernels.prefill_supported(*local) == kernels.prefill_supported(
        cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, 16)


@pytest.fixture(scope="module")
def odd_llama(tmp_path_factory):
    """A llama whose 1 KV head is fewer than 2 ranks (replicated), whose 1021-token
    vocabulary does not split in two (a padding row) and whose LM head is the embedding."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=1, intermediate_size=128, vocab_size=1021,
                         max_position_embeddings=512, tie_word_embeddings=True)
    model = LlamaForCausalLM(config).float()
    with torch.no_grad():  # larger weights than the default init: clear top-1 gaps
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 4 / 64**0.5)
    path = tmp_path_factory.mktemp("odd-llama") / "ckpt"
    model.save_pretrained(path, safe_serialization=True)
    return path


@pytest.mark.timeout(120)
def test_replicated_kv_heads_padded_vocab_tied_head(odd_llama):
    prompts = _prompts(1021, seed=2)
    expected = _hf_greedy(odd_llama, prompts)
    engine = _engine(odd_llama, tp=2, max_num_batched_tokens=32)
    try:
        assert engine.kv_heads_per_rank == 1  # the one KV head, on both ranks
        assert engine.model.model.embed_tokens.num_embeddings == 511  # rows 0..510 of 1022
        outs = engine.generate(prompts, GREEDY)
    finally:
        engine.close()
    assert [o.token_ids for o in outs] == expected


# -- sampling and forks ----------------------------------------------------------------------
@pytest.mark.timeout(120)
def test_tp2_seeded_sampling_logprobs_and_fork_equal_tp1(model_dir):
    path = model_dir("llama")
    seeded = [SamplingParams(max_tokens=10, temperature=1.0, top_p=0.9, top_k=50, seed=s,
                             ignore_eos=True, logprobs=2) for s in range(8)]
    runs = {}
    for tp in (1, 2):
        engine = _engine(path, tp=tp)
        try:
            prompts = _prompts(engine.model_config.vocab_size, seed=1)
            outs = engine.generate(prompts, seeded)
            runs[tp] = (outs, _forked(engine, prompts[5]))
        finally:
            engine.close()
    (outs1, fork1), (outs2, fork2) = runs[1], runs[2]
    assert [o.token_ids for o in outs2] == [o.token_ids for o in outs1]
    for a, b in zip(outs1, outs2, strict=True):
        for x, y in zip(a.logprobs, b.logprobs, strict=True):
            assert y.logprob == pytest.approx(x.logprob, abs=1e-4)
    assert fork2 == fork1


@pytest.mark.timeout(120)
def test_tp2_fp8_kv_cache_equals_tp1_fp8(model_dir):
    """Each rank holds its heads in fp8 (half the bytes of a bf16 cache per head), and the
    tokens and logprobs are those of a TP=1 fp8 engine: quantisation is per element, so
    splitting the heads over ranks changes only what the float32 summation order changes
    (~1e-6, as at any dtype). Except where a K/V value lies within that much of an fp8
    rounding boundary: it then lands on the neighbouring fp8 value (an e4m3 step is 1/8
    relative), which moves the logprobs after it by up to ~1e-3 (an AVX2 host: 2 of 64 by
    4e-4 and 8.5e-4, the rest within 3e-6). A real difference moves them all: fp8 scales
    that differ by a fifth changed the tokens and every logprob, by up to 1.5."""
    path = model_dir("llama")
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True, logprobs=1)
    runs = {}
    for tp in (1, 2):
        engine = _engine(path, tp=tp, kv_cache_dtype="fp8_e4m3", k_scale=0.5, v_scale=0.25)
        try:
            assert engine.runner.kv_cache.dtype == torch.float8_e4m3fn
            assert engine.runner.kv_cache.shape[4] == engine.model_config.num_kv_heads // tp
            runs[tp] = engine.generate(_prompts(engine.model_config.vocab_size, seed=2), params)
        finally:
            engine.close()
    assert [o.token_ids for o in runs[2]] == [o.token_ids for o in runs[1]]
    gaps = [abs(y.logprob - x.logprob) for a, b in zip(runs[1], runs[2], strict=True)
            for x, y in zip(a.logprobs, b.logprobs, strict=True)]
    assert max(gaps) < 1e-2, gaps
    assert sum(gap < 1e-4 for gap in gaps) >= 0.9 * len(gaps), gaps


def _forked(engine: Engine, prompt: list[int]) -> dict[str, list[int]]:
    """A request forked after its first token (its 31-token prompt ends inside a block:
    the child's first write copies that block, on every rank); both run to the end."""
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    engine.add_request("parent", prompt, params)
    while not engine.scheduler.requests["parent"].output_token_ids:
        engine.step()
    assert engine.fork("parent", "child", params) is not None
    tokens: dict[str, list[int]] = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finish_reason is not None:
                tokens[out.request_id] = out.token_ids
    return tokens


# -- faults ----------------------------------------------------------------------------------
@pytest.mark.timeout(90)
def test_killing_rank_1_fails_requests_with_a_clear_error(model_dir):
    engine = _engine(model_dir("llama"), tp=2)
    try:
        params = SamplingParams(max_tokens=50, temperature=0.0, ignore_eos=True)
        for i, prompt in enumerate(_prompts(engine.model_config.vocab_size)[:4]):
            engine.add_request(f"r{i}", prompt, params)
        for _ in range(3):
            engine.step()
        rank1 = engine.runner.handles[0]
        os.kill(rank1.pid, signal.SIGKILL)
        rank1.join(10)
        # A cluster worker ends its process here (Engine.on_fatal), before any request
        # fails, so that the cluster moves them; told once, with the error, while the
        # requests are still unfinished.
        told = []
        engine.on_fatal = lambda e: told.append((e, engine.scheduler.num_running))
        t0 = time.monotonic()
        outs = engine.step()
        assert time.monotonic() - t0 < 10
        assert len(told) == 1 and told[0][1] == 4
        assert "tensor-parallel rank 1 of 2 was killed" in str(told[0][0])
        assert sorted(o.request_id for o in outs) == ["r0", "r1", "r2", "r3"]
        for out in outs:
            assert out.finish_reason == "error"
            assert "tensor-parallel rank 1 of 2 was killed (SIGKILL)" in out.error
            assert "restart" in out.error
        assert not engine.has_unfinished_requests()
        engine.check_integrity()
        assert engine.pool.num_free == engine.pool.num_blocks
        # The engine stays failed: a new request fails at once, it never waits on rank 1.
        engine.add_request("late", [5, 6, 7], params)
        late = engine.step()
        assert [o.finish_reason for o in late] == ["error"]
    finally:
        engine.close()


@pytest.mark.timeout(60)
def test_a_rank_that_stops_answering_fails_requests_after_the_timeout(model_dir):
    """SIGSTOP: rank 1 is alive but silent; the step gives up after ``timeout_s``, says so,
    and the silent rank is killed (it could not rejoin a group that moved on)."""
    engine = _engine(model_dir("llama"), tp=2, parallel={"timeout_s": 3})
    try:
        engine.add_request("r", [5, 6, 7], SamplingParams(max_tokens=20, ignore_eos=True))
        engine.step()
        time.sleep(4)  # idle for longer than the timeout: the ranks wait for work, unharmed
        assert engine.step()[0].error is None
        rank1 = engine.runner.handles[0]
        os.kill(rank1.pid, signal.SIGSTOP)
        t0 = time.monotonic()
        outs = engine.step()
        assert time.monotonic() - t0 < 10
        assert [o.finish_reason for o in outs] == ["error"]
        assert "a tensor-parallel rank of 2 did not answer within 3 s" in outs[0].error
        assert rank1.exitcode() == -signal.SIGKILL
    finally:
        engine.close()


@pytest.mark.timeout(60)
def test_a_sampling_error_is_not_fatal_and_close_stops_every_rank(model_dir):
    """An error after the step's last collective (in the sampler, on rank 0 only) leaves
    the ranks in step: it is raised as it is, and the next steps run."""
    engine = _engine(model_dir("llama"), tp=2)
    handles = list(engine.runner.handles)
    sampler = engine.runner.sampler

    def broken_sampler(logits, requests):
        engine.runner.sampler = sampler  # once
        raise RuntimeError("sampler bug")

    engine.runner.sampler = broken_sampler
    engine.add_request("r", [5, 6, 7], GREEDY)
    with pytest.raises(RuntimeError, match="sampler bug"):
        engine.step()
    assert engine.runner.error is None
    engine.abort("r")
    assert engine.generate([[5, 6, 7]], GREEDY)[0].finish_reason == "length"
    engine.close()
    engine.close()  # idempotent
    assert [h.exitcode() for h in handles] == [0]
