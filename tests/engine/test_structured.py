"""Structured outputs in the engine: JSON schemas, JSON objects, regexes, choices, grammars.

The model has random weights: left alone it never writes valid JSON (checked below), so an
output that parses and validates is the grammar's doing. Every request here is batched with
others (one bitmask per step), greedy and seeded-sampled both.
"""

from __future__ import annotations

import json
import pickle
import re

import jsonschema
import pytest

from engine import Engine, SamplingParams
from engine.errors import InvalidRequestError
from engine.structured import InvalidStructuredSpec, StructuredSpec

# Bounded strings and numbers: a random model would happily write digits forever, and the
# grammar must be able to complete within max_tokens (unbounded numbers: see below).
S = {"type": "string", "maxLength": 6}
N = {"type": "integer", "minimum": -500, "maximum": 500}
SCHEMAS = [
    {"type": "object", "properties": {"name": S, "age": {"type": "integer", "maximum": 150,
                                                         "minimum": 0}},
     "required": ["name", "age"]},
    {"type": "object", "properties": {"user": {"type": "object", "properties": {
        "id": {"type": "integer", "minimum": 1, "maximum": 999},
        "tags": {"type": "array", "items": S, "maxItems": 3}},
        "required": ["id", "tags"]}}, "required": ["user"]},
    {"type": "array", "items": {"type": "integer", "minimum": -5, "maximum": 5},
     "minItems": 1, "maxItems": 4},
    {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]},
                                      "size": {"enum": [1, 2, 3]}},
     "required": ["color", "size"]},
    {"type": "object", "properties": {"x": N, "y": N, "label": S}, "required": ["x", "y"]},
    {"type": "object", "properties": {"ok": {"type": "boolean"}, "none": {"type": "null"}},
     "required": ["ok", "none"]},
    {"type": "object", "properties": {"matrix": {"type": "array", "maxItems": 2, "items": {
        "type": "array", "items": N, "maxItems": 2}}},
     "required": ["matrix"]},
    {"type": "object", "properties": {"code": {"type": "string", "pattern": "^[A-Z]{2}[0-9]{3}$"},
                                      "note": S},
     "required": ["code"]},
    {"type": "object", "properties": {"v": {"anyOf": [N, S]}},
     "required": ["v"]},
    {"type": "object", "properties": {"items": {"type": "array", "maxItems": 2, "items": {
        "type": "object", "properties": {"sku": S, "qty": {"type": "integer", "minimum": 1,
                                                           "maximum": 99}},
        "required": ["sku", "qty"]}}, "total": N},
     "required": ["items", "total"]},
    {"type": "object", "properties": {"kind": {"const": "point"},
                                      "at": {"type": "array", "items": N,
                                             "minItems": 2, "maxItems": 2}},
     "required": ["kind", "at"]},
    {"enum": ["alpha", "beta", {"gamma": 1}]},
]
GREEDY = {"temperature": 0.0}
SEEDED = {"temperature": 1.0, "seed": 11}


def _params(structured: StructuredSpec | None = None, max_tokens: int = 120, **kw):
    return SamplingParams(max_tokens=max_tokens, structured=structured, **{**GREEDY, **kw})


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir):
    return tiny_model_dir("llama")


@pytest.fixture(scope="module")
def engine(model_dir):
    return Engine.from_pretrained(model_dir, block_size=4)


# -- the spec ---------------------------------------------------------------------------
@pytest.mark.parametrize("kind, spec, why", [
    ("json_schema", {"type": "bogus"}, "bogus"),
    ("json_schema", '{"type": "object",', "not valid JSON"),
    ("json_schema", {"properties": {"a": {"$ref": "#/nowhere"}}}, "nowhere"),
    ("regex", "(ab", "parenthesis"),
    ("grammar", "root ::= ", "EBNF"),
    ("choice", [], "non-empty"),
    ("choice", ["a", ""], "non-empty"),
    ("xml", "<a/>", "unknown kind"),
])
def test_an_invalid_spec_is_a_value_error_naming_the_field(kind, spec, why):
    with pytest.raises(InvalidStructuredSpec, match=re.escape(why)) as info:
        StructuredSpec(kind, spec)
    err = info.value
    assert isinstance(err, ValueError) and isinstance(err, InvalidRequestError)
    assert err.kind == kind and str(err).startswith(f"structured output {kind} is invalid")
    assert ".cc" not in str(err) and "/" not in err.reason.replace("#/nowhere", "")


def test_params_refuse_what_the_grammar_overrides():
    spec = StructuredSpec.regex("[ab]+")
    with pytest.raises(ValueError, match="SamplingParams.min_tokens"):
        SamplingParams(min_tokens=2, structured=spec)
    with pytest.raises(ValueError, match="SamplingParams.ignore_eos"):
        SamplingParams(ignore_eos=True, structured=spec)
    with pytest.raises(ValueError, match="SamplingParams.structured"):
        SamplingParams(structured={"regex": "a"})  # type: ignore[arg-type]


def test_spec_is_canonical_hashable_and_picklable():
    a = StructuredSpec.json_schema({"type": "object", "required": ["a"],
                                    "properties": {"a": {"type": "integer"}}})
    b = StructuredSpec("json_schema", '{"properties": {"a": {"type": "integer"}}, '
                                      '"required": ["a"], "type": "object"}')
    assert a == b and hash(a) == hash(b)
    params = SamplingParams(structured=StructuredSpec.choice(["x", "y"]))
    again = pickle.loads(pickle.dumps(params))
    assert again == params and hash(again) == hash(params)
    assert again.structured.spec == ("x", "y")


# -- colocated ------------------------------------------------------------------------------
def test_unconstrained_output_is_never_json(engine):
    """The sharpness of everything below: the model alone writes no JSON."""
    prompts = [f"schema {i}:" for i in range(len(SCHEMAS))]
    for sampling in (GREEDY, SEEDED):
        for out in engine.generate(prompts, _params(max_tokens=40, **sampling)):
            with pytest.raises(ValueError):
                json.loads(out.text)


@pytest.mark.parametrize("sampling", [GREEDY, SEEDED], ids=["greedy", "seeded"])
def test_json_schemas_hold(engine, sampling):
    prompts = [f"schema {i}:" for i in range(len(SCHEMAS))]
    params = [_params(StructuredSpec.json_schema(s), **sampling) for s in SCHEMAS]
    outs = engine.generate(prompts, params)
    for schema, out in zip(SCHEMAS, outs, strict=True):
        assert out.finish_reason == "stop", (schema, out.text)
        assert out.token_ids[-1] in engine.eos_token_ids  # EOS only once the JSON is complete
        jsonschema.validate(json.loads(out.text), schema)
    engine.check_integrity()


def test_an_unbounded_number_is_a_number_or_its_beginning(engine):
    """{"type": "number"} has no length bound: a random model may run out of tokens inside
    it; what it wrote is then the beginning of a JSON number (checked by a regex)."""
    outs = engine.generate([f"n{i}" for i in range(4)], [
        _params(StructuredSpec.json_schema({"type": "number"}), max_tokens=24, **sampling)
        for sampling in (GREEDY, SEEDED, {"temperature": 1.0, "seed": 5},
                         {"temperature": 0.7, "seed": 6})])
    for out in outs:
        if out.finish_reason == "stop":
            assert isinstance(json.loads(out.text), (int, float))
        else:
            assert out.finish_reason == "length"
            assert re.fullmatch(r"-?(0|[1-9]\d*)(\.\d*)?([eE][+-]?\d*)?", out.text), out.text


def test_json_object_regex_choice_and_grammar_hold(engine):
    cases = [
        (StructuredSpec.regex(r"[a-z]{2,5}-\d{2,3}"),
         lambda t: re.fullmatch(r"[a-z]{2,5}-\d{2,3}", t)),
        (StructuredSpec.choice(["yes", "no", "don't \"know\" \\ 😀\n"]),
         lambda t: t in ("yes", "no", "don't \"know\" \\ 😀\n")),
        (StructuredSpec.grammar('root ::= "(" [0-9]{1,3} (" + " [0-9]{1,3})* ")"'),
         lambda t: re.fullmatch(r"\(\d{1,3}( \+ \d{1,3})*\)", t)),
        (StructuredSpec.grammar('start: "x" NUM\nNUM: /[0-9]{1,3}/'),
         lambda t: re.fullmatch(r"x\d{1,3}", t)),
    ]
    for sampling in (GREEDY, SEEDED, {"temperature": 0.8, "top_k": 20},
                     {"temperature": 1.2, "top_p": 0.9, "min_p": 0.05, "seed": 4}):
        outs = engine.generate([f"case {i}" for i in range(len(cases))],
                               [_params(spec, **sampling) for spec, _ in cases])
        for (spec, holds), out in zip(cases, outs, strict=True):
            assert out.finish_reason == "stop" and holds(out.text), (spec, out.text)


_FILLERS = ("", "0", ":0", '"":0', "ue", "rue", "e", "alse", "lse", "se", "ull", "ll", "l")


def _object_prefix(text: str) -> bool:
    """True when some completion of ``text`` parses as a JSON object: close an open string
    (and escape), then try small fillers (a value, a key, the rest of a literal) before
    closing the open brackets. Independent of the grammar engine."""
    stack, in_string, escape = [], False, False
    for ch in text:
        if in_string:
            escape, in_string = (False, True) if escape else (ch == "\\", ch != '"')
        elif ch == '"':
            in_string = True
        elif ch in "{[":
            stack.append("}" if ch == "{" else "]")
        elif ch in "}]" and (not stack or stack.pop() != ch):
            return False
    tail = text
    if in_string:
        unicode = re.search(r"\\u[0-9a-fA-F]{0,3}$", text)
        tail += ("0" * (6 - len(unicode.group()))) if unicode else ("n" if escape else "")
        tail += '"'
    closers = "".join(reversed(stack))
    for filler in _FILLERS:
        try:
            if isinstance(json.loads(tail + filler + closers), dict):
                return True
        except ValueError:
            continue
    return False


@pytest.mark.parametrize("parser_name, written, content", [
    ("hermes", "Let me check. <tool_call>", "Let me check."),
    ("llama3", '{"name": ', ""),  # a Llama 3 call is the whole reply
])
def test_a_structural_tag_holds_what_follows_its_trigger(engine, parser_name, written,
                                                         content):
    """Strict tools under tool_choice "auto" (router.chat): free text, but once the output
    has the trigger, the call follows the function's schema, in the tool parser's format,
    and with one call at most the output ends after it. The trigger is put in the output
    by resuming a stream that wrote it (a random model would not write it by itself)."""
    from router.tool_parsers import get_parser

    schema = {"type": "object", "properties": {"city": S, "days": {
        "type": "integer", "minimum": 1, "maximum": 7}}, "required": ["city", "days"]}
    parser = get_parser(parser_name)
    spec = StructuredSpec.structural_tag(parser.structural_tag(
        [{"name": "get_weather", "parameters": schema, "strict": True}], max_calls=1))
    begun = engine.tokenizer.encode(written, add_special_tokens=False)
    for i, sampling in enumerate((GREEDY, SEEDED)):
        engine.add_request(f"tag-{i}", "Weather in Paris?", _params(spec, **sampling),
                           output_token_ids=begun)
        final = None
        while final is None:
            final = next((o for o in engine.step() if o.finished), None)
        text = engine.tokenizer.decode(final.token_ids)  # the resumed tokens included
        assert final.finish_reason == "stop", text
        got, calls = parser.parse(text)
        assert (got, [c.name for c in calls]) == (content, ["get_weather"]), text
        jsonschema.validate(json.loads(calls[0].arguments), schema)
    # free text is free: no trigger, no constraint (the random model's text, unchanged)
    free, plain = (engine.generate(["Weather?"], _params(s, max_tokens=12))[0]
                   for s in (spec, None))
    assert free.token_ids == plain.token_ids


def test_object_prefix_checker():
    for ok in ('{"a": [1, {"b": "x\\', '{"a": tr', '{"a": 1, ', '{"a', '{"a": "\\u00', "{"):
        assert _object_prefix(ok), ok
    for bad in ('{"a" 1', '[1', '{"a": 1}}', '{"a": tx', '{,'):
        assert not _object_prefix(bad), bad


def test_json_object_gives_an_object(engine):
    """An arbitrary object may be long (unbounded strings, which a random model fills
    freely): what finished parses as an object, what ran out of tokens is an object's
    beginning."""
    prompts = [f"object {i}" for i in range(8)]
    params = [_params(StructuredSpec.json_object(), max_tokens=150, temperature=1.0, seed=s)
              for s in range(len(prompts) - 1)]
    outs = engine.generate(prompts, params + [_params(StructuredSpec.json_object())])
    for out in outs:
        if out.finish_reason == "stop":
            assert isinstance(json.loads(out.text), dict)
        else:
            assert out.finish_reason == "length" and _object_prefix(out.text), out.text
    assert any(o.finish_reason == "stop" for o in outs)


def test_mixed_batch_and_bias_cannot_lift_a_banned_token(engine):
    """Constrained and unconstrained rows in one step; a +100 bias on a token the grammar
    forbids does not get it through (the mask comes after the bias)."""
    plain = engine.generate(["a", "b"], _params(max_tokens=12))
    banned = plain[0].token_ids[0]
    spec = StructuredSpec.choice(["yes", "no"])
    mixed = engine.generate(["a", "b", "c"], [
        _params(max_tokens=12),
        _params(spec, logit_bias={banned: 100}),
        _params(spec, temperature=1.0, seed=3, logit_bias={banned: 100}),
    ])
    assert mixed[0].token_ids == plain[0].token_ids
    assert all(o.text in ("yes", "no") for o in mixed[1:])


def test_compiled_grammars_are_cached_per_tokenizer_and_spec(engine, model_dir):
    backend = engine.grammar_backend()
    spec = StructuredSpec.regex("[0-9]{4}")
    engine.generate(["p"], _params(spec))
    compiled = backend.num_compiled
    engine.generate(["q", "r"], _params(spec))
    assert backend.num_compiled == compiled
    other = Engine.from_pretrained(model_dir, block_size=4, load_tokenizer=False)
    assert other.grammar_backend() is backend  # same model: same tokenizer info and cache
    assert backend.vocab_size == engine.model_config.vocab_size


@pytest.mark.parametrize("kind", ["json_schema", "structural_tag"])
def test_bounded_json_strings_allow_no_control_characters(engine, kind):
    """Regression: xgrammar writes minLength/maxLength strings with a character class that
    lets raw U+0000-U+001F through, which JSON forbids in strings (json.loads refuses);
    the same inside a strict tool call's structural tag (a random model wrote a \x0e)."""
    from router.tool_parsers import get_parser

    bounded = {"type": "string", "maxLength": 8}
    if kind == "json_schema":
        spec, written = StructuredSpec.json_schema(bounded), '"'
    else:
        schema = {"type": "object", "properties": {"city": bounded}, "required": ["city"]}
        spec = StructuredSpec.structural_tag(get_parser("llama3").structural_tag(
            [{"name": "f", "parameters": schema}], max_calls=1))
        written = '{"name": "f", "parameters": {"city": "'
    texts = _allowed_next(engine, spec, written)
    assert any(t.isalpha() for t in texts)  # ordinary characters still pass
    assert not [t for t in texts if any(ord(c) < 0x20 for c in t)]


def _allowed_next(engine, spec: StructuredSpec, written: str) -> list[str]:
    """The texts of the tokens ``spec``'s grammar allows once ``written`` is out."""
    import torch
    import xgrammar as xgr

    state = engine.grammar_backend().new_state(spec)
    for token in engine.tokenizer.encode(written, add_special_tokens=False):
        assert state.accept(token), written
    vocab = engine.model_config.vocab_size
    bitmask = xgr.allocate_token_bitmask(1, vocab)
    state.matcher.fill_next_token_bitmask(bitmask)
    bits = (bitmask[0].unsqueeze(1) >> torch.arange(32, dtype=torch.int32)) & 1
    allowed = bits.flatten()[:vocab].nonzero().flatten().tolist()
    return [engine.tokenizer.decode([t], skip_special_tokens=False) for t in allowed]


@pytest.mark.parametrize("parser_name", ["hermes", "llama3"])
def test_a_strict_tool_calls_json_allows_one_space_between_tokens(engine, parser_name):
    """A structural tag's JSON is written by xgrammar with any run of whitespace between
    tokens (a random model filled it with newlines and tabs; a model could stall in it):
    one space at most, as json.dumps or a compact writer puts there."""
    from router.tool_parsers import get_parser

    schema = {"type": "object", "properties": {"city": S}, "required": ["city"]}
    parser = get_parser(parser_name)
    tag = parser.structural_tag([{"name": "f", "parameters": schema}], max_calls=1)
    spec = StructuredSpec.structural_tag(tag)
    opening = tag["format"]["tags"][0]["begin"]
    after_key = _allowed_next(engine, spec, opening + '{"city"')
    assert ":" in after_key and " " in after_key
    after_space = _allowed_next(engine, spec, opening + '{"city" ')
    assert ":" in after_space
    assert not [t for t in after_space if t[:1].isspace()], after_space


def test_the_compiled_cache_is_a_bounded_lru(engine, monkeypatch):
    from engine.structured import grammar

    backend = grammar.GrammarBackend(engine.grammar_backend().tokenizer_info)
    specs = [StructuredSpec.regex(f"[0-9]{{{n}}}") for n in (1, 2, 3)]
    monkeypatch.setattr(grammar, "COMPILED_CACHE_SIZE", 2)
    for spec in specs[:2] + specs[:1] + specs[2:]:  # the first used again: the second goes
        backend.compile(spec.kind, spec.spec)
    assert backend.num_compiled == 3
    backend.compile(specs[0].kind, specs[0].spec)
    assert backend.num_compiled == 3
    backend.compile(specs[1].kind, specs[1].spec)
    assert backend.num_compiled == 4
    monkeypatch.setattr(grammar, "COMPILED_CACHE_BYTES", 1)  # only the newest one stays
    backend.compile(specs[2].kind, specs[2].spec)
    assert backend.num_compiled == 5 and len(backend._compiled) == 1
    backend.compile(specs[2].kind, specs[2].spec)
    assert backend.num_compiled == 5
    backend.compile(specs[0].kind, specs[0].spec)
    assert backend.num_compiled == 6
