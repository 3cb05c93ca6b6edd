"""top_k at or past the vocabulary keeps every token (no top-k), whatever its size: a client's
top_k of 2**63 (valid JSON, valid SamplingParams) made the sampler's tensor overflow, and
the engine step then failed every request of the batch, other clients' too."""

from __future__ import annotations

import pytest
import torch

from engine import Engine, SamplingParams
from engine.sampler import apply_top_k_top_p_min_p

N = 6


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    return Engine.from_pretrained(tiny_model_dir("llama"), block_size=4, load_tokenizer=False)


@pytest.mark.parametrize("top_k", [1000, 2**31, 2**63, 2**64, 10**30])
def test_a_top_k_past_the_vocabulary_masks_nothing(top_k):
    logits = torch.randn(3, 50)
    params = [SamplingParams(top_k=top_k), SamplingParams(top_k=5), SamplingParams()]
    out = apply_top_k_top_p_min_p(logits.clone(), params)
    assert torch.equal(out[0], logits[0]) and torch.equal(out[2], logits[2])
    assert int(torch.isfinite(out[1]).sum()) == 5  # its neighbour's top-k still applies


def test_a_huge_top_k_in_a_batch_fails_nobody(engine):
    vocab = engine.model_config.vocab_size
    prompts = [[(7 * i + j) % (vocab - 5) + 5 for j in range(9 + i)] for i in range(3)]
    seeded = dict(max_tokens=N, temperature=1.0, seed=5, ignore_eos=True)
    alone = [o.token_ids for o in engine.generate(prompts, SamplingParams(**seeded))]
    mixed = engine.generate(prompts, [SamplingParams(**seeded),
                                      SamplingParams(**seeded, top_k=2**63),
                                      SamplingParams(**seeded, top_k=vocab)])
    assert [o.finish_reason for o in mixed] == ["length"] * 3
    assert [o.token_ids for o in mixed] == alone  # top_k >= vocab: the same as no top_k
    engine.check_integrity()
