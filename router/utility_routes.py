"""The HTTP edge's utility routes, as vLLM's OpenAI server has them: GET /version,
GET /v1/models/{id}, POST /tokenize, POST /detokenize.

Clients and tools that speak to vLLM call these (``vllm bench serve`` asks /tokenize, the
openai SDK's ``models.retrieve`` asks /v1/models/{id}). Request and response shapes follow
vLLM's ``TokenizeCompletionRequest`` / ``TokenizeChatRequest`` / ``TokenizeResponse`` /
``DetokenizeRequest`` / ``DetokenizeResponse``. ``router.openai_server`` mounts this router
behind the same API-key check as /v1/*; errors are its OpenAI-style bodies (an unknown model
is a 404 ``model_not_found``, a bad field a 400 naming it).

/tokenize counts what a generation request would send the model: a text prompt is encoded
as /v1/completions encodes it (special-token text is the special token), a chat is rendered
by the model's chat template as /v1/chat/completions renders it (``tools``,
``add_generation_prompt``, ``continue_final_message``, ``chat_template_kwargs``). An unknown
field is refused, and so is a chat-only field with a prompt.
``token_strs`` are each token's own text (its id decoded alone).
"""

from __future__ import annotations

import asyncio
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as package_version
from typing import Any

from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict, Field

from engine.errors import NotFoundError
from router import openai_protocol as oai
from router.chat import ChatTemplateOptions, ToolSpec
from router.errors import InvalidParamError
from router.service import INLINE_TOKENIZE_CHARS, GenerationService
from router.types import ModelCard
from router.validation import check_text

# As the generation requests: an unknown field is a 400 naming it (a field such as vLLM's
# ``chat_template_kwargs`` would otherwise change nothing, and the count would be wrong
# without a word), JSON types not coerced.
_REQUEST_CONFIG = ConfigDict(extra="forbid", strict=True)


def splitserve_version() -> str:
    try:
        return package_version("splitserve")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "0+unknown"


class TokenizeRequest(BaseModel):
    """vLLM's two tokenize requests in one: exactly one of ``prompt`` (completion) or
    ``messages`` (chat)."""

    model_config = _REQUEST_CONFIG

    model: str | None = None
    prompt: str | None = None
    messages: list[oai.ChatMessage] | None = None
    add_special_tokens: bool | None = Field(
        None, description="Add special tokens such as BOS. Default: true for a prompt, "
        "false for messages (the chat template writes its own).")
    add_generation_prompt: bool = Field(True, description="Chat only: end the rendered chat "
                                        "with the assistant turn's opening.")
    continue_final_message: bool = Field(False, description="Chat only: leave the last "
                                         "message's turn open (needs add_generation_prompt "
                                         "false).")
    chat_template_kwargs: dict[str, Any] | None = Field(
        None, description="Chat only: more chat template variables (enable_thinking).")
    tools: list[dict[str, Any]] | None = Field(
        None, description="Chat only: the tool definitions, rendered into the prompt by the "
        "chat template as /v1/chat/completions renders them.")
    return_token_strs: bool | None = Field(False, description="Also return each token's text.")


class DetokenizeRequest(BaseModel):
    model_config = _REQUEST_CONFIG

    model: str | None = None
    tokens: list[int]


def model_card_body(card: ModelCard, vocab_size: int) -> dict[str, Any]:
    """One model as /v1/models lists it."""
    return {"id": card.id, "object": "model", "created": card.created,
            "owned_by": card.owned_by, "max_model_len": card.max_model_len,
            "vocab_size": vocab_size}


def utility_router(service: GenerationService) -> APIRouter:
    """The routes; the caller adds the authentication dependency when it includes them."""
    api = APIRouter(responses=oai.ERROR_RESPONSES)

    @api.get("/version", responses=oai.JSON_OK)
    async def version() -> dict[str, str]:
        return {"version": splitserve_version()}

    @api.get("/v1/models/{model_id:path}", responses=oai.JSON_OK)
    async def retrieve_model(model_id: str) -> dict[str, Any]:
        if not model_id:  # "/v1/models/" names no model (resolve_model("") is the default)
            raise NotFoundError("no model id given; see /v1/models for the served models")
        card = service.resolve_model(model_id)
        return model_card_body(card, int(service.tokenizer.vocab_size))

    @api.post("/tokenize", responses=oai.JSON_OK)
    async def tokenize(body: TokenizeRequest) -> dict[str, Any]:
        max_len = service.resolve_model(body.model or "").max_model_len
        ids = await _tokenize(service, body)
        strs = None
        if body.return_token_strs:
            strs = [service.tokenizer.decode([t], skip_special_tokens=False) for t in ids]
        return {"count": len(ids), "max_model_len": max_len, "tokens": ids, "token_strs": strs}

    @api.post("/detokenize", responses=oai.JSON_OK)
    async def detokenize(body: DetokenizeRequest) -> dict[str, str]:
        card = service.resolve_model(body.model or "")
        _check_ids(body.tokens, int(service.tokenizer.vocab_size), card.max_model_len)
        return {"prompt": service.tokenizer.decode(body.tokens, skip_special_tokens=False)}

    return api


async def _tokenize(service: GenerationService, body: TokenizeRequest) -> list[int]:
    if (body.prompt is None) == (body.messages is None):
        raise InvalidParamError("give exactly one of prompt or messages", "prompt")
    if body.prompt is not None:
        unrendered = ChatTemplateOptions()  # a prompt is not rendered: only its defaults
        chat_only = (["tools"] if body.tools is not None else []) + [
            name for name in ChatTemplateOptions.model_fields
            if getattr(body, name) != getattr(unrendered, name)]
        if chat_only:
            raise InvalidParamError(f"{chat_only[0]} goes with messages, not with a prompt",
                                    chat_only[0])
        text, param = body.prompt, "prompt"
        add_special = True if body.add_special_tokens is None else body.add_special_tokens
    else:
        text, param = _render_chat(service, body), "messages"
        add_special = bool(body.add_special_tokens)
    check_text(text, param)
    if len(text) > service.config.max_prompt_chars:
        raise InvalidParamError(f"the {param} is {len(text)} characters, more than this "
                                f"server's limit of {service.config.max_prompt_chars}; "
                                "shorten it", param)
    encode = service.tokenizer.encode
    if len(text) <= INLINE_TOKENIZE_CHARS:
        return list(encode(text, add_special))
    # A long text is encoded off the event loop, so other streams keep flowing.
    return list(await asyncio.to_thread(encode, text, add_special))


def _render_chat(service: GenerationService, body: TokenizeRequest) -> str:
    messages = [m.as_dict() for m in body.messages or ()]
    if not messages:
        raise InvalidParamError("messages is empty; send at least one message", "messages")
    for message in messages:
        check_text(str(message.get("content", "")), "messages")
    if sum(len(str(m.get("content", ""))) for m in messages) > service.config.max_prompt_chars:
        raise InvalidParamError("the messages are longer than this server's limit of "
                                f"{service.config.max_prompt_chars} characters", "messages")
    if not service.tokenizer.has_chat_template:
        raise InvalidParamError("this model has no chat template; tokenize a prompt instead",
                                "messages")
    tools = ToolSpec(body.tools, None, None).template_tools  # checked as chat checks them
    options = ChatTemplateOptions.of(body)
    options.check()
    try:
        return service.tokenizer.chat_template_text(
            messages, options.add_generation_prompt, tools, options.continue_final_message,
            options.chat_template_kwargs)
    except Exception as exc:  # template errors come as jinja, KeyError, ValueError, ...
        raise InvalidParamError(f"the chat template could not render the messages: {exc}",
                                "messages") from exc


def _check_ids(ids: list[int], vocab: int, max_len: int) -> None:
    if len(ids) > max_len:
        raise InvalidParamError(f"tokens has {len(ids)} ids, more than the model's context of "
                                f"{max_len}", "tokens")
    bad = next((t for t in ids if not 0 <= t < vocab), None)
    if bad is not None:
        raise InvalidParamError(f"token id {bad} is out of range: the model's vocabulary has "
                                f"ids 0 to {vocab - 1}", "tokens")
