"""Prompt logprobs (``SamplingParams.prompt_logprobs``) equal transformers' log-softmax over
the same random-weight model in float32 (to 1e-4): in one chunk or chunked, alone or
batched with other requests, with the prefix cache on (such a request bypasses it), after
preemption (no position twice), and refused under tensor parallelism."""

from __future__ import annotations

import pytest
import torch

from engine import Engine, SamplingParams, model_runner
from engine.errors import InvalidRequestError

K = 3
PROMPT = [7, 91, 33, 250, 12, 5, 61, 61, 200, 17, 44, 3, 98, 140, 9, 27, 77, 31, 8]


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir):
    return tiny_model_dir("llama")


@pytest.fixture(scope="module")
def expected(model_dir):
    """transformers' log-softmax of the logits before each prompt token (position 1 on)."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.inference_mode():
        logits = hf(torch.tensor([PROMPT])).logits[0, :-1].float()
    return torch.log_softmax(logits, dim=-1)


def _engine(model_dir, **kw) -> Engine:
    kw.setdefault("block_size", 4)
    return Engine.from_pretrained(model_dir, dtype="float32", device="cpu",
                                  load_tokenizer=False, **kw)


def _check(prompt_logprobs, ref: torch.Tensor, k: int = K) -> None:
    assert prompt_logprobs is not None and len(prompt_logprobs) == len(PROMPT)
    assert prompt_logprobs[0] is None
    targets = torch.tensor(PROMPT[1:])
    want = ref.gather(1, targets.unsqueeze(1)).squeeze(1)
    got = torch.tensor([e.logprob for e in prompt_logprobs[1:]])
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
    want_rank = (ref > want.unsqueeze(1)).sum(1) + 1
    assert [e.rank for e in prompt_logprobs[1:]] == want_rank.tolist()
    vals, ids = ref.topk(k, dim=-1)
    for entry, want_ids, want_vals in zip(prompt_logprobs[1:], ids, vals, strict=True):
        assert [t for t, _ in entry.top] == want_ids.tolist()
        torch.testing.assert_close(torch.tensor([v for _, v in entry.top]), want_vals,
                                   atol=1e-4, rtol=0)


@pytest.mark.parametrize("chunk,rows", [(512, 512), (512, 4), (5, 512), (1, 512)])
def test_prompt_logprobs_match_transformers(model_dir, expected, chunk, rows, monkeypatch):
    """One chunk, chunked prefill, and the runner's row slices (``rows`` at a time)."""
    monkeypatch.setattr(model_runner, "PROMPT_LOGPROBS_ROWS", rows)
    engine = _engine(model_dir, max_num_batched_tokens=chunk)
    params = SamplingParams(max_tokens=2, temperature=0.0, prompt_logprobs=K)
    [out] = engine.generate([PROMPT], params)
    _check(out.prompt_logprobs, expected)
    engine.check_integrity()


def test_batched_with_others_and_first_output_only(model_dir, expected):
    """Other requests (with and without prompt logprobs) in the same steps change nothing;
    the streamed outputs carry the prompt logprobs on the first one only."""
    engine = _engine(model_dir, max_num_batched_tokens=16)
    engine.add_request("other", [5, 6, 7, 8, 9, 10, 11], SamplingParams(max_tokens=4))
    engine.add_request("zero", PROMPT, SamplingParams(max_tokens=3, prompt_logprobs=0))
    engine.add_request("want", PROMPT, SamplingParams(max_tokens=3, prompt_logprobs=K))
    seen: dict[str, list] = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            seen.setdefault(out.request_id, []).append(out.prompt_logprobs)
    _check(seen["want"][0], expected)
    assert all(lp is None for lp in seen["want"][1:])
    _check(seen["zero"][0], expected, k=0)
    assert all(lp is None for lp in seen["other"])
    engine.check_integrity()


def test_prefix_cache_is_bypassed(model_dir, expected):
    engine = _engine(model_dir, enable_prefix_caching=True)
    engine.generate([PROMPT], SamplingParams(max_tokens=1))  # its full blocks are cached now
    [hit] = engine.generate([PROMPT], SamplingParams(max_tokens=1))
    assert hit.num_cached_tokens > 0
    [out] = engine.generate([PROMPT], SamplingParams(max_tokens=1, prompt_logprobs=K))
    assert out.num_cached_tokens == 0
    _check(out.prompt_logprobs, expected)


def test_preemption_does_not_repeat_positions(model_dir, expected):
    """Too few blocks for both: one is preempted mid-prompt and recomputes it."""
    engine = _engine(model_dir, num_blocks=8, max_num_batched_tokens=4,
                     enable_prefix_caching=False)
    params = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True, prompt_logprobs=K)
    outs = engine.generate([PROMPT, PROMPT], params)
    assert engine.scheduler.num_preemptions > 0
    for out in outs:
        _check(out.prompt_logprobs, expected)


def test_validation_names_the_field():
    with pytest.raises(ValueError, match="prompt_logprobs"):
        SamplingParams(prompt_logprobs=21)
    with pytest.raises(ValueError, match="prompt_logprobs"):
        SamplingParams(prompt_logprobs=-1)


def test_refused_by_a_tensor_parallel_engine(model_dir):
    engine = _engine(model_dir, tensor_parallel_size=2)
    try:
        with pytest.raises(InvalidRequestError, match="tensor_parallel_size"):
            engine.add_request("r", PROMPT, SamplingParams(prompt_logprobs=0))
        [out] = engine.generate([PROMPT], SamplingParams(max_tokens=2))  # it goes on serving
        assert len(out.token_ids) == 2
    finally:
        engine.close()
