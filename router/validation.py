"""Request validation and tokenization: ``GenerateInput`` -> ``PreparedRequest``.

Every refusal is an ``InvalidParamError`` whose message says what is wrong and whose
``param`` names the field as the client spelled it (OpenAI's error ``param``).
"""

from __future__ import annotations

from dataclasses import fields
from typing import Any

from engine.sampling_params import SamplingParams
from router.config import RouterConfig
from router.errors import InvalidParamError
from router.types import GenerateInput, PreparedRequest

_SAMPLING_FIELDS = frozenset(f.name for f in fields(SamplingParams))


def build_prepared(inp: GenerateInput, request_id: str, tokenizer, config: RouterConfig,
                   now: float) -> PreparedRequest:
    prompt_ids, prompt_param = tokenize_prompt(inp, tokenizer)
    params = build_sampling(inp, len(prompt_ids), prompt_param, config)
    return PreparedRequest(
        request_id=request_id, prompt_token_ids=prompt_ids, params=params, arrival_time=now,
        deadline=inp.deadline, return_text=inp.return_text,
        skip_special_tokens=inp.skip_special_tokens)


def tokenize_prompt(inp: GenerateInput, tokenizer) -> tuple[list[int], str]:
    """(prompt token ids, the prompt's field name for error messages)."""
    given = [name for name in ("prompt", "prompt_token_ids", "messages")
             if getattr(inp, name) is not None]
    if len(given) != 1:
        raise InvalidParamError("give exactly one of a text prompt, prompt token ids or chat "
                                f"messages (got {len(given)})", "prompt")
    if inp.messages is not None:
        ids = _render_chat(inp.messages, tokenizer)
        param = "messages"
    elif inp.prompt is not None:
        if not inp.prompt:
            raise InvalidParamError("the prompt is empty", "prompt")
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


def _render_chat(messages: list[dict[str, Any]], tokenizer) -> list[int]:
    if not messages:
        raise InvalidParamError("messages is empty; send at least one message", "messages")
    try:
        return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True))
    except Exception as exc:  # template errors come as jinja, KeyError, ValueError, ...
        raise InvalidParamError(f"the chat template could not render the messages: {exc}",
                                "messages") from exc


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
