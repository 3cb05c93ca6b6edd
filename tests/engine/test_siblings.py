"""n > 1 declared up front (``siblings=`` on ``add_request`` / ``reserve``): the engine forks
the siblings as soon as the prompt is computed — before the first token may finish the
parent — so they share the prompt's blocks and each equals its seed run alone, even when
the first token ends the parent (max_tokens=1, or a stop token)."""

from __future__ import annotations

import random

import pytest

from engine import Engine, SamplingParams
from tests.engine.factories import ship_kv

BS = 4
N = 4


def _params(seed: int, max_tokens: int = 9) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=1.0, top_k=100, seed=seed,
                          ignore_eos=True)


@pytest.fixture(scope="module")
def engines(tiny_model_dir):
    make = lambda: Engine.from_pretrained(tiny_model_dir("llama"), block_size=BS,  # noqa: E731
                                          load_tokenizer=False, enable_prefix_caching=False)
    return make(), make()


def _prompt(n: int) -> list[int]:
    rng = random.Random(n)
    return [rng.randrange(5, 1000) for _ in range(n)]


def _drain(engine: Engine) -> dict[str, list[int]]:
    tokens: dict[str, list[int]] = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
        engine.check_integrity()
    return tokens


def _siblings(parent: str, seed: int, max_tokens: int) -> list[tuple[str, SamplingParams]]:
    return [(f"{parent}/{i}", _params(seed + i, max_tokens)) for i in range(1, N)]


@pytest.mark.parametrize("max_tokens", [9, 1])
def test_colocated_siblings_share_the_prompt_and_equal_their_seeds_alone(engines, max_tokens):
    engine = engines[0]
    prompt = _prompt(14)
    alone = [engine.generate([prompt], _params(30 + i, max_tokens))[0].token_ids
             for i in range(N)]
    engine.add_request("p", prompt, _params(30, max_tokens),
                       siblings=_siblings("p", 30, max_tokens))
    first = _drain_one_step(engine)
    # The prompt's 4 blocks are held once: the parent and its 3 siblings share them (one
    # copy-on-write block each for the partial last block).
    held = engine.pool.num_used
    assert held <= 4 + (N - 1) + 1, held
    tokens = _drain(engine)
    for rid, new in first.items():
        tokens[rid] = new + tokens.get(rid, [])
    assert [tokens["p"], *(tokens[f"p/{i}"] for i in range(1, N))] == alone
    assert engine.pool.num_free == engine.pool.num_blocks


def _drain_one_step(engine: Engine) -> dict[str, list[int]]:
    return {out.request_id: list(out.new_token_ids) for out in engine.step()}


@pytest.mark.parametrize("max_tokens", [9, 1])
def test_decode_side_siblings_fork_at_activate(engines, max_tokens):
    """The prompt is prefilled once and its KV shipped once; the decode engine forks."""
    prefill, decode = engines
    prompt = _prompt(18)
    alone = [prefill.generate([prompt], _params(7 + i, max_tokens))[0].token_ids
             for i in range(N)]
    prefill.add_request("d", prompt, _params(7, max_tokens), prefill_only=True)
    first = prefill.step()[0].new_token_ids
    dst = decode.reserve("d", prompt, _params(7, max_tokens),
                         siblings=_siblings("d", 7, max_tokens))
    ship_kv(prefill, decode, "d", dst)
    final = decode.activate("d", first[0])
    assert (final is not None) == (max_tokens == 1)  # the first token may end the parent
    tokens = _drain(decode)
    tokens["d"] = first + tokens.get("d", [])
    assert [tokens["d"], *(tokens[f"d/{i}"] for i in range(1, N))] == alone
    assert decode.pool.num_free == decode.pool.num_blocks
