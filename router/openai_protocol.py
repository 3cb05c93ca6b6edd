"""OpenAI-compatible request models and response bodies (completions and chat).

Requests: pydantic models accepting OpenAI's fields plus vLLM's extras (``top_k``,
``min_p``, ``repetition_penalty``, ``ignore_eos``, ``stop_token_ids``, ``min_tokens``,
``skip_special_tokens``, ``include_stop_str_in_output``, ``guided_json`` / ``guided_regex``
/ ``guided_choice`` / ``guided_grammar``, ``structured_outputs``, ``request_id``). Nothing
is silently ignored: an unknown field is a 400 naming it (``extra="forbid"``); a known field
this server cannot honour is a 400 naming it when set to anything but its no-op value
(``router.request_fields.REFUSED``: ``best_of`` > 1, ``suffix``,
``audio``, ...). Accepted with no effect,
by nature: ``user``, ``safety_identifier``, ``metadata``, ``prompt_cache_key``,
``prompt_cache_retention`` (``request_fields.NO_EFFECT``; docs/api.md has the whole table).
``to_inputs`` turns a request into one ``GenerateInput`` per prompt (a completions prompt
may be a batch); each has ``n`` samples, so choice ``index`` = prompt * n + sample.
Responses: plain dicts in OpenAI's shapes; the final ones carry a non-standard
``"splitserve": {"request_id", "timing"}`` extension. The ``*_RESPONSES`` tables declare, for
the OpenAPI schema, every status and content type the routes answer with (the schemathesis
test holds the server to them).
"""

from __future__ import annotations

import re
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from router.chat import ChatMessage, ChatTemplateOptions, ToolSpec
from router.errors import InvalidParamError
from router.request_fields import check_refused, structured_spec
from router.tool_parsers import ToolParser
from router.types import GenerateInput

_SAMPLING_KEYS = ("max_tokens", "temperature", "top_p", "top_k", "min_p", "seed",
                  "ignore_eos", "presence_penalty", "frequency_penalty",
                  "repetition_penalty", "stop_token_ids", "min_tokens", "prompt_logprobs")


# strict: a field's JSON type is the one the OpenAPI schema declares ("include_usage": 0 or
# "max_tokens": "5" is a 400, not silently coerced); forbid: an unknown field is a 400 that
# names it, never silently dropped.
_REQUEST_CONFIG = ConfigDict(extra="forbid", strict=True)


class StreamOptions(BaseModel):
    model_config = _REQUEST_CONFIG

    include_usage: bool = False
    include_obfuscation: bool = False

    def check(self) -> None:
        if self.include_obfuscation:
            raise InvalidParamError("stream_options.include_obfuscation is not supported",
                                    "stream_options")


class _SamplingRequest(BaseModel):
    model_config = _REQUEST_CONFIG

    model: str
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    stop: str | list[str] | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    seed: int | None = None
    logit_bias: dict[str, float] | None = None
    response_format: dict[str, Any] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    # accepted with no effect, by nature (request_fields.NO_EFFECT)
    user: str | None = None
    safety_identifier: str | None = None
    metadata: dict[str, str] | None = None
    prompt_cache_key: str | None = None
    prompt_cache_retention: str | None = None
    n: int = 1
    # refused unless a no-op (request_fields.REFUSED)
    best_of: Any = None
    store: Any = None
    service_tier: Any = None
    # vLLM-style extras
    prompt_logprobs: int | None = None
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    ignore_eos: bool | None = None
    stop_token_ids: list[int] | None = None
    min_tokens: int | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    return_token_ids: bool = False  # vLLM's: the prompt's and each choice's token ids
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    structured_outputs: dict[str, Any] | None = None
    request_id: str | None = None

    def sampling(self) -> dict[str, Any]:
        check_refused({name: getattr(self, name) for name in type(self).model_fields})
        if self.stream_options is not None:
            if not self.stream:
                raise InvalidParamError("stream_options needs stream=true", "stream_options")
            self.stream_options.check()
        out = {k: getattr(self, k) for k in _SAMPLING_KEYS if getattr(self, k) is not None}
        if self.stop is not None:
            out["stop"] = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)
        if self.logit_bias:
            out["logit_bias"] = _logit_bias(self.logit_bias)
        spec, _ = structured_spec({name: getattr(self, name) for name in type(self).model_fields})
        if spec is not None:
            out["structured"] = spec
        return out

    def _input(self, deadline: float | None, **kwargs: Any) -> GenerateInput:
        return GenerateInput(model=self.model, request_id=self.request_id or "",
                             deadline=deadline, skip_special_tokens=self.skip_special_tokens,
                             include_stop_str_in_output=self.include_stop_str_in_output,
                             n=self.n, **kwargs)

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


# A token id as a JSON key: ASCII digits, few enough to be an int64 (bigger ids are refused
# as outside the vocabulary later; a 5,000-digit one would hit Python's int() limit).
_TOKEN_ID_KEY = re.compile(r"[0-9]{1,18}")


def _logit_bias(bias: dict[str, float]) -> dict[int, float]:
    """OpenAI's {"token id": bias} (JSON keys are strings) -> {id: bias}."""
    out = {}
    for key, value in bias.items():
        if not _TOKEN_ID_KEY.fullmatch(key):  # str.isdigit() takes "²" and "٣", int() not
            raise InvalidParamError(f"logit_bias keys must be token ids (got {key[:20]!r})",
                                    "logit_bias")
        out[int(key)] = value
    return out


class CompletionRequest(_SamplingRequest):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = None
    echo: bool = False
    suffix: Any = None

    def to_inputs(self, deadline: float | None) -> list[GenerateInput]:
        """One input per prompt of the batch (request ids ``<request_id>-<i>`` past one)."""
        sampling = self.sampling()
        sampling.setdefault("max_tokens", 16)  # OpenAI's default for /v1/completions
        if self.logprobs is not None:
            sampling["logprobs"] = self.logprobs
            if self.echo:  # the echoed prompt's tokens get logprobs too (OpenAI, vLLM)
                sampling["prompt_logprobs"] = max(self.logprobs, self.prompt_logprobs or 0)
        prompts = _prompts(self.prompt)
        inputs = []
        for i, (text, ids) in enumerate(prompts):
            inp = self._input(deadline, prompt=text, prompt_token_ids=ids,
                              sampling=dict(sampling), echo=self.echo)
            if len(prompts) > 1 and inp.request_id:
                inp.request_id = f"{inp.request_id}-{i}"
            inputs.append(inp)
        return inputs


class ChatCompletionRequest(_SamplingRequest):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    # vLLM's rendering fields (router.chat.ChatTemplateOptions)
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template_kwargs: dict[str, Any] | None = None
    # refused unless a no-op (request_fields.REFUSED)
    audio: Any = None
    modalities: Any = None
    prediction: Any = None
    web_search_options: Any = None
    reasoning_effort: Any = None
    verbosity: Any = None
    moderation: Any = None
    prompt_cache_options: Any = None
    functions: Any = None
    function_call: Any = None

    def tool_spec(self) -> ToolSpec:
        return ToolSpec(self.tools, self.tool_choice, self.parallel_tool_calls)

    def to_inputs(self, deadline: float | None,
                  parser: ToolParser | None = None) -> list[GenerateInput]:
        """``parser``: the server's tool-call parser (strict tools under "auto" are enforced
        in its format)."""
        sampling = self.sampling()
        aliases = {}
        if self.max_completion_tokens is not None:
            sampling["max_tokens"] = self.max_completion_tokens
            aliases["max_tokens"] = "max_completion_tokens"
        if self.logprobs:
            sampling["logprobs"] = self.top_logprobs or 0
        elif self.top_logprobs:
            raise InvalidParamError("top_logprobs needs logprobs=true", "top_logprobs")
        tools = self.tool_spec()
        forced = tools.structured(parser)
        if forced is not None:
            if "structured" in sampling:
                raise InvalidParamError("tool_choice 'required' or a named function, and "
                                        "strict tools, are enforced with structured output: "
                                        "they cannot be combined with response_format or "
                                        "guided_*", "tool_choice")
            sampling["structured"] = forced
        return [self._input(deadline, messages=[m.as_dict() for m in self.messages],
                            tools=tools.template_tools,
                            chat_template=ChatTemplateOptions.of(self),
                            sampling=sampling, param_aliases=aliases)]


def _prompts(prompt) -> list[tuple[str | None, list[int] | None]]:
    """(text, token ids) of each prompt of a completions request."""
    if isinstance(prompt, str):
        return [(prompt, None)]
    if not prompt:
        raise InvalidParamError("the prompt is empty", "prompt")
    if all(isinstance(p, int) for p in prompt):
        return [(None, list(prompt))]
    if len(prompt) > MAX_BATCH_PROMPTS:
        raise InvalidParamError(f"a batch of {len(prompt)} prompts is more than this server "
                                f"takes in one request ({MAX_BATCH_PROMPTS})", "prompt")
    return [(p, None) if isinstance(p, str) else (None, list(p)) for p in prompt]


MAX_BATCH_PROMPTS = 64
"""Most prompts in one completions request (each is a request in flight of its own)."""


# ---- OpenAPI declarations of what the routes answer ---------------------------------------

class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorBody(BaseModel):
    """OpenAI's error body, for every non-2xx answer."""

    error: ErrorDetail


def _error(description: str, retry: bool = False) -> dict[str, Any]:
    out: dict[str, Any] = {"model": ErrorBody, "description": description}
    if retry:
        out["headers"] = {"Retry-After": {"description": "seconds to wait before retrying",
                                          "schema": {"type": "integer"}}}
    return out


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: _error("Invalid request; error.param names the field"),
    401: _error("Missing or wrong API key"),
    404: _error("Unknown model"),
    413: _error("Request body larger than the server accepts"),
    429: _error("Over capacity; retry after Retry-After seconds", retry=True),
    500: _error("Internal error (the server log has the details)"),
    503: _error("No worker is ready; retry after Retry-After seconds", retry=True),
    504: _error("The request's deadline passed"),
}
JSON_OK: dict[int | str, dict[str, Any]] = {200: {"description": "OK"}}
GENERATE_RESPONSES: dict[int | str, dict[str, Any]] = {200: {
    "description": "The completion (JSON), or with stream=true server-sent events ending "
                   "with data: [DONE]",
    "content": {"application/json": {}, "text/event-stream": {"schema": {
        "type": "object", "required": ["data"], "properties": {"data": {
            "type": "string",
            "description": "a chunk as JSON (an error object after a failure), or [DONE]"}}}}}}}
HEALTH_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"description": "Ready"},
    500: _error("Internal error"),
    503: {"description": "Not ready (same body, status unavailable)",
          "content": {"application/json": {}}}}
METRICS_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"description": "Prometheus text exposition",
          "content": {"text/plain": {"schema": {"type": "string"}}}},
    500: _error("Internal error")}
