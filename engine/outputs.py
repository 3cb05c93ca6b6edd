"""What the engine returns for a request, step by step and at the end."""

from __future__ import annotations

from dataclasses import dataclass, field

from engine.batch import TokenLogprobs


@dataclass
class RequestOutput:
    request_id: str
    new_token_ids: list[int]  # generated since the previous output of this request
    token_ids: list[int]  # every generated token so far
    finish_reason: str | None = None  # None while running; "stop" | "length" | "abort" | ...
    text: str = ""  # generated text so far (stop string excluded), when a tokenizer is loaded
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache
    logprobs: list[TokenLogprobs | None] = field(default_factory=list)
    stop_reason: str | int | None = None  # the stop string or token id that ended it
    error: str | None = None  # a client-safe message when finish_reason == "error"
    # SamplingParams.prompt_logprobs: one per prompt token, None first; on the request's
    # first output only (and on generate()'s final ones).
    prompt_logprobs: list[TokenLogprobs | None] | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class TokenDelta:
    """What a worker streams to the router for one request after an engine step: only the
    new tokens (never the whole history), plus the final status and timestamps at the end."""

    request_id: str
    new_token_ids: list[int]
    finish_reason: str | None = None
    error: str | None = None  # client-safe message when finish_reason == "error"
    logprobs: list[TokenLogprobs | None] | None = None  # parallel to new_token_ids
    num_cached_tokens: int = 0
    prompt_logprobs: list[TokenLogprobs | None] | None = None  # the first delta's, if asked
    # Wall-clock (time.time()) stamps on the final delta, for the timing breakdown.
    times: dict[str, float] = field(default_factory=dict)

    @classmethod
    def from_output(cls, out: RequestOutput, times: dict[str, float] | None = None) -> TokenDelta:
        n_new = len(out.new_token_ids)
        logprobs = out.logprobs[len(out.logprobs) - n_new :] if out.logprobs else None
        return cls(out.request_id, list(out.new_token_ids), out.finish_reason, out.error,
                   logprobs, out.num_cached_tokens, out.prompt_logprobs, times or {})
