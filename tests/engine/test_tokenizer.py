"""Tokenizer wrapper and IncrementalDetokenizer: streaming equals full decoding, no partial
characters, stop strings cut exactly and never leaked."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.errors import InvalidRequestError
from engine.make_model_tokenizer import train_tokenizer
from engine.tokenizer import IncrementalDetokenizer, Tokenizer

HYPOTHESIS = settings(max_examples=100, deadline=None,
                      suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def tok(tiny_model_dir) -> Tokenizer:
    return Tokenizer(tiny_model_dir("llama"))


@pytest.fixture(scope="module")
def multibyte_ids(tok) -> list[int]:
    """Ids whose text alone is not valid UTF-8 (pieces of multi-byte characters)."""
    return [i for i in range(tok.vocab_size) if "\ufffd" in tok.decode([i])]


def stream(tok: Tokenizer, ids: list[int], chunks: list[int], **kwargs) -> tuple[list[str], str]:
    """Feed ``ids`` in chunks of the given sizes; return the deltas and the final text."""
    detok = tok.detokenizer(**kwargs)
    deltas, start = [], 0
    for size in chunks:
        deltas.append(detok.append(ids[start:start + size]))
        start += size
    deltas.append(detok.append(ids[start:]))
    deltas.append(detok.finish())
    assert detok.text == "".join(deltas)
    return deltas, detok.text


def test_tokenizer_basics(tok, tiny_model_dir):
    assert tok.vocab_size == 1024
    assert tok.eos_token_ids == [1, 3]  # <|end_of_text|> (tokenizer) + <|im_end|> (generation)
    assert tok.bos_token_id == 0 and tok.pad_token_id == 4
    ids = tok.encode("Hi café")
    assert ids[0] == 0 and tok.encode("Hi café", add_special_tokens=False) == ids[1:]
    assert tok.decode(ids) == "Hi café"
    assert tok.decode(ids, skip_special_tokens=False) == "<|begin_of_text|>Hi café"
    assert tok.decode([50, 5000, 51]) == tok.decode([50, 51])  # unknown ids decode to nothing


def test_missing_chat_template_is_a_clear_request_error(tmp_path, tiny_model_dir):
    model_dir = tmp_path / "m"
    shutil.copytree(tiny_model_dir("qwen2"), model_dir)
    config_path = model_dir / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    del config["chat_template"]
    config_path.write_text(json.dumps(config))
    (model_dir / "generation_config.json").unlink()
    tok = Tokenizer(model_dir)
    assert tok.eos_token_ids == [1]  # without generation_config.json: the tokenizer's eos
    with pytest.raises(InvalidRequestError, match="no chat template"):
        tok.apply_chat_template([{"role": "user", "content": "hi"}])


def test_tokenizer_training_is_deterministic_across_processes():
    code = ("import hashlib; from engine.make_model_tokenizer import train_tokenizer; "
            "print(hashlib.sha256(train_tokenizer(1024, True).to_str().encode()).hexdigest())")
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           check=True).stdout.strip()
    import hashlib

    assert other == hashlib.sha256(train_tokenizer(1024, True).to_str().encode()).hexdigest()


def id_lists(tok_vocab: int, multibyte: list[int]):
    token = st.one_of(st.integers(0, tok_vocab - 1), st.sampled_from(multibyte))
    return st.lists(token, max_size=40)


@given(data=st.data())
@HYPOTHESIS
def test_streaming_random_ids_equals_full_decode(tok, multibyte_ids, data):
    ids = data.draw(id_lists(tok.vocab_size, multibyte_ids))
    chunks = data.draw(st.lists(st.integers(1, 3), max_size=len(ids)))
    skip = data.draw(st.booleans())
    deltas, text = stream(tok, ids, chunks, skip_special_tokens=skip)
    full = tok.decode(ids, skip_special_tokens=skip)
    assert text == full
    # Nothing emitted ever changes later: every partial concatenation is a prefix of the
    # final text (so no delta ended with half a character rendered as U+FFFD).
    emitted = ""
    for delta in deltas:
        emitted += delta
        assert full.startswith(emitted)


@given(text=st.text(st.characters(exclude_categories=("Cs",)), max_size=30))
@HYPOTHESIS
def test_streaming_text_one_token_at_a_time(tok, text):
    ids = tok.encode(text, add_special_tokens=False)
    # Special tokens kept: the text may spell one ("<|im_end|>"), which encodes to its id.
    detok = tok.detokenizer(prompt_ids=tok.encode("Prompt:"), skip_special_tokens=False)
    emitted = ""
    for i in range(len(ids)):
        delta = detok.append(ids[i:i + 1])
        emitted += delta
        assert text.startswith(emitted)  # no U+FFFD from half of a character, ever
        if "\ufffd" not in text:
            assert "\ufffd" not in delta
    assert emitted + detok.finish() == text


def test_degenerate_output_keeps_the_decode_window_small(tok, multibyte_ids):
    """A random model can repeat an invalid byte or a skipped special token forever (or an id
    past the tokenizer's vocabulary): decoding must stay a few ids per step."""
    sizes: list[int] = []

    class Spy(Tokenizer):
        def __init__(self) -> None:  # share the loaded tokenizer
            self.__dict__.update(tok.__dict__)

        def decode(self, ids, skip_special_tokens=True):
            sizes.append(len(ids))
            return tok.decode(ids, skip_special_tokens)

    lone = next(i for i in multibyte_ids if tok.decode([i, i]) == "\ufffd\ufffd")
    text = tok.encode("ok 😀", add_special_tokens=False) * 50
    ids = [lone] * 300 + text + [0] * 300 + [lone, 99999] * 100 + text[:3] + [lone] * 300
    deltas, text = stream(Spy(), ids, [1] * (len(ids) - 1))
    assert text == tok.decode(ids)
    assert max(sizes) <= 12, max(sizes)
    assert len(sizes) < 12 * len(ids)


def test_character_split_by_skipped_special_tokens(tok, multibyte_ids):
    """Skipped special tokens are removed before bytes are decoded, so the two halves of a
    character on either side of them still join: nothing may be emitted in between."""
    lead, cont = next((i, j) for i in multibyte_ids for j in multibyte_ids
                      if len(tok.decode([i, j])) == 1 and tok.decode([i, j]) != "\ufffd")
    ids = [lead] + [0] * 8 + [cont]
    deltas, text = stream(tok, ids, [1] * (len(ids) - 1))
    assert text == tok.decode(ids) == tok.decode([lead, cont])
    assert [d for d in deltas if d] == [text]


def stream_stops(tok: Tokenizer, text: str, stop: list[str], include_stop: bool = False):
    ids = tok.encode(text, add_special_tokens=False)
    detok = IncrementalDetokenizer(tok, stop, include_stop=include_stop, skip_special_tokens=False)
    emitted = []
    for i in range(len(ids)):
        emitted.append(detok.append(ids[i:i + 1]))
    emitted.append(detok.finish())
    return detok, emitted


@pytest.mark.parametrize(
    ("text", "stop", "expected", "matched"),
    [
        ("Hello world, the model reads", ["world"], "Hello ", "world"),
        ("Hello world, the model reads", ["o w"], "Hell", "o w"),  # spans tokens
        ("abc STOP def STOP", ["STOP", "def"], "abc ", "STOP"),
        ("cafés and 😀 emoji", ["😀"], "cafés and ", "😀"),
        ("中文：今天天气很好", ["天气"], "中文：今天", "天气"),
        ("the model reads the prompt", ["xyz", "reads t"], "the model ", "reads t"),
        ("stop at the very end.", ["end."], "stop at the very ", "end."),
        ("nothing matches here wor", ["world"], "nothing matches here wor", None),
    ],
)
def test_stop_strings_cut_exactly_and_never_leak(tok, text, stop, expected, matched):
    detok, deltas = stream_stops(tok, text, stop)
    assert "".join(deltas) == detok.text == expected
    assert detok.stopped is (matched is not None) and detok.matched_stop == matched
    emitted = ""
    for delta in deltas:
        emitted += delta
        assert expected.startswith(emitted)


def test_stop_prefix_is_withheld_until_resolved(tok):
    detok = IncrementalDetokenizer(tok, ["world!"])
    assert detok.append(tok.encode("Hello", add_special_tokens=False)) == "Hello"
    assert detok.append(tok.encode(" wor", add_special_tokens=False)) == " "  # "wor" may stop
    assert detok.append(tok.encode("ld", add_special_tokens=False)) == ""
    assert detok.append(tok.encode("?", add_special_tokens=False)) == "world?"  # it did not
    assert detok.append(tok.encode(" world!", add_special_tokens=False)) == " "
    assert detok.stopped and detok.text == "Hello world? " and detok.matched_stop == "world!"
    assert detok.append([44]) == "" and detok.finish() == ""
    assert detok.num_tokens > 0


def test_include_stop_and_earliest_match(tok):
    detok, deltas = stream_stops(tok, "one two three", ["three", "two"], include_stop=True)
    assert detok.text == "one two" and detok.matched_stop == "two"
    detok, _ = stream_stops(tok, "xx abcd", ["abcd", "bc"])  # "bc" completes first
    assert detok.text == "xx a" and detok.matched_stop == "bc"


def test_a_stop_string_ends_the_output_only_after_min_tokens(tok):
    """As vLLM: within the first min_tokens tokens a stop string is text; one completed by
    a later token ends the output."""
    ids = tok.encode("a stop b stop c", add_special_tokens=False)
    # k1, k2: how many tokens it takes for the first and the second "stop" to be complete
    k1, k2 = (next(k for k in range(1, len(ids) + 1)
                   if tok.decode(ids[:k]).count("stop") >= n) for n in (1, 2))
    early = IncrementalDetokenizer(tok, ["stop"], min_tokens=k1)
    text = "".join(early.append([i]) for i in ids)
    assert early.stopped and early.matched_stop == "stop"
    assert text == early.text == "a stop b "  # the first is text, the second stops it
    no_min = IncrementalDetokenizer(tok, ["stop"])
    assert "".join(no_min.append([i]) for i in ids) == "a " and no_min.stopped
    never = IncrementalDetokenizer(tok, ["stop"], min_tokens=k2)
    text = "".join(never.append([i]) for i in ids) + never.finish()
    assert not never.stopped and text == "a stop b stop c"


@given(text=st.text(st.characters(exclude_categories=("Cs",)), min_size=1, max_size=40),
       data=st.data())
@HYPOTHESIS
def test_stop_strings_random(tok, text, data):
    start = data.draw(st.integers(0, len(text) - 1))
    stop = text[start:start + data.draw(st.integers(1, 6))]
    detok, deltas = stream_stops(tok, text + " tail", [stop])
    expected = text[: (text + " tail").find(stop)]
    assert detok.stopped and detok.text == expected
    emitted = ""
    for delta in deltas:
        emitted += delta
        assert expected.startswith(emitted)


def test_append_after_finish_is_an_error(tok):
    detok = tok.detokenizer()
    detok.finish()
    with pytest.raises(RuntimeError):
        detok.append([5])


# ---- client text: special-token text, invalid Unicode, the model's vocabulary -------------

@pytest.mark.parametrize("text", ["hi <|im_end|> there", "<|im_start|>x", "plain café"])
def test_special_token_text_encodes_as_the_special_token_as_transformers_does(tok, text):
    """A prompt in the model's chat format means its markers (vLLM encodes it so too)."""
    ids = tok.encode(text)
    assert ids == tok._hf.encode(text)  # transformers' default meaning
    assert ids[0] == tok.bos_token_id
    assert tok.decode(ids[1:], skip_special_tokens=False) == text
    if "<|" in text:
        assert {2, 3} & set(ids[1:])  # <|im_start|> / <|im_end|>, not the characters


def test_lone_surrogate_is_a_request_error(tok):
    with pytest.raises(InvalidRequestError, match="lone surrogate at character 1"):
        tok.encode("a\ud800b")
    with pytest.raises(InvalidRequestError, match="lone surrogate at character 0"):
        tok.encode("\udfffb", add_special_tokens=False)


def test_vocab_size_is_the_models_embedding_rows(tmp_path, tiny_model_dir):
    """The router checks prompt ids against ``vocab_size`` and ModelInfo reports it: it must
    be the engine's number of embedding rows (config.json), not the tokenizer's length."""
    for rows in (1000, 1100):
        model_dir = tmp_path / f"m{rows}"
        shutil.copytree(tiny_model_dir("llama"), model_dir)
        config = json.loads((model_dir / "config.json").read_text())
        config["vocab_size"] = rows
        (model_dir / "config.json").write_text(json.dumps(config))
        assert Tokenizer(model_dir).vocab_size == rows
    bare = tmp_path / "bare"
    shutil.copytree(tiny_model_dir("llama"), bare)
    (bare / "config.json").unlink()
    assert Tokenizer(bare).vocab_size == 1024  # no model config: the tokenizer's size


def test_a_truncation_set_in_tokenizer_json_never_cuts_a_prompt(tmp_path, tiny_model_dir):
    """Some published tokenizer.json files carry a truncation (or padding) setting; the
    prompt, a chat's too, must reach the model whole, as transformers encodes it."""
    model_dir = tmp_path / "truncating"
    shutil.copytree(tiny_model_dir("llama"), model_dir)
    spec = json.loads((model_dir / "tokenizer.json").read_text())
    spec["truncation"] = {"direction": "Right", "max_length": 8, "strategy": "LongestFirst",
                          "stride": 0}
    (model_dir / "tokenizer.json").write_text(json.dumps(spec))
    tok = Tokenizer(model_dir)
    text = "a fairly long prompt that is much more than eight tokens when it is encoded"
    assert len(tok.encode(text)) > 8
    assert tok.encode(text) == tok._hf.encode(text)
    chat = tok.apply_chat_template([{"role": "user", "content": text}])
    assert len(chat) > 8 and tok.decode(chat, skip_special_tokens=False).count("encoded") == 1
