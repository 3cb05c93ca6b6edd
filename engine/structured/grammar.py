"""The grammar engine (xgrammar) behind structured outputs: grammars, compilers, matchers.

Three levels, each built once and reused:
  ``build_grammar(kind, spec)``  tokenizer-independent grammar (validation; LRU per spec)
  ``GrammarBackend``             one per tokenizer (model dir, logits width, stop ids): the
                                 tokenizer's byte table, a compiler, an LRU of compiled grammars
                                 per spec (so the cache is keyed by (tokenizer, spec))
  ``GrammarState``               one per request: a matcher advanced by every output token

The bitmask width is the model's logits width (its embedding rows, config.json's
``vocab_size``), which may exceed the tokenizer's size: ids past the tokenizer are never
allowed.
"""

from __future__ import annotations

import json
import os
import re
import threading
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from functools import lru_cache

import xgrammar as xgr

from engine.errors import InvalidRequestError
from engine.structured.spec import StructuredSpec

COMPILED_CACHE_SIZE = 256
"""Compiled grammars kept per tokenizer (least recently used dropped first)..."""
COMPILED_CACHE_BYTES = 256 << 20
"""... and at most this much memory of them (a grammar's token-mask cache grows with the
vocabulary: a JSON schema over a 150k vocabulary can take megabytes)."""

# xgrammar prefixes C++ errors with "[hh:mm:ss] /path/file.cc:123: ": not for clients.
_LOG_PREFIX = re.compile(r"^\s*\[[0-9:]+\]\s*\S+:\d+:\s*")


def clean_error(error: Exception) -> str:
    """The grammar engine's message without its source path and line (safe for a client)."""
    text = str(error).strip()
    text = _LOG_PREFIX.sub("", text.splitlines()[0] if text else "")
    return text or type(error).__name__


def choice_ebnf(choices: Iterable[str]) -> str:
    """EBNF matching exactly one of ``choices`` (JSON string escapes are EBNF escapes)."""
    return "root ::= " + " | ".join(json.dumps(c, ensure_ascii=False) for c in choices)


# xgrammar (0.2.9) writes a string with minLength / maxLength as characters of
# [^"\\\r\n]: raw control characters (U+0000-U+001F) pass, which JSON forbids in strings
# (json.loads and JSON.parse refuse them). Its unbounded strings use the right class. The
# JSON schemas inside a structural tag (strict tool calls) are written the same way.
_LOOSE_STRING_CHAR = r'[^\"\\\r\n]'
_JSON_STRING_CHAR = r'[^\0-\x1f\"\\]'
# A structural tag's JSON also allows any run of whitespace between tokens (it has no
# any_whitespace option): a model could stall in it, and a random one fills it. At most
# one space there keeps the text one that json.dumps (``", "``/``": "``) or a compact
# writer gives.
_ANY_WHITESPACE = r'[ \n\r\t]*'
_ONE_SPACE = r'[ ]?'


def _json_grammar(schema: str, strict: bool) -> xgr.Grammar:
    return _json_strings(xgr.Grammar.from_json_schema(schema, any_whitespace=False,
                                                      strict_mode=strict))


def _json_strings(grammar: xgr.Grammar) -> xgr.Grammar:
    """``grammar`` with its bounded JSON strings refusing control characters."""
    text = str(grammar)
    if _LOOSE_STRING_CHAR not in text:
        return grammar
    return xgr.Grammar.from_ebnf(text.replace(_LOOSE_STRING_CHAR, _JSON_STRING_CHAR))


@lru_cache(maxsize=256)
def build_grammar(kind: str, spec: str | tuple[str, ...]) -> xgr.Grammar:
    """The tokenizer-independent grammar of a (normalised) spec; raises on an invalid one."""
    if kind == "json_object":
        return _json_grammar('{"type":"object"}', strict=False)
    if kind == "json_schema":
        return _json_grammar(spec, strict=True)  # type: ignore[arg-type]
    if kind == "regex":
        return xgr.Grammar.from_regex(spec)
    if kind == "choice":
        return xgr.Grammar.from_ebnf(choice_ebnf(spec))
    if kind == "grammar":
        return xgr.Grammar.from_ebnf(spec) if "::=" in spec else xgr.Grammar.from_lark(spec)
    if kind == "structural_tag":
        tag = str(_json_strings(xgr.Grammar.from_structural_tag(spec)))
        return xgr.Grammar.from_ebnf(tag.replace(_ANY_WHITESPACE, _ONE_SPACE))
    raise ValueError(f"unknown structured-output kind {kind!r}")


class GrammarState:
    """A request's position in its grammar. ``accept`` each output token in order; the
    sampler masks the next token from ``matcher`` (one bitmask row: ``masking.py``)."""

    __slots__ = ("matcher", "error")

    def __init__(self, compiled: xgr.CompiledGrammar) -> None:
        self.matcher = xgr.GrammarMatcher(compiled)
        self.error: str | None = None  # set once a token was refused; nothing is accepted after

    def accept(self, token_id: int) -> bool:
        """Advance by one output token. False (and ``error`` set) when the grammar refuses it:
        a token that was not masked (e.g. generated elsewhere without the grammar)."""
        if self.error is not None:
            return False
        if self.matcher.is_terminated() or not self.matcher.accept_token(token_id):
            self.error = (f"token {token_id} does not follow the structured-output spec (it "
                          "was generated without the spec); retry the request")
            return False
        return True

    def advance(self, token_ids: Iterable[int]) -> bool:
        """Accept tokens generated before this engine saw the request (a resume)."""
        return all(self.accept(t) for t in token_ids)

    @property
    def is_terminated(self) -> bool:
        """The grammar is complete and its stop token was accepted: the output is done."""
        return self.matcher.is_terminated()


class GrammarBackend:
    """Compiles specs for one tokenizer and hands out per-request states."""

    def __init__(self, tokenizer_info: xgr.TokenizerInfo) -> None:
        self.tokenizer_info = tokenizer_info
        threads = max(1, min(8, os.cpu_count() or 1))
        # Our own LRU holds what is compiled; xgrammar's unbounded cache would duplicate it.
        self.compiler = xgr.GrammarCompiler(tokenizer_info, max_threads=threads,
                                            cache_enabled=False)
        self._compiled: OrderedDict[tuple, xgr.CompiledGrammar] = OrderedDict()
        self._compiled_bytes = 0
        self._lock = threading.Lock()
        self.num_compiled = 0  # compilations done (cache misses): tests and stats

    @property
    def vocab_size(self) -> int:
        return self.tokenizer_info.vocab_size

    def compile(self, kind: str, spec: str | tuple[str, ...]) -> xgr.CompiledGrammar:
        key = (kind, spec)
        with self._lock:
            compiled = self._compiled.get(key)
            if compiled is not None:
                self._compiled.move_to_end(key)
                return compiled
        compiled = self.compiler.compile_grammar(build_grammar(kind, spec))
        with self._lock:
            self.num_compiled += 1
            if key not in self._compiled:  # (another thread may have compiled it meanwhile)
                self._compiled[key] = compiled
                self._compiled_bytes += compiled.memory_size_bytes
            while len(self._compiled) > 1 and (len(self._compiled) > COMPILED_CACHE_SIZE
                                               or self._compiled_bytes > COMPILED_CACHE_BYTES):
                _, dropped = self._compiled.popitem(last=False)
                self._compiled_bytes -= dropped.memory_size_bytes
        return compiled

    def new_state(self, spec: StructuredSpec, generated: Sequence[int] = ()) -> GrammarState:
        """A request's state, advanced by the tokens it has already generated (a resume)."""
        state = GrammarState(self.compile(spec.kind, spec.spec))
        if not state.advance(generated):
            raise InvalidRequestError(
                "output_token_ids do not follow the structured-output spec: resume only a "
                "stream that was generated with the same spec")
        return state


@lru_cache(maxsize=8)
def backend_for(model_dir: str, vocab_size: int, stop_token_ids: tuple[int, ...]) -> GrammarBackend:
    """The process's backend for a model's tokenizer (engines of one model share it: e.g. a
    prefill and a decode engine in one process). Loads the Hugging Face tokenizer from
    ``model_dir`` itself, so an engine built with ``load_tokenizer=False`` (workers that get
    token ids) can still constrain its output. ``vocab_size``: the logits width."""
    from transformers import AutoTokenizer

    try:
        hf = AutoTokenizer.from_pretrained(model_dir)
    except (OSError, ValueError):
        raise InvalidRequestError(
            "structured output needs the model's tokenizer and this model directory has "
            "none; send the request without a structured-output spec") from None
    info = xgr.TokenizerInfo.from_huggingface(
        hf, vocab_size=vocab_size, stop_token_ids=list(stop_token_ids) or None)
    return GrammarBackend(info)
