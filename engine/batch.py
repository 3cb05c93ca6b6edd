"""The contract of one engine step: scheduler → model runner → scheduler.

``SchedulerOutput`` says which requests run and how many of their tokens are computed; the
runner turns it into tensors and returns ``ModelRunnerOutput``. Both are plain dataclasses
(no torch) so the scheduler stays testable with hand-built runner outputs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from engine.request import Request


@dataclass(slots=True)
class ScheduledRequest:
    request: Request
    # Tokens computed this step: token_ids[start : start + num_new_tokens], where start is
    # request.num_computed_tokens at scheduling time.
    num_new_tokens: int
    start: int
    # True when this chunk reaches the request's last known token: a token is sampled.
    sample: bool


@dataclass
class SchedulerOutput:
    # Decodes (exactly one new token each) first, then prefill chunks: the attention layout.
    scheduled: list[ScheduledRequest]
    num_decodes: int  # leading entries of ``scheduled`` with num_new_tokens == 1
    num_batched_tokens: int  # sum of num_new_tokens (≤ max_num_batched_tokens)
    preempted: list[Request] = field(default_factory=list)  # preempted while scheduling

    @property
    def is_empty(self) -> bool:
        return not self.scheduled

    @property
    def num_samples(self) -> int:
        return sum(1 for s in self.scheduled if s.sample)


@dataclass
class TokenLogprobs:
    logprob: float  # log-probability of the chosen token
    top: list[tuple[int, float]]  # top-n (token id, logprob), most likely first
    rank: int | None = None  # the chosen token's rank (1 = most likely); prompt logprobs only


@dataclass
class ModelRunnerOutput:
    # One sampled token per scheduled request with sample=True, in scheduling order.
    sampled_token_ids: list[int]
    # Parallel to sampled_token_ids; None entries where logprobs were not requested.
    logprobs: list[TokenLogprobs | None] | None = None
    # Prompt logprobs computed this step: request id -> (first position, entries), entry i
    # for prompt token first + i (scored by the logits of the token before it).
    prompt_logprobs: dict[str, tuple[int, list[TokenLogprobs]]] = field(default_factory=dict)
