"""Structured outputs across engines: prefill-only + decode (reserve → KV copied →
activate), resumed with tokens already generated, preempted (recompute), a padded
vocabulary.

The grammar state must be advanced by every output token exactly once, the first token
(sampled on the prefill side) included, before the next token is masked. Seeded sampling
makes the stream a function of (seed, position), so each variant must give the colocated
run's tokens exactly; a state advanced too little or twice masks the wrong tokens and the
text changes (and stops being valid).
"""

from __future__ import annotations

import dataclasses
import json
import random
import shutil

import jsonschema
import pytest
from safetensors.torch import load_file, save_file

from engine import Engine, SamplingParams
from engine.errors import InvalidRequestError
from engine.structured import StructuredSpec
from tests.engine.factories import ship_kv

SCHEMA = {"type": "object", "properties": {
    "id": {"type": "integer", "minimum": 0, "maximum": 9999},
    "name": {"type": "string", "maxLength": 8},
    "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 3}},
    "required": ["id", "name", "tags"]}
JSON = SamplingParams(max_tokens=60, temperature=1.0, seed=21,
                      structured=StructuredSpec.json_schema(SCHEMA))
REGEX = SamplingParams(max_tokens=30, temperature=0.0,
                       structured=StructuredSpec.regex(r"[a-z]{3,6}( [a-z]{3,6}){2}"))


def _engine(model_dir, **kw) -> Engine:
    kw.setdefault("block_size", 4)
    return Engine.from_pretrained(model_dir, load_tokenizer=False, **kw)


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir):
    return tiny_model_dir("llama")


@pytest.fixture(scope="module")
def engines(model_dir):
    """(colocated, prefill-only, decode); like workers, none loads the Tokenizer wrapper."""
    return _engine(model_dir), _engine(model_dir), _engine(model_dir)


@pytest.fixture(scope="module")
def prompt(engines):
    rng = random.Random(8)
    return [rng.randrange(5, engines[0].model_config.vocab_size) for _ in range(11)]


@pytest.fixture(scope="module")
def expected(engines, prompt):
    """Colocated: the JSON and the regex request, run together."""
    outs = engines[0].generate([prompt, prompt], [JSON, REGEX])
    assert [o.finish_reason for o in outs] == ["stop", "stop"]
    return [o.token_ids for o in outs]


def _drain(engine: Engine, request_id: str) -> list[int]:
    new: list[int] = []
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.request_id == request_id:
                new += out.new_token_ids
    engine.check_integrity()
    return new


def _split(prefill: Engine, decode: Engine, request_id: str, prompt: list[int],
           params: SamplingParams, done: list[int] = ()) -> list[int]:
    """Prefill-only engine samples the first token (masked), its KV is copied into the
    decode engine's reserved blocks, the decode engine samples the rest."""
    prefill.add_request(request_id, prompt, params, prefill_only=True, output_token_ids=done)
    first = _drain(prefill, request_id)
    dst = decode.reserve(request_id, prompt, params, output_token_ids=done)
    ship_kv(prefill, decode, request_id, dst)
    final = decode.activate(request_id, first[0])
    return first if final is not None else first + _drain(decode, request_id)


def _text(engine: Engine, token_ids: list[int]) -> str:
    from engine.tokenizer import Tokenizer

    return Tokenizer(engine.model_dir).decode(token_ids)


def test_colocated_output_is_valid(engines, expected):
    jsonschema.validate(json.loads(_text(engines[0], expected[0])), SCHEMA)


@pytest.mark.parametrize("which", [0, 1], ids=["json-seeded", "regex-greedy"])
def test_disaggregated_equals_colocated(engines, prompt, expected, which):
    _, prefill, decode = engines
    params = (JSON, REGEX)[which]
    assert _split(prefill, decode, f"split-{which}", prompt, params) == expected[which]


@pytest.mark.parametrize("k", [1, 4, 9])
def test_resume_continues_the_constrained_stream(engines, prompt, expected, k):
    colocated, prefill, decode = engines
    done = expected[0][:k]
    colocated.add_request(f"local-{k}", prompt, JSON, output_token_ids=done)
    assert _drain(colocated, f"local-{k}") == expected[0][k:]
    assert _split(prefill, decode, f"resumed-{k}", prompt, JSON, done) == expected[0][k:]


def test_resume_with_tokens_outside_the_grammar_is_refused(engines, prompt, expected):
    colocated, _, decode = engines
    wrong = expected[1][:3]  # regex tokens are not the start of a JSON object
    for call in (lambda: colocated.add_request("bad", prompt, JSON, output_token_ids=wrong),
                 lambda: decode.reserve("bad", prompt, JSON, output_token_ids=wrong)):
        with pytest.raises(InvalidRequestError, match="do not follow the structured-output"):
            call()
    assert not colocated.has_unfinished_requests() and decode.scheduler.num_reserved == 0


def test_a_first_token_outside_the_grammar_ends_the_request_with_an_error(engines, prompt,
                                                                          expected):
    """A prefill side that sampled without the spec: the decode side refuses its token."""
    decode = engines[2]
    free = decode.pool.num_free
    assert decode.reserve("unmasked", prompt, JSON) is not None
    out = decode.activate("unmasked", expected[1][0])  # a letter, not "{"
    assert out is not None and out.finish_reason == "error"
    assert "does not follow the structured-output spec" in out.error
    assert decode.pool.num_free == free
    decode.check_integrity()


def test_preemption_does_not_advance_the_grammar_twice(model_dir, engines):
    vocab = engines[0].model_config.vocab_size
    rng = random.Random(4)
    prompts = [[rng.randrange(5, vocab) for _ in range(n)] for n in (9, 17, 23, 30, 11, 26)]
    params = [SamplingParams(max_tokens=60, temperature=0.9, top_k=50, seed=300 + i,
                             structured=StructuredSpec.json_schema(SCHEMA))
              for i in range(len(prompts))]
    alone = [engines[0].generate([p], sp)[0] for p, sp in zip(prompts, params, strict=True)]
    tight = _engine(model_dir, num_blocks=30, max_num_batched_tokens=32,
                    enable_prefix_caching=False)
    together = tight.generate(prompts, params)
    assert tight.scheduler.num_preemptions > 0
    assert [o.token_ids for o in together] == [o.token_ids for o in alone]
    for out in together:
        assert out.finish_reason == "stop"
        jsonschema.validate(json.loads(_text(tight, out.token_ids)), SCHEMA)
    tight.check_integrity()


@pytest.fixture(scope="module")
def padded_model_dir(model_dir, tmp_path_factory):
    """The tiny model with 16 embedding / lm_head rows past its tokenizer (1040 ids; the
    last bitmask word is half used), as real checkpoints pad their vocabulary."""
    out = tmp_path_factory.mktemp("padded") / "ckpt"
    shutil.copytree(model_dir, out)
    weights = load_file(out / "model.safetensors")
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        w = weights[name]
        weights[name] = w.new_zeros(w.shape[0] + 16, w.shape[1])
        weights[name][: w.shape[0]] = w
    save_file(weights, out / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((out / "config.json").read_text())
    config["vocab_size"] += 16
    (out / "config.json").write_text(json.dumps(config))
    return out


def test_the_mask_covers_the_model_vocabulary_not_the_tokenizer(padded_model_dir, prompt):
    """Ids past the tokenizer exist only in the logits: a +100 bias makes an unconstrained
    request pick one; the grammar (whose bitmask spans all 1040 logits) never allows it."""
    engine = _engine(padded_model_dir)
    assert engine.model_config.vocab_size == 1040
    padded = {t: 100.0 for t in range(1024, 1040)}
    plain = engine.generate([prompt], SamplingParams(max_tokens=5, logit_bias=padded,
                                                     ignore_eos=True))[0]
    assert all(t >= 1024 for t in plain.token_ids)
    for params in (JSON, REGEX):
        biased = dataclasses.replace(params, logit_bias=padded)
        out = engine.generate([prompt], biased)[0]
        assert out.finish_reason == "stop" and max(out.token_ids) < 1024
    assert engine.grammar_backend().vocab_size == 1040


def test_forked_siblings_each_follow_the_grammar(engines, prompt):
    """n > 1 on the decode side: each sibling gets its own grammar state (from the start of
    the output) and gives what its seed gives alone."""
    colocated, prefill, decode = engines
    seeds = (21, 22, 23)
    alone = [colocated.generate([prompt], dataclasses.replace(JSON, seed=s))[0].token_ids
             for s in seeds]
    prefill.add_request("n3", prompt, JSON, prefill_only=True)
    first = _drain(prefill, "n3")
    dst = decode.reserve("n3", prompt, JSON)
    ship_kv(prefill, decode, "n3", dst)
    assert decode.activate("n3", first[0]) is None
    for i, seed in enumerate(seeds[1:], 1):
        assert decode.fork("n3", f"n3-{i}", dataclasses.replace(JSON, seed=seed)) is not None
    tokens: dict[str, list[int]] = {}
    while decode.has_unfinished_requests():
        for out in decode.step():
            tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
    decode.check_integrity()
    assert [first + tokens["n3"], tokens["n3-1"], tokens["n3-2"]] == alone
    for ids in alone:
        jsonschema.validate(json.loads(_text(decode, ids)), SCHEMA)


@pytest.mark.gpu
def test_cuda_masks_on_the_device(model_dir, prompt):
    """On CUDA the bitmask is filled on the host and applied by xgrammar's GPU kernel."""
    engine = _engine(model_dir, device="cuda")
    outs = engine.generate([prompt, prompt], [JSON, REGEX])
    assert [o.finish_reason for o in outs] == ["stop", "stop"]
    jsonschema.validate(json.loads(_text(engine, outs[0].token_ids)), SCHEMA)
