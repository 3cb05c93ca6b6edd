"""A seeded request's random stream is a function of (seed, output position) only.

So a seeded request with temperature > 0 gives the same tokens run colocated, split between
a prefill-only engine and a decode engine (``reserve`` → KV copied → ``activate``), after
preemption, and resumed from its prompt plus k tokens already generated (locally or split).
Unseeded requests stay random.
"""

from __future__ import annotations

import random

import pytest
import torch

from engine import Engine, SamplingParams
from engine.errors import InvalidRequestError
from engine.sampler import column_keys, seeded_exponentials
from tests.engine.factories import ship_kv

MAX_TOKENS = 12
SEEDED = SamplingParams(max_tokens=MAX_TOKENS, temperature=1.0, top_p=0.95, seed=1234,
                        ignore_eos=True)

# -- the hash against plain Python integers ----------------------------------------------------
M64, M32 = (1 << 64) - 1, (1 << 32) - 1


def _splitmix64(x: int) -> int:
    z = (x + 0x9E3779B97F4A7C15) & M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
    return z ^ (z >> 31)


def _lowbias32(x: int) -> int:
    x = ((x ^ (x >> 16)) * 0x7FEB352D) & M32
    x = ((x ^ (x >> 15)) * 0x846CA68B) & M32
    return x ^ (x >> 16)


def _reference_exponential(seed: int, position: int, token: int) -> float:
    key = _splitmix64(_splitmix64(seed) ^ position)
    lo, hi = key & M32, key >> 32
    h = _lowbias32(_lowbias32((token * 0x9E3779B9 + lo) & M32) ^ hi)
    u = torch.tensor(((h >> 9) + 0.5) / (1 << 23), dtype=torch.float32)
    return float(-torch.log(u))


def test_noise_equals_a_plain_python_splitmix64():
    """int64 tensor arithmetic must wrap like uint64 (and the shifts be logical)."""
    seeds, positions = [0, 1234, 2**63 - 1, 99], [0, 7, 3, 100_000]
    q = seeded_exponentials(seeds, positions, column_keys(300))
    for row, (seed, pos) in enumerate(zip(seeds, positions, strict=True)):
        for token in (0, 1, 17, 200, 299):
            assert q[row, token].item() == pytest.approx(
                _reference_exponential(seed, pos, token), rel=1e-6)


def test_noise_depends_only_on_seed_and_position():
    cols = column_keys(1000)
    a = seeded_exponentials([5, 6, 5], [0, 0, 1], cols)
    b = seeded_exponentials([5, 9], [1, 0], cols)
    assert torch.equal(a[2], b[0])  # same (seed, position), another row and batch
    assert not torch.equal(a[0], a[2]) and not torch.equal(a[0], a[1])
    assert (a > 0).all() and torch.isfinite(a).all()
    # Exp(1): mean and variance 1 (2,000 draws per row: loose bounds)
    big = seeded_exponentials([1, 2], [0, 0], column_keys(2000))
    assert big.mean().item() == pytest.approx(1.0, abs=0.1)
    assert big.var().item() == pytest.approx(1.0, abs=0.2)


def test_the_race_draws_from_p_and_positions_are_uncorrelated():
    """argmax(p / q) over many output positions of one seed has p's frequencies."""
    p = torch.tensor([0.1, 0.2, 0.3, 0.4])
    n = 20_000
    q = seeded_exponentials([42] * n, list(range(n)), column_keys(4))
    counts = torch.bincount((p / q).argmax(dim=-1), minlength=4).float() / n
    assert torch.allclose(counts, p, atol=0.015), counts
    u = torch.exp(-seeded_exponentials([42] * n, list(range(n)), column_keys(2)))
    for a, b in ((u[:-1, 0], u[1:, 0]), (u[:, 0], u[:, 1])):  # next position, next token
        assert abs(torch.corrcoef(torch.stack([a, b]))[0, 1].item()) < 0.03


# -- the engine ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def model_dir(tiny_model_dir):
    return tiny_model_dir("llama")


def _engine(model_dir, **kw) -> Engine:
    kw.setdefault("block_size", 4)
    return Engine.from_pretrained(model_dir, dtype="float32", device="cpu",
                                  load_tokenizer=False, **kw)


@pytest.fixture(scope="module")
def engines(model_dir):
    """(colocated, prefill-only, decode) engines, shared by the tests of this module."""
    return _engine(model_dir), _engine(model_dir), _engine(model_dir)


@pytest.fixture(scope="module")
def prompt(engines):
    rng = random.Random(3)
    return [rng.randrange(5, engines[0].model_config.vocab_size) for _ in range(13)]


@pytest.fixture(scope="module")
def expected(engines, prompt):
    """The seeded request run alone, colocated."""
    return engines[0].generate([prompt], SEEDED)[0].token_ids


def _drain(engine: Engine, request_id: str) -> list[int]:
    """Step until ``request_id`` finishes; the new tokens it reported, in order."""
    new: list[int] = []
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.request_id == request_id:
                new += out.new_token_ids
    engine.check_integrity()
    return new


def _split(prefill: Engine, decode: Engine, request_id: str, prompt: list[int],
           params: SamplingParams, done: list[int] = ()) -> list[int]:
    """Disaggregated, in process: prefill-only engine samples the first token, its KV is
    copied into the decode engine's reserved blocks, the decode engine samples the rest.
    ``done``: tokens already generated (a resume). Returns the tokens generated here."""
    prefill.add_request(request_id, prompt, params, prefill_only=True, output_token_ids=done)
    first = _drain(prefill, request_id)
    assert len(first) == 1
    dst = decode.reserve(request_id, prompt, params, output_token_ids=done)
    ship_kv(prefill, decode, request_id, dst)
    prefill.check_integrity()
    final = decode.activate(request_id, first[0])
    if final is not None:  # the first token ended it (max_tokens reached)
        assert final.finish_reason == "length" and final.new_token_ids == []
        return first
    return first + _drain(decode, request_id)


def test_disaggregated_equals_colocated(engines, prompt, expected):
    _, prefill, decode = engines
    assert _split(prefill, decode, "split", prompt, SEEDED) == expected


@pytest.mark.parametrize("k", [1, 5, MAX_TOKENS - 1])
def test_resume_from_generated_tokens_continues_the_stream(engines, prompt, expected, k):
    colocated, prefill, decode = engines
    # Locally prefilled: prompt + k tokens re-prefilled, the stream goes on from index k.
    request = colocated.add_request(f"local-{k}", prompt, SEEDED, output_token_ids=expected[:k])
    assert request.num_output_tokens == k
    assert _drain(colocated, f"local-{k}") == expected[k:]
    # Split: the prefill worker samples token k, the decode worker the rest.
    assert _split(prefill, decode, f"split-{k}", prompt, SEEDED, expected[:k]) == expected[k:]


def test_resume_outputs_report_only_new_tokens(engines, prompt, expected):
    colocated = engines[0]
    colocated.add_request("report", prompt, SEEDED, output_token_ids=expected[:4])
    outs = []
    while colocated.has_unfinished_requests():
        outs += colocated.step()
    assert [t for o in outs for t in o.new_token_ids] == expected[4:]
    assert outs[-1].token_ids == expected and outs[-1].finish_reason == "length"


def test_resume_is_validated(engines, prompt):
    colocated = engines[0]
    with pytest.raises(InvalidRequestError, match="nothing is left to generate"):
        colocated.add_request("full", prompt, SEEDED, output_token_ids=[5] * MAX_TOKENS)
    with pytest.raises(InvalidRequestError, match="output_token_ids must be in"):
        colocated.reserve("bad", prompt, SEEDED, output_token_ids=[10**6])
    assert not colocated.has_unfinished_requests()


def test_preemption_keeps_the_seeded_stream(model_dir, engines):
    vocab = engines[0].model_config.vocab_size
    rng = random.Random(5)
    prompts = [[rng.randrange(5, vocab) for _ in range(n)] for n in (9, 17, 23, 30, 11, 26)]
    params = [SamplingParams(max_tokens=16, temperature=0.9, top_k=40, seed=100 + i,
                             ignore_eos=True) for i in range(len(prompts))]
    alone = [engines[0].generate([p], sp)[0].token_ids
             for p, sp in zip(prompts, params, strict=True)]
    tight = _engine(model_dir, num_blocks=24, max_num_batched_tokens=32,
                    enable_prefix_caching=False)
    together = tight.generate(prompts, params)
    assert tight.scheduler.num_preemptions > 0
    assert [o.token_ids for o in together] == alone
    tight.check_integrity()


def test_batch_position_and_neighbours_do_not_matter(engines, prompt, expected):
    """Other seeded requests at other output positions and unseeded ones share the steps."""
    colocated = engines[0]
    vocab = colocated.model_config.vocab_size
    others = [[(t * 7 + i) % vocab for t in prompt[: 3 + i]] for i in range(4)]
    params = [SamplingParams(max_tokens=MAX_TOKENS + i, temperature=0.7, seed=i,
                             ignore_eos=True) if i % 2 else
              SamplingParams(max_tokens=5, temperature=1.0, ignore_eos=True) for i in range(4)]
    outs = colocated.generate(others[:2] + [prompt] + others[2:],
                              params[:2] + [SEEDED] + params[2:])
    assert outs[2].token_ids == expected


def test_unseeded_requests_stay_random(engines, prompt):
    unseeded = SamplingParams(max_tokens=MAX_TOKENS, temperature=1.0, ignore_eos=True)
    first, second = engines[0].generate([prompt, prompt], unseeded)
    assert first.token_ids != second.token_ids
