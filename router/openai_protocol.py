"""OpenAI-compatible request models and response bodies (completions and chat).

Requests: pydantic models accepting OpenAI's fields plus vLLM's extra sampling fields
(``top_k``, ``min_p``, ``repetition_penalty``, ``ignore_eos``, ``stop_token_ids``,
``min_tokens``, ``skip_special_tokens``, ``request_id``); unknown fields are ignored, as
OpenAI clients send vendor extras. ``to_input`` turns one into a ``GenerateInput``.
Responses: plain dicts in OpenAI's shapes; the final ones carry a non-standard
``"splitserve": {"request_id", "timing"}`` extension. The ``*_RESPONSES`` tables declare, for
the OpenAPI schema, every status and content type the routes answer with (the schemathesis
test holds the server to them).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from router.errors import InvalidParamError
from router.types import GenerateChunk, GenerateInput, LogprobEntry, Usage

_SAMPLING_KEYS = ("max_tokens", "temperature", "top_p", "top_k", "min_p", "seed",
                  "ignore_eos", "presence_penalty", "frequency_penalty",
                  "repetition_penalty", "stop_token_ids", "min_tokens")


# strict: a field's JSON type is the one the OpenAPI schema declares ("include_usage": 0 or
# "max_tokens": "5" is a 400, not silently coerced); unknown fields are still ignored.
_REQUEST_CONFIG = ConfigDict(extra="ignore", strict=True)


class StreamOptions(BaseModel):
    model_config = _REQUEST_CONFIG

    include_usage: bool = False


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
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # vLLM-style extras
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    ignore_eos: bool | None = None
    stop_token_ids: list[int] | None = None
    min_tokens: int | None = None
    skip_special_tokens: bool = True
    request_id: str | None = None

    def sampling(self) -> dict[str, Any]:
        if self.n != 1:
            raise InvalidParamError(f"n={self.n} is not supported; only n=1", "n")
        out = {k: getattr(self, k) for k in _SAMPLING_KEYS if getattr(self, k) is not None}
        if self.stop is not None:
            out["stop"] = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)
        return out

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class CompletionRequest(_SamplingRequest):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = None
    echo: bool = False
    suffix: str | None = None

    def to_input(self, deadline: float | None) -> GenerateInput:
        if self.echo or self.suffix:
            raise InvalidParamError("echo and suffix are not supported",
                                    "echo" if self.echo else "suffix")
        sampling = self.sampling()
        sampling.setdefault("max_tokens", 16)  # OpenAI's default for /v1/completions
        if self.logprobs is not None:
            sampling["logprobs"] = self.logprobs
        text, ids = _single_prompt(self.prompt)
        return GenerateInput(model=self.model, prompt=text, prompt_token_ids=ids,
                             sampling=sampling, request_id=self.request_id or "",
                             deadline=deadline, skip_special_tokens=self.skip_special_tokens)


class ChatMessage(BaseModel):
    model_config = _REQUEST_CONFIG

    role: str
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None

    def as_dict(self) -> dict[str, Any]:
        content = self.content
        if isinstance(content, list):
            if any(part.get("type") != "text" for part in content):
                raise InvalidParamError("only text content parts are supported", "messages")
            content = "".join(str(part.get("text", "")) for part in content)
        out = {"role": self.role, "content": content or ""}
        if self.name:
            out["name"] = self.name
        return out


class ChatCompletionRequest(_SamplingRequest):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)

    def to_input(self, deadline: float | None) -> GenerateInput:
        sampling = self.sampling()
        aliases = {}
        if self.max_completion_tokens is not None:
            sampling["max_tokens"] = self.max_completion_tokens
            aliases["max_tokens"] = "max_completion_tokens"
        if self.logprobs:
            sampling["logprobs"] = self.top_logprobs or 0
        elif self.top_logprobs:
            raise InvalidParamError("top_logprobs needs logprobs=true", "top_logprobs")
        return GenerateInput(model=self.model, messages=[m.as_dict() for m in self.messages],
                             sampling=sampling, request_id=self.request_id or "",
                             deadline=deadline, skip_special_tokens=self.skip_special_tokens,
                             param_aliases=aliases)


def _single_prompt(prompt) -> tuple[str | None, list[int] | None]:
    """(text, token ids) of a completions prompt; batches of more than one are refused."""
    if isinstance(prompt, str):
        return prompt, None
    if not prompt:
        raise InvalidParamError("the prompt is empty", "prompt")
    if all(isinstance(p, int) for p in prompt):
        return None, list(prompt)
    if len(prompt) != 1:
        raise InvalidParamError(f"a batch of {len(prompt)} prompts is not supported; send one "
                                "prompt per request", "prompt")
    return _single_prompt(prompt[0])


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


# ---- response bodies ---------------------------------------------------------------------

def usage_body(usage: Usage) -> dict[str, Any]:
    return {"prompt_tokens": usage.prompt_tokens,
            "completion_tokens": usage.completion_tokens,
            "total_tokens": usage.total_tokens,
            "prompt_tokens_details": {"cached_tokens": usage.cached_tokens}}


def extension_body(chunk: GenerateChunk) -> dict[str, Any]:
    return {"request_id": chunk.request_id, "timing": chunk.timing or {}}


def completion_logprobs(entries: list[LogprobEntry] | None) -> dict[str, Any] | None:
    if entries is None:
        return None
    return {"tokens": [e.token for e in entries],
            "token_logprobs": [e.logprob for e in entries],
            "top_logprobs": [{t.token: t.logprob for t in e.top} for e in entries],
            "text_offset": []}


def chat_logprobs(entries: list[LogprobEntry] | None) -> dict[str, Any] | None:
    if entries is None:
        return None

    def item(token: str, logprob: float) -> dict[str, Any]:
        return {"token": token, "logprob": logprob, "bytes": list(token.encode())}

    return {"content": [{**item(e.token, e.logprob),
                         "top_logprobs": [item(t.token, t.logprob) for t in e.top]}
                        for e in entries]}


def completion_choice(chunk: GenerateChunk) -> dict[str, Any]:
    return {"index": 0, "text": chunk.text, "logprobs": completion_logprobs(chunk.logprobs),
            "finish_reason": chunk.finish_reason, "stop_reason": chunk.stop_reason}


def chat_choice(chunk: GenerateChunk, kind: Literal["message", "delta"],
                first: bool = False) -> dict[str, Any]:
    if kind == "message":
        body = {"role": "assistant", "content": chunk.text}
    else:
        body = {"role": "assistant", "content": chunk.text} if first else (
            {"content": chunk.text} if chunk.text else {})
    return {"index": 0, kind: body, "logprobs": chat_logprobs(chunk.logprobs),
            "finish_reason": chunk.finish_reason, "stop_reason": chunk.stop_reason}
