"""logit_bias (+100 forces a token, -100 bans it; greedy and sampled, per row of a mixed
batch) and min_tokens (EOS and stop ids masked until min_tokens tokens are out)."""

from __future__ import annotations

import random

import pytest

from engine import Engine, SamplingParams
from engine.errors import InvalidRequestError

N = 10


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    return Engine.from_pretrained(tiny_model_dir("llama"), block_size=4, load_tokenizer=False)


@pytest.fixture(scope="module")
def prompts(engine):
    rng = random.Random(11)
    vocab = engine.model_config.vocab_size
    return [[rng.randrange(5, vocab) for _ in range(n)] for n in (7, 12, 21)]


def _params(kind: str, **kw) -> SamplingParams:
    sampling = {"greedy": {"temperature": 0.0},
                "seeded": {"temperature": 1.0, "seed": 7},
                "unseeded": {"temperature": 1.0, "top_k": 50}}[kind]
    return SamplingParams(max_tokens=N, ignore_eos=True, **sampling, **kw)


@pytest.mark.parametrize("kind", ["greedy", "seeded", "unseeded"])
def test_plus_100_forces_a_token(engine, prompts, kind):
    forced = 123
    outs = engine.generate(prompts, _params(kind, logit_bias={forced: 100}))
    assert all(o.token_ids == [forced] * N for o in outs)
    engine.check_integrity()


@pytest.mark.parametrize("kind", ["greedy", "seeded"])
def test_minus_100_bans_tokens(engine, prompts, kind):
    plain = engine.generate(prompts, _params(kind))
    banned = {t for o in plain for t in o.token_ids}
    outs = engine.generate(prompts, _params(kind, logit_bias={t: -100 for t in banned}))
    for o in outs:
        assert len(o.token_ids) == N and not banned & set(o.token_ids)


def test_bias_applies_to_its_own_row_only(engine, prompts):
    """One biased request in a batch: its neighbours decode as they do alone."""
    alone = [o.token_ids for o in engine.generate(prompts, _params("greedy"))]
    mixed = engine.generate(prompts, [_params("greedy"), _params("greedy", logit_bias={9: 100}),
                                      _params("seeded", logit_bias={"9": -100.0})])
    assert mixed[0].token_ids == alone[0]
    assert mixed[1].token_ids == [9] * N
    assert 9 not in mixed[2].token_ids


def test_bias_is_clamped_and_validated(engine, prompts):
    assert SamplingParams(logit_bias={4: 1e6, 2: -1e6}).logit_bias == ((2, -100.0), (4, 100.0))
    with pytest.raises(ValueError, match="logit_bias"):
        SamplingParams(logit_bias={"x": 1.0})
    with pytest.raises(ValueError, match="logit_bias"):
        SamplingParams(logit_bias={-1: 1.0})
    with pytest.raises(ValueError, match="logit_bias"):
        SamplingParams(logit_bias={3: float("inf")})
    vocab = engine.model_config.vocab_size
    with pytest.raises(InvalidRequestError, match="logit_bias"):
        engine.add_request("too-big", prompts[0], SamplingParams(logit_bias={vocab: 1.0}))
    assert not engine.has_unfinished_requests()


@pytest.mark.parametrize("kind", ["greedy", "seeded"])
def test_min_tokens_masks_eos_until_reached(engine, prompts, kind):
    """EOS pushed to +100: it cannot come before min_tokens, then it ends the request."""
    eos = engine.eos_token_ids[0]
    params = SamplingParams(max_tokens=N, min_tokens=4, logit_bias={eos: 100},
                            **({"temperature": 0.0} if kind == "greedy" else
                               {"temperature": 1.0, "seed": 3}))
    for out in engine.generate(prompts, params):
        assert eos not in out.token_ids[:4]
        assert out.token_ids[4] == eos and len(out.token_ids) == 5
        assert out.finish_reason == "stop"


def test_min_tokens_masks_stop_token_ids(engine, prompts):
    """A stop id the model would emit at index 1 is not emitted before min_tokens."""
    plain = engine.generate([prompts[0]], _params("greedy"))[0].token_ids
    stop = plain[1]
    assert stop not in plain[:1]
    out = engine.generate([prompts[0]], _params("greedy", min_tokens=4,
                                                 stop_token_ids=[stop]))[0]
    assert stop not in out.token_ids[:4]
    assert out.token_ids[:1] == plain[:1]
    # past min_tokens the stop id is allowed again and ends the request when sampled
    if stop in out.token_ids:
        assert out.token_ids[-1] == stop and out.finish_reason == "stop"
