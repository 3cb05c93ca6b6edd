"""n > 1 inside one engine: ``Engine.fork`` starts siblings that share the prompt's KV
blocks (copy-on-write of the block they first write) and each give what the same request
run alone with their own seed gives — colocated, and on a decode engine right after
``activate`` (the disaggregated flow: the prompt's KV arrives once)."""

from __future__ import annotations

import random

import pytest

from engine import Engine, SamplingParams
from engine.kv_cache_manager import cdiv
from tests.engine.factories import ship_kv

BS = 4
N = 4


def _params(seed: int) -> SamplingParams:
    return SamplingParams(max_tokens=9, temperature=1.0, top_k=100, seed=seed, ignore_eos=True)


@pytest.fixture(scope="module")
def engines(tiny_model_dir):
    make = lambda: Engine.from_pretrained(tiny_model_dir("llama"), block_size=BS,  # noqa: E731
                                          load_tokenizer=False, enable_prefix_caching=False)
    return make(), make()


def _prompt(engine: Engine, n: int) -> list[int]:
    rng = random.Random(n)
    return [rng.randrange(5, engine.model_config.vocab_size) for _ in range(n)]


def _drain(engine: Engine) -> dict[str, list[int]]:
    tokens: dict[str, list[int]] = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
        engine.check_integrity()
    return tokens


def _fork_siblings(engine: Engine, parent: str, seed: int) -> None:
    for i in range(1, N):
        assert engine.fork(parent, f"{parent}-{i}", _params(seed + i)) is not None


@pytest.mark.parametrize("prompt_len", [14, 13, 1])  # a copy-on-write, none, nothing shared
def test_forked_siblings_equal_their_seeds_run_alone(engines, prompt_len):
    engine = engines[0]
    prompt = _prompt(engine, prompt_len)
    alone = [engine.generate([prompt], _params(50 + i))[0].token_ids for i in range(N)]
    engine.add_request("p", prompt, _params(50))
    first = engine.step()  # the prompt is prefilled: its KV is computed
    used = engine.pool.num_used
    _fork_siblings(engine, "p", 50)
    copies = 1 if prompt_len % BS > 1 else 0  # the child writes into a shared block
    if prompt_len > 1:  # the prompt's blocks are held once, plus one copy per sibling
        assert engine.pool.num_used == used + (N - 1) * copies
        assert engine.pool.ref_count(engine.scheduler.requests["p"].block_ids[0]) == N
    tokens = _drain(engine)
    assert first[0].new_token_ids + tokens["p"] == alone[0]
    assert [tokens[f"p-{i}"] for i in range(1, N)] == alone[1:]
    assert engine.pool.num_free == engine.pool.num_blocks


def test_fork_on_the_decode_side_after_activate(engines):
    """The prompt is prefilled once, its KV shipped once, and forked on the decode side."""
    prefill, decode = engines
    prompt = _prompt(prefill, 18)
    alone = [prefill.generate([prompt], _params(7 + i))[0].token_ids for i in range(N)]
    prefill.add_request("d", prompt, _params(7), prefill_only=True)
    first = prefill.step()[0].new_token_ids
    dst = decode.reserve("d", prompt, _params(7))
    ship_kv(prefill, decode, "d", dst)
    assert decode.activate("d", first[0]) is None
    _fork_siblings(decode, "d", 7)
    # 5 prompt blocks held once; the siblings copied block 4 (positions 16-17) to write 17
    assert decode.pool.num_used == cdiv(18, BS) + (N - 1)
    tokens = _drain(decode)
    assert first + tokens["d"] == alone[0]
    assert [tokens[f"d-{i}"] for i in range(1, N)] == alone[1:]
    assert decode.pool.num_free == decode.pool.num_blocks


def test_aborting_one_sibling_keeps_the_others(engines):
    engine = engines[0]
    prompt = _prompt(engine, 10)
    alone = [engine.generate([prompt], _params(20 + i))[0].token_ids for i in range(N)]
    engine.add_request("a", prompt, _params(20))
    engine.step()
    _fork_siblings(engine, "a", 20)
    got = {out.request_id: out.new_token_ids for out in engine.step()}
    assert engine.abort("a").finish_reason == "abort"
    assert engine.abort("a-2").finish_reason == "abort"
    for rid, new in _drain(engine).items():
        got[rid] += new
    assert (got["a-1"], got["a-3"]) == (alone[1], alone[3])
    assert got["a-2"] == alone[2][:1]  # one token, then aborted
    assert engine.pool.num_free == engine.pool.num_blocks


def test_fork_refuses_what_it_cannot_do(engines):
    engine = engines[0]
    prompt = _prompt(engine, 10)
    engine.add_request("w", prompt, _params(1))
    with pytest.raises(ValueError, match="no computed prompt"):
        engine.fork("w", "w-1", _params(2))  # still waiting: nothing computed yet
    engine.step()
    with pytest.raises(ValueError, match="already in use"):
        engine.fork("w", "w", _params(2))
    engine.abort("w")
    assert engine.pool.num_free == engine.pool.num_blocks
