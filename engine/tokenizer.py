"""Tokenizer (text <-> token ids, chat template) and the streaming detokenizer with stop strings.

``Tokenizer`` is a thin wrapper over ``transformers.AutoTokenizer`` for a model directory; its
``decode`` is the one definition of "the text of these ids" that the detokenizer streams.

``IncrementalDetokenizer`` turns generated ids into text deltas, vLLM-style. It keeps two
offsets into its token list::

      ids:  [ ... emitted ... | prefix window | new, not yet emitted ]
                              ^prefix         ^read                  ^len(ids)

Each step decodes only ``ids[prefix:]`` and ``ids[prefix:read]`` (a few tokens); the delta is
what the longer text adds. The prefix window gives tokenizers that drop a leading space on the
first token (SentencePiece) the context they need. Text that ends in U+FFFD may be an
incomplete multi-byte character (a byte-level token can hold half an emoji), so it is held
until more tokens resolve it: every delta is then a prefix-extension of the final text, and the
concatenation of all deltas (after ``finish()``) equals ``Tokenizer.decode(all ids)``.

Stop strings are applied on top: text that could still be the start of a stop string is
withheld; once a stop string appears the text is cut before it (or after it with
``include_stop``), ``stopped`` / ``matched_stop`` are set and nothing more is emitted.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from engine.errors import InvalidRequestError

REPLACEMENT_CHAR = "\ufffd"
PROMPT_CONTEXT_TOKENS = 6
"""Prompt tokens kept as decoding context for the first generated tokens (leading spaces)."""


class Tokenizer:
    """A model directory's tokenizer. Loads transformers lazily (construction takes ~0.1 s)."""

    def __init__(self, model_dir: str | os.PathLike[str]) -> None:
        from transformers import AutoTokenizer

        self.model_dir = str(model_dir)
        self._hf = AutoTokenizer.from_pretrained(self.model_dir)
        # A copy of the Rust tokenizer, when there is one: decoding a few ids costs ~4 us
        # instead of ~14, and encoding releases the GIL. A copy of its own, with no
        # truncation or padding, whatever tokenizer.json sets: transformers turns those off
        # for each call it makes, and a prompt must never be cut short in silence.
        self._backend = _plain_copy(getattr(self._hf, "backend_tokenizer", None))
        self.eos_token_ids: list[int] = _eos_ids(self._hf, self.model_dir)
        """Ids that end generation: the tokenizer's eos plus generation_config.json's."""
        self._model_vocab = _model_vocab_size(self.model_dir)

    @property
    def vocab_size(self) -> int:
        """Number of token ids the model accepts: its embedding rows (config.json's
        ``vocab_size``), which is what the engine checks prompts against. Without a
        config.json (a bare tokenizer directory): the ids the tokenizer knows, added tokens
        included. The two differ both ways in real checkpoints (padded embeddings; tokens
        added to a tokenizer without resizing the model)."""
        return self._model_vocab if self._model_vocab is not None else len(self._hf)

    @property
    def bos_token_id(self) -> int | None:
        return self._hf.bos_token_id

    @property
    def eos_token_id(self) -> int | None:
        """The tokenizer's own eos (``eos_token_ids`` adds generation_config.json's)."""
        return self._hf.eos_token_id

    @property
    def pad_token_id(self) -> int | None:
        return self._hf.pad_token_id

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self._hf, "chat_template", None))

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text``; ``add_special_tokens`` adds bos where the model uses one.

        Special-token text in ``text`` ("<|im_end|>") is that special token, as transformers
        and vLLM encode a prompt: a prompt written in the model's chat format means it.
        Text that is not valid Unicode (a lone surrogate) raises ``InvalidRequestError``.
        Safe to call from several threads (the Rust tokenizer releases the GIL)."""
        try:
            if self._backend is not None:
                # encode_batch (not encode) releases the GIL for the whole encoding.
                return self._backend.encode_batch([text],
                                                  add_special_tokens=add_special_tokens)[0].ids
            return list(self._hf.encode(text, add_special_tokens=add_special_tokens))
        except TypeError as exc:  # how the Rust tokenizer refuses unencodable text
            _check_unicode(text)
            raise exc

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of ``ids``: no space clean-up, so decode(a + b) == decode(a) + decode(b) at
        character boundaries. Ids unknown to the tokenizer decode to nothing."""
        ids = list(ids)
        if self._backend is not None:
            return self._backend.decode(ids, skip_special_tokens=skip_special_tokens)
        return self._hf.decode(ids, skip_special_tokens=skip_special_tokens,
                               clean_up_tokenization_spaces=False)

    def chat_template_text(self, messages: list[dict[str, Any]],
                           add_generation_prompt: bool = True,
                           tools: list[dict[str, Any]] | None = None,
                           continue_final_message: bool = False,
                           template_kwargs: dict[str, Any] | None = None) -> str:
        """The prompt text the chat template renders for ``messages`` (role/content dicts)
        and, when given, the tool definitions (OpenAI's ``tools`` list).
        ``continue_final_message``: the text ends inside the last message (its turn left
        open, for the model to go on with it); ``template_kwargs``: more variables for the
        template (Qwen3's ``enable_thinking``), as transformers takes them."""
        if not self.has_chat_template:
            raise InvalidRequestError(
                "this model has no chat template; use completions instead"
            )
        return self._hf.apply_chat_template(
            messages, tools=tools or None, tokenize=False,
            add_generation_prompt=add_generation_prompt,
            continue_final_message=continue_final_message, **(template_kwargs or {}),
        )

    def apply_chat_template(self, messages: list[dict[str, Any]],
                            add_generation_prompt: bool = True,
                            tools: list[dict[str, Any]] | None = None,
                            continue_final_message: bool = False,
                            template_kwargs: dict[str, Any] | None = None) -> list[int]:
        """Prompt ids for a chat. The template writes bos itself where the model uses one, so
        the text is encoded without adding special tokens (as transformers does)."""
        text = self.chat_template_text(messages, add_generation_prompt, tools,
                                       continue_final_message, template_kwargs)
        return self.encode(text, add_special_tokens=False)

    def detokenizer(self, stop: Iterable[str] = (), *, prompt_ids: Sequence[int] = (),
                    skip_special_tokens: bool = True, include_stop: bool = False,
                    min_tokens: int = 0) -> IncrementalDetokenizer:
        return IncrementalDetokenizer(self, stop, prompt_ids=prompt_ids,
                                      skip_special_tokens=skip_special_tokens,
                                      include_stop=include_stop, min_tokens=min_tokens)


def _plain_copy(backend: Any) -> Any:
    if backend is None:
        return None
    from tokenizers import Tokenizer as RustTokenizer

    copy = RustTokenizer.from_str(backend.to_str())
    copy.no_truncation()
    copy.no_padding()
    return copy


def _check_unicode(text: str) -> None:
    """Raise ``InvalidRequestError`` if ``text`` cannot be encoded as UTF-8 (lone surrogate)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidRequestError(
            f"the text is not valid Unicode: it has a lone surrogate at character {exc.start} "
            "(send well-formed UTF-8)") from None


def _model_vocab_size(model_dir: str) -> int | None:
    """config.json's ``vocab_size`` (a multimodal config nests it in ``text_config``); None
    when the directory has no config.json or it names no size."""
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        return None
    raw = json.loads(path.read_text())
    size = raw.get("vocab_size") or (raw.get("text_config") or {}).get("vocab_size")
    return int(size) if size else None


def _eos_ids(hf: Any, model_dir: str) -> list[int]:
    from transformers import GenerationConfig

    ids = {hf.eos_token_id} if hf.eos_token_id is not None else set()
    try:
        gen = GenerationConfig.from_pretrained(model_dir)
    except OSError:  # no generation_config.json: the tokenizer's eos is all there is
        gen = None
    eos = getattr(gen, "eos_token_id", None)
    if isinstance(eos, int):
        ids.add(eos)
    elif eos:
        ids.update(int(i) for i in eos)
    return sorted(ids)


class IncrementalDetokenizer:
    """Streaming text for one request's generated ids (see the module docstring).

    ``append(ids)`` returns the new text (possibly ""), ``finish()`` returns what was held
    back at the end of generation (an unresolved partial character decodes to U+FFFD, a
    possible stop-string start is released). ``text`` is everything emitted so far.
    """

    # With more unemitted tokens than this and text still ending in U+FFFD, look for an earlier
    # exact split point (a U+FFFD that will never resolve: invalid bytes, a literal U+FFFD), so
    # the decode window stays a few tokens long even on garbage output.
    MAX_PENDING_TOKENS = 4

    def __init__(self, tokenizer: Tokenizer, stop: Iterable[str] = (), *,
                 prompt_ids: Sequence[int] = (), skip_special_tokens: bool = True,
                 include_stop: bool = False, min_tokens: int = 0) -> None:
        self._tok = tokenizer
        self._skip = skip_special_tokens
        self.stop_strings: tuple[str, ...] = tuple(s for s in stop if s)
        self.include_stop = include_stop
        # As vLLM: a stop string ends the output only once it is longer than min_tokens
        # tokens (one completed earlier is text; one begun earlier and completed later ends
        # it). Appending a token at a time makes the count exact.
        self.min_tokens = min_tokens
        self.text = ""
        """All text emitted so far."""
        self.stopped = False
        """A stop string appeared; nothing more will be emitted."""
        self.matched_stop: str | None = None
        self.num_tokens = 0
        """Generated ids appended so far (prompt context not counted)."""
        self._held = ""  # decoded text withheld: it may be the start of a stop string
        self._finished = False
        context = list(prompt_ids)[-PROMPT_CONTEXT_TOKENS:]
        if self._decode(context).endswith(REPLACEMENT_CHAR):
            context = []  # the prompt ends mid-character: decode the output on its own
        self._ids: list[int] = context
        self._prefix = 0
        self._read = len(context)

    def append(self, new_ids: Sequence[int]) -> str:
        """Add generated ids; return the text they complete (never a partial character)."""
        if self._finished:
            raise RuntimeError("IncrementalDetokenizer.append() after finish()")
        self.num_tokens += len(new_ids)
        if self.stopped:
            return ""
        self._ids.extend(new_ids)
        return self._apply_stops(self._decode_delta(final=False), final=False)

    def finish(self) -> str:
        """End of generation: return the held-back text. Call once."""
        if self._finished:
            raise RuntimeError("IncrementalDetokenizer.finish() called twice")
        self._finished = True
        if self.stopped:
            return ""
        return self._apply_stops(self._decode_delta(final=True), final=True)

    def _decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=self._skip)

    def _decode_delta(self, final: bool) -> str:
        prefix_text = self._decode(self._ids[self._prefix:self._read])
        new_text = self._decode(self._ids[self._prefix:])
        if new_text == prefix_text:
            # The ids since `read` add no text (skipped special tokens, unknown ids): they are
            # dropped before bytes are decoded anyway, so forget them and keep the window small.
            del self._ids[self._read:]
            return ""
        if final or not new_text.endswith(REPLACEMENT_CHAR):
            self._prefix, self._read = self._read, len(self._ids)
            return new_text[len(prefix_text):]
        if len(self._ids) - self._read > self.MAX_PENDING_TOKENS:
            return self._emit_before_unresolved_tail(prefix_text, new_text)
        return ""

    def _emit_before_unresolved_tail(self, prefix_text: str, new_text: str) -> str:
        """Emit up to the last split point ``k`` where decoding in two parts equals decoding
        at once and text follows ``k``: a character cut at ``k`` would decode differently in
        two parts, and one already broken by the bytes after ``k`` cannot change any more.
        (With no text after ``k`` — only skipped special tokens — later bytes could still
        complete it: skipped tokens are removed before bytes are decoded.)"""
        end = len(self._ids)
        for k in range(end - 1, max(self._read, end - self.MAX_PENDING_TOKENS - 1), -1):
            head, tail = self._decode(self._ids[self._prefix:k]), self._decode(self._ids[k:])
            if tail and head + tail == new_text and head.startswith(prefix_text):
                self._prefix, self._read = self._read, k
                return head[len(prefix_text):]
        return ""

    def _apply_stops(self, delta: str, final: bool) -> str:
        pending = self._held + delta
        self._held = ""
        if self.stop_strings:
            # The held text is a proper prefix of a stop string at most, so a stop found
            # now ends in what these tokens decoded to.
            too_early = self.num_tokens <= self.min_tokens
            hit = None if too_early else _earliest_stop(pending, self.stop_strings)
            if hit is not None:
                index, stop = hit
                self.stopped, self.matched_stop = True, stop
                pending = pending[: index + (len(stop) if self.include_stop else 0)]
            elif not final:
                hold = _stop_prefix_suffix_len(pending, self.stop_strings)
                pending, self._held = pending[: len(pending) - hold], pending[len(pending) - hold:]
        self.text += pending
        return pending


def _earliest_stop(text: str, stops: tuple[str, ...]) -> tuple[int, str] | None:
    """(index, stop) of the stop string occurring first in ``text`` (longest on a tie)."""
    best: tuple[int, str] | None = None
    for stop in stops:
        index = text.find(stop)
        if index >= 0 and (best is None or (index, -len(stop)) < (best[0], -len(best[1]))):
            best = (index, stop)
    return best


def _stop_prefix_suffix_len(text: str, stops: tuple[str, ...]) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of some stop string."""
    longest = 0
    for stop in stops:
        for size in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:size]):
                longest = size
                break
    return longest
