"""A request inside one engine: its tokens, its progress as counters, its blocks.

Life of a request in the engine (colocated mode):
  1. WAITING   — queued; holds no blocks (or, after preemption, none any more).
  2. RUNNING   — scheduled each step; ``num_computed_tokens`` grows by the chunk computed.
                 Prefill is done when ``num_computed_tokens >= num_prompt_tokens``; a sample is
                 taken whenever the step computes up to the last known token.
  3. back to WAITING on preemption (blocks freed; recomputed later, prefix cache may help).
  4. one terminal state: FINISHED_STOPPED | FINISHED_LENGTH | FINISHED_ABORTED; blocks freed.
Disaggregated modes add: a prefill worker's request ends with FINISHED_PREFILLED, keeping its
blocks until the KV transfer is done; a decode worker's request waits in WAITING_FOR_KV with
reserved blocks until its KV lands.

A resumed request (its stream moved from a lost worker) starts with the output tokens
already generated elsewhere (``resumed_token_ids``): they are part of ``output_token_ids``
from the start, so counting towards max_tokens / min_tokens, penalties and the seeded random
stream's output index continue where they were, and they are prefilled with the prompt
(like a preempted request's recompute).

A structured-output request carries a ``grammar`` state (``engine.structured``): every
output token goes through ``append_token``, which advances it (resumed tokens are
accepted by the engine when it attaches the state); a recompute appends nothing.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Any

from engine.sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    WAITING_FOR_KV = "waiting_for_kv"
    RUNNING = "running"
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"
    FINISHED_PREFILLED = "prefilled"
    FINISHED_ERROR = "error"

    @property
    def finished(self) -> bool:
        return self in _FINISHED

    @property
    def finish_reason(self) -> str | None:
        return self.value if self.finished else None


_FINISHED = {
    RequestStatus.FINISHED_STOPPED,
    RequestStatus.FINISHED_LENGTH,
    RequestStatus.FINISHED_ABORTED,
    RequestStatus.FINISHED_PREFILLED,
    RequestStatus.FINISHED_ERROR,
}


@dataclass
class Request:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    eos_token_ids: tuple[int, ...] = ()
    arrival_time: float = field(default_factory=time.monotonic)
    prefill_only: bool = False  # stop after the first token, keep blocks (prefill worker)
    # Output tokens generated before this engine saw the request (a resume), in order.
    resumed_token_ids: tuple[int, ...] = ()
    # n > 1: (child id, params) of the siblings to fork once the prompt is computed, before
    # this request's first token may finish it (the scheduler's on_prompt_done).
    siblings: tuple = ()

    # Progress (counters, no flags).
    token_ids: list[int] = field(init=False)  # prompt followed by generated tokens
    num_computed_tokens: int = 0  # tokens whose K/V are in the cache
    num_cached_tokens: int = 0  # prompt tokens served by the prefix cache at first admission
    num_preemptions: int = 0
    status: RequestStatus = RequestStatus.WAITING
    block_ids: list[int] = field(default_factory=list)  # the block table, logical order
    block_hashes: list[int] = field(default_factory=list)  # chained hashes of full blocks
    num_registered_blocks: int = 0  # leading blocks already offered to the prefix cache
    logprobs: list = field(default_factory=list)  # per output token, when requested
    # SamplingParams.prompt_logprobs: one per prompt token computed so far, None first (the
    # first token has no logits before it); complete at num_prompt_tokens entries.
    prompt_logprobs: list = field(default_factory=list)
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    # Structured output: the grammar state (engine.structured.GrammarState: accept(token),
    # is_terminated, error) attached by the engine; None when unconstrained.
    grammar: Any = None
    error: str | None = None  # client-safe message when it ends with FINISHED_ERROR

    def __post_init__(self) -> None:
        self.num_prompt_tokens = len(self.prompt_token_ids)
        self.resumed_token_ids = tuple(self.resumed_token_ids)
        self.token_ids = list(self.prompt_token_ids) + list(self.resumed_token_ids)
        if self.params.prompt_logprobs is not None:
            self.prompt_logprobs = [None]
        # Token ids that end generation once min_tokens are out (EOS unless ignored); the
        # sampler masks them before that.
        stop_ids = set(self.params.stop_token_ids)
        if not self.params.ignore_eos:
            stop_ids.update(self.eos_token_ids)
        self.stop_ids: frozenset[int] = frozenset(stop_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_prefill_tokens(self) -> int:
        """Tokens whose KV the first prefill computes before the first sample here: the
        prompt, plus the resumed output tokens."""
        return self.num_prompt_tokens + len(self.resumed_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def is_finished(self) -> bool:
        return self.status.finished

    def append_token(self, token_id: int) -> None:
        """Add one output token; a constrained request's grammar advances with it."""
        self.token_ids.append(token_id)
        if self.grammar is not None:
            self.grammar.accept(token_id)  # a refusal is reported by check_stop

    def check_stop(self) -> RequestStatus | None:
        """Terminal status implied by the last generated token, if any (strings: elsewhere)."""
        params = self.params
        if self.prefill_only:
            return RequestStatus.FINISHED_PREFILLED
        grammar = self.grammar
        if grammar is not None and grammar.error is not None:
            self.error = grammar.error
            return RequestStatus.FINISHED_ERROR
        n_out = len(self.token_ids) - self.num_prompt_tokens
        if self.token_ids[-1] in self.stop_ids and n_out >= params.min_tokens:
            return RequestStatus.FINISHED_STOPPED
        if grammar is not None and grammar.is_terminated:  # complete, its stop token taken
            return RequestStatus.FINISHED_STOPPED
        if n_out >= params.max_tokens:
            return RequestStatus.FINISHED_LENGTH
        return None
