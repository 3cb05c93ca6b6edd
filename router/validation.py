"""Request validation and tokenization: ``GenerateInput`` -> ``PreparedRequest``.

Every refusal is an ``InvalidParamError`` whose message says what is wrong and whose
``param`` names the field as the client spelled it (OpenAI's error ``param``).

Two steps, so that no client field can cost other requests anything: ``check_input`` bounds
every client-supplied field (request id length and charset, text that is valid Unicode,
prompt size) in time proportional to the request's size, on the event loop;
``tokenize_prompt`` is the expensive part, which the service runs off the loop for large
prompts. Special-token text in a text prompt is the special token, as vLLM reads it.
"""

from __future__ import annotations

import json
import re
from dataclasses import fields

from engine.sampling_params import SamplingParams
from router.chat import render_chat
from router.config import RouterConfig
from router.errors import InvalidParamError
from router.types import GenerateInput, PreparedRequest

_SAMPLING_FIELDS = frozenset(f.name for f in fields(SamplingParams))

MAX_REQUEST_ID_LEN = 128
"""Longest client request id. Ids travel to the workers and in every KV transfer header, and
appear in logs and metrics' exemplars: they must be short and printable."""
REQUEST_ID_CHARS = "letters, digits and - _ . : @ = +"
_REQUEST_ID = re.compile(r"[A-Za-z0-9_.:@=+-]+")
MAX_STOP_STRINGS = 16  # OpenAI accepts 4
MAX_STOP_CHARS = 256
MAX_STOP_TOKEN_IDS = 64
MAX_SAMPLES = 16
"""Most samples (``n``) of one prompt: they are decoded side by side in one worker."""


def check_request_id(request_id: str) -> None:
    """Refuse a client request id that is too long or has other characters (400)."""
    if len(request_id) > MAX_REQUEST_ID_LEN or not _REQUEST_ID.fullmatch(request_id):
        raise InvalidParamError(
            f"request_id must be 1 to {MAX_REQUEST_ID_LEN} characters of {REQUEST_ID_CHARS} "
            f"(got {len(request_id)} characters); send another id, or none to have the server "
            "choose one", "request_id")


def check_input(inp: GenerateInput, config: RouterConfig) -> None:
    """Bound and check every client-supplied field before any expensive work."""
    if not isinstance(inp.n, int) or isinstance(inp.n, bool) or not 1 <= inp.n <= MAX_SAMPLES:
        raise InvalidParamError(f"n={inp.n!r} must be an integer in [1, {MAX_SAMPLES}]", "n")
    if inp.request_id:
        check_request_id(inp.request_id)
    check_text(inp.model, "model")
    if inp.prompt is not None:
        check_text(inp.prompt, "prompt")
        _check_prompt_chars(len(inp.prompt), "prompt", config)
    if inp.prompt_token_ids is not None and len(inp.prompt_token_ids) >= config.max_model_len:
        raise InvalidParamError(
            f"the prompt is {len(inp.prompt_token_ids)} tokens, which leaves no room to generate "
            f"in the model's context of {config.max_model_len} tokens; shorten it", "prompt")
    if inp.messages is not None:
        for message in inp.messages:
            for key, value in message.items():
                if isinstance(value, str):
                    check_text(value, "messages")
                check_text(str(key), "messages")
        _check_prompt_chars(_chat_chars(inp), "messages", config)
    _check_stops(inp)


def _check_stops(inp: GenerateInput) -> None:
    """Stop strings are matched against every generated token on the event loop, and stop
    token ids travel to the workers and are looked up each step: both are bounded."""
    stop = inp.sampling.get("stop") or ()
    stops = (stop,) if isinstance(stop, str) else tuple(stop)
    param = inp.param_aliases.get("stop", "stop")
    if len(stops) > MAX_STOP_STRINGS:
        raise InvalidParamError(f"{param} has {len(stops)} strings; at most "
                                f"{MAX_STOP_STRINGS} are accepted", param)
    for value in stops:
        if isinstance(value, str):
            check_text(value, param)
            if len(value) > MAX_STOP_CHARS:
                raise InvalidParamError(f"a {param} string is {len(value)} characters; at most "
                                        f"{MAX_STOP_CHARS} are accepted", param)
    ids = inp.sampling.get("stop_token_ids") or ()
    if len(ids) > MAX_STOP_TOKEN_IDS:
        raise InvalidParamError(f"stop_token_ids has {len(ids)} ids; at most "
                                f"{MAX_STOP_TOKEN_IDS} are accepted", "stop_token_ids")


def check_text(value: str, param: str) -> None:
    """Refuse text that is not valid Unicode (a lone surrogate such as JSON's "\\ud800"):
    no tokenizer can encode it and no response can echo it."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidParamError(
            f"{param} is not valid Unicode: it has a lone surrogate (U+{ord(value[exc.start]):04X})"
            f" at character {exc.start}; send well-formed UTF-8 text", param) from None


def _check_prompt_chars(size: int, param: str, config: RouterConfig) -> None:
    if size > config.max_prompt_chars:
        raise InvalidParamError(
            f"the {param} is {size} characters, more than this server's limit of "
            f"{config.max_prompt_chars}; shorten it", param)


def prompt_chars(inp: GenerateInput) -> int:
    """Characters the tokenizer will read for ``inp`` (0 for a token-id prompt)."""
    if inp.prompt is not None:
        return len(inp.prompt)
    if inp.messages is not None:
        return _chat_chars(inp)
    return 0


def _chat_chars(inp: GenerateInput) -> int:
    """Characters of a chat's message texts, tool calls' arguments, tool definitions and
    template variables (a template may print them: Llama 3's date_string)."""
    size = sum(len(v) for m in inp.messages or () for v in m.values() if isinstance(v, str))
    size += sum(len(json.dumps(c)) for m in inp.messages or () for c in m.get("tool_calls", ()))
    template = inp.chat_template.chat_template_kwargs if inp.chat_template else None
    size += len(json.dumps(template)) if template else 0
    return size + (len(json.dumps(inp.tools)) if inp.tools else 0)


def build_prepared(inp: GenerateInput, request_id: str, prompt: tuple[list[int], str],
                   config: RouterConfig, now: float) -> PreparedRequest:
    """The prepared request from ``tokenize_prompt``'s result ``prompt``."""
    prompt_ids, prompt_param = prompt
    params = build_sampling(inp, len(prompt_ids), prompt_param, config)
    return PreparedRequest(
        request_id=request_id, prompt_token_ids=prompt_ids, params=params, arrival_time=now,
        deadline=inp.deadline, return_text=inp.return_text,
        skip_special_tokens=inp.skip_special_tokens,
        include_stop_str_in_output=inp.include_stop_str_in_output, n=inp.n)


def tokenize_prompt(inp: GenerateInput, tokenizer) -> tuple[list[int], str]:
    """(prompt token ids, the prompt's field name for error messages)."""
    given = [name for name in ("prompt", "prompt_token_ids", "messages")
             if getattr(inp, name) is not None]
    if len(given) != 1:
        raise InvalidParamError("give exactly one of a text prompt, prompt token ids or chat "
                                f"messages (got {len(given)})", "prompt")
    if inp.messages is not None:
        ids = render_chat(tokenizer, inp.messages, inp.tools, inp.chat_template)
        param = "messages"
    elif inp.prompt is not None:
        if not inp.prompt:
            raise InvalidParamError("the prompt is empty", "prompt")
        # Special-token text is the special token, as vLLM and transformers encode it: a
        # prompt already in the model's chat format (a common use of completions) means it.
        ids = list(tokenizer.encode(inp.prompt, add_special_tokens=True))
        param = "prompt"
    else:
        ids = [int(t) for t in inp.prompt_token_ids]
        param = "prompt"
    if not ids:
        raise InvalidParamError("the prompt is empty", param)
    vocab = int(tokenizer.vocab_size)
    bad = next((t for t in ids if not 0 <= t < vocab), None)
    if bad is not None:
        raise InvalidParamError(f"prompt token id {bad} is outside the vocabulary [0, {vocab})",
                                param)
    return ids, param


def check_token_ids(params: SamplingParams, vocab: int) -> None:
    """logit_bias ids index the logits row: each must be a token of the model."""
    bad = next((t for t in params.logit_bias_ids if t >= vocab), None)
    if bad is not None:
        raise InvalidParamError(f"logit_bias token id {bad} is outside the vocabulary "
                                f"[0, {vocab})", "logit_bias")


def build_sampling(inp: GenerateInput, prompt_len: int, prompt_param: str,
                   config: RouterConfig) -> SamplingParams:
    """SamplingParams from the fields the client set, max_tokens checked against the context."""
    values = dict(inp.sampling)
    unknown = sorted(set(values) - _SAMPLING_FIELDS)
    if unknown:
        raise InvalidParamError(f"unknown sampling parameter {unknown[0]!r}", unknown[0])
    room = config.max_model_len - prompt_len
    if room < 1:
        raise InvalidParamError(
            f"the prompt is {prompt_len} tokens, which leaves no room to generate in the "
            f"model's context of {config.max_model_len} tokens; shorten it", prompt_param)
    max_tokens = values.get("max_tokens")
    alias = inp.param_aliases.get("max_tokens", "max_tokens")
    if max_tokens is None:
        cap = config.default_max_tokens or room
        values["max_tokens"] = min(room, cap)
    elif isinstance(max_tokens, int) and max_tokens > room:
        raise InvalidParamError(
            f"{alias}={max_tokens} is too large: the prompt is {prompt_len} tokens and the "
            f"model's context is {config.max_model_len}, so at most {room} can be generated",
            alias)
    try:
        return SamplingParams(**values)
    except (ValueError, TypeError) as exc:
        name = _field_of(str(exc))
        param = inp.param_aliases.get(name, name) if name else None
        raise InvalidParamError(str(exc), param) from exc


def _field_of(message: str) -> str | None:
    """The field named by SamplingParams' "SamplingParams.<field>=..." messages."""
    prefix = "SamplingParams."
    if message.startswith(prefix):
        return message[len(prefix):].split("=", 1)[0]
    return None
