"""The router's own request and response types, free of protobuf and HTTP.

The gRPC and HTTP edges convert their wire formats to ``GenerateInput`` and from
``GenerateChunk``; the lifecycle in ``router/service.py`` speaks only these.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from engine.sampling_params import SamplingParams

if TYPE_CHECKING:
    from router.chat import ChatTemplateOptions


@dataclass
class GenerateInput:
    """One generation request as an edge hands it to the service."""

    model: str = ""
    """Model name; empty selects the default model."""
    prompt: str | None = None
    """Prompt text, tokenized with special tokens (exactly one of prompt, prompt_token_ids,
    messages is set)."""
    prompt_token_ids: list[int] | None = None
    """Pre-tokenized prompt."""
    messages: list[dict[str, Any]] | None = None
    """Chat messages ({"role", "content"}, assistant "tool_calls", tool "tool_call_id"),
    rendered with the model's chat template."""
    tools: list[dict[str, Any]] | None = None
    """OpenAI function tools ({"type": "function", "function": {...}}) for the chat
    template; None: the template gets none."""
    chat_template: ChatTemplateOptions | None = None
    """How the messages are rendered (vLLM's add_generation_prompt, continue_final_message,
    chat_template_kwargs); None: the defaults."""
    sampling: dict[str, Any] = field(default_factory=dict)
    """The SamplingParams fields the client set (unset ones take the server's defaults)."""
    request_id: str = ""
    """Client-chosen id; empty: the service generates one."""
    deadline: float | None = None
    """Absolute time.time() after which the request is aborted (DEADLINE_EXCEEDED)."""
    return_text: bool = True
    """Detokenize and return text deltas (stop strings are applied either way)."""
    skip_special_tokens: bool = True
    """Leave special tokens out of the text."""
    include_stop_str_in_output: bool = False
    """Keep a matched stop string at the end of the text (it is cut by default)."""
    n: int = 1
    """Samples of the prompt (sample i uses seed + i when seeded); they share its KV."""
    echo: bool = False
    """Completions: the response's text starts with the prompt's text."""
    param_aliases: dict[str, str] = field(default_factory=dict)
    """SamplingParams field -> the name the client used (max_tokens -> max_completion_tokens),
    so error messages name the field the client sent."""


@dataclass(frozen=True)
class PreparedRequest:
    """A validated, tokenized request, not yet admitted (holds no resources)."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival_time: float  # time.time() when the edge handed the request over
    deadline: float | None
    return_text: bool
    skip_special_tokens: bool
    include_stop_str_in_output: bool = False
    n: int = 1  # samples of the prompt


@dataclass
class TopToken:
    token_id: int
    logprob: float
    token: str  # decoded text of the single token


@dataclass
class LogprobEntry:
    """Logprob of one generated (or prompt) token and its top alternatives (best first)."""

    token_id: int
    logprob: float | None  # None only for a prompt's first token (nothing comes before it)
    token: str
    top: list[TopToken] = field(default_factory=list)
    rank: int | None = None  # prompt tokens: the token's rank among all (1 = most likely)


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass
class GenerateChunk:
    """A delta of one request's output. The last chunk has ``finish_reason`` set."""

    request_id: str
    token_ids: list[int]  # generated since the previous chunk
    text: str = ""  # text since the previous chunk ("" when return_text is off)
    logprobs: list[LogprobEntry] | None = None  # one per token id, when requested
    finish_reason: str | None = None  # None while running; "stop" | "length" | "abort"
    stop_reason: str | int | None = None  # matched stop string, or the stop token id
    usage: Usage | None = None  # final chunk only
    # final chunk only; keys in metrics.TIMING_PHASES ("migration" and the count
    # "migrations" only for a request that moved to another worker)
    timing: dict[str, float] | None = None
    index: int = 0  # which of the request's n samples this chunk belongs to
    # SamplingParams.prompt_logprobs: one entry per prompt token (the first with logprob
    # None), on the request's first chunk only
    prompt_logprobs: list[LogprobEntry] | None = None


@dataclass(frozen=True)
class ModelCard:
    id: str
    owned_by: str
    created: int  # Unix seconds when the router started serving it
    max_model_len: int


@dataclass(frozen=True)
class ModelInfo:
    card: ModelCard
    vocab_size: int
    eos_token_ids: tuple[int, ...]
    ready: bool


def merge_samples(chunks: list[GenerateChunk]) -> list[GenerateChunk]:
    """One merged chunk per sample (by ``index``), in sample order."""
    by_index: dict[int, list[GenerateChunk]] = {}
    for chunk in chunks:
        by_index.setdefault(chunk.index, []).append(chunk)
    return [merge_chunks(by_index[i]) for i in sorted(by_index)]


def merge_chunks(chunks: list[GenerateChunk]) -> GenerateChunk:
    """One chunk holding the concatenation of one sample's chunks (the last one is final)."""
    last = chunks[-1]
    logprobs = [e for c in chunks for e in (c.logprobs or [])]
    prompt_logprobs = next((c.prompt_logprobs for c in chunks if c.prompt_logprobs), None)
    return GenerateChunk(
        request_id=last.request_id,
        token_ids=[t for c in chunks for t in c.token_ids],
        text="".join(c.text for c in chunks),
        logprobs=logprobs or None,
        finish_reason=last.finish_reason, stop_reason=last.stop_reason,
        usage=last.usage, timing=last.timing, index=last.index,
        prompt_logprobs=prompt_logprobs)
