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

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None
