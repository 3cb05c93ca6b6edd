"""Any SamplingParams that validation accepts, however extreme, runs, and never changes what
another request of the same batch generates (hypothesis over every field's valid range:
a client's top_k of 2**63 used to fail the whole batch's step)."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine import Engine, SamplingParams

PLAIN = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
VOCAB_PROMPT = [5, 17, 9, 33, 2, 41, 8]
OTHER_PROMPT = [12, 7, 19, 3, 28]


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    return Engine.from_pretrained(tiny_model_dir("llama"), block_size=4, load_tokenizer=False)


@pytest.fixture(scope="module")
def plain_alone(engine):
    return engine.generate([VOCAB_PROMPT], PLAIN)[0].token_ids


def _extremes(lo: float, hi: float, *, lo_open: bool = False) -> st.SearchStrategy[float]:
    inner = st.floats(lo, hi, exclude_min=lo_open, allow_nan=False)
    edges = [hi, 1e-300 if lo_open else lo]
    return st.one_of(st.sampled_from(edges), inner)


@st.composite
def sampling_params(draw, vocab: int) -> SamplingParams:
    max_tokens = draw(st.integers(1, 4))
    token = st.integers(0, vocab - 1)
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=draw(st.one_of(st.just(0.0), _extremes(0.0, 100.0, lo_open=True))),
        top_p=draw(_extremes(0.0, 1.0, lo_open=True)),
        top_k=draw(st.one_of(st.sampled_from([-1, 0, 1, vocab, 2**63, 10**30]),
                             st.integers(1, vocab + 5))),
        min_p=draw(_extremes(0.0, 1.0)),
        presence_penalty=draw(_extremes(-2.0, 2.0)),
        frequency_penalty=draw(_extremes(-2.0, 2.0)),
        repetition_penalty=draw(_extremes(0.0, 10.0, lo_open=True)),
        logprobs=draw(st.one_of(st.none(), st.integers(0, 20))),
        prompt_logprobs=draw(st.one_of(st.none(), st.integers(0, 20))),
        min_tokens=draw(st.integers(0, max_tokens)),
        stop_token_ids=draw(st.lists(st.one_of(token, st.integers(vocab, 2**70)), max_size=3)),
        seed=draw(st.one_of(st.none(), st.integers(0, 2**63 - 1))),
        logit_bias=draw(st.dictionaries(token, st.floats(-1e6, 1e6, allow_nan=False),
                                        max_size=4)),
        ignore_eos=draw(st.booleans()),
    )


@pytest.mark.timeout(180)
def test_any_valid_sampling_params_run_and_leave_their_neighbour_alone(engine, plain_alone):
    vocab = engine.model_config.vocab_size

    @given(params=sampling_params(vocab))
    @settings(max_examples=80, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    def run(params):
        plain, fuzzed = engine.generate([VOCAB_PROMPT, OTHER_PROMPT], [PLAIN, params])
        assert plain.token_ids == plain_alone
        assert fuzzed.finish_reason in ("length", "stop"), fuzzed
        assert 1 <= len(fuzzed.token_ids) <= params.max_tokens
        assert all(0 <= t < vocab for t in fuzzed.token_ids)
        assert not engine.has_unfinished_requests()

    run()
    engine.check_integrity()
