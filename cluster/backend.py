"""The contract between the router and whatever executes requests.

The router speaks only this interface; it never sees Ray, workers or tensors. Two
implementations exist: a colocated single-engine backend (the baseline, and what tests use
when they are not about disaggregation) and the disaggregated Ray cluster backend.

Life of a request as the router sees it:
  1. ``submit(request)`` returns an async iterator of ``BackendOutput``.
  2. Each item carries the token ids produced since the previous item (coalesced per engine
     step, never one message per token when several are ready).
  3. Exactly one item has ``finish_reason`` set; it is the last one. Failures end the stream
     with ``finish_reason == "error"`` and ``error`` set (a ``RequestError``), never a hang.
     With ``n > 1`` each item carries its sample's ``index``: exactly one item per index has
     ``finish_reason`` set, and the stream ends after the last of them.
  4. ``abort(request_id)`` frees the request's resources everywhere; the stream then ends
     with ``finish_reason == "abort"``.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from engine.sampling_params import SamplingParams


@dataclass(frozen=True)
class BackendRequest:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival_time: float  # time.time() when the router accepted the request
    deadline: float | None = None  # absolute time.time() after which the request is aborted
    n: int = 1  # samples of the prompt (sample i uses seed + i when seeded); share its KV


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)  # (token id, logprob), best first


# A migrated request's timing also carries how many times it moved: a count, in no phase
# (its seconds between attempts are the "migration" entry).
MIGRATION_COUNT = "migrations"
MIGRATION_TIMING = (MIGRATION_COUNT, "migration")  # only a migrated request's timing has these


@dataclass
class BackendOutput:
    request_id: str
    new_token_ids: list[int]  # tokens produced since the previous output
    finish_reason: str | None = None  # None while running; "stop" | "length" | "abort" | "error"
    logprobs: list[TokenLogprob] | None = None  # one per new token when requested
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache
    # Timing breakdown in seconds, filled on the final output (keys: router_queue,
    # prefill_queue, prefill_compute, kv_transfer, decode_queue, decode; a migrated
    # request's also migration and MIGRATION_COUNT).
    timing: dict[str, float] = field(default_factory=dict)
    error: Exception | None = None  # set when finish_reason == "error"
    index: int = 0  # which of the request's n samples this output belongs to
    # SamplingParams.prompt_logprobs, on the first output: per prompt token (None first) its
    # logprob, rank and top alternatives (engine.batch.TokenLogprobs)
    prompt_logprobs: list | None = None


def sample_params(params: SamplingParams, index: int) -> SamplingParams:
    """The parameters of sample ``index`` of an n > 1 request: seeded requests use
    ``seed + index`` (so sample i equals the same request run alone with seed + i)."""
    if index == 0 or params.seed is None:
        return params
    return dataclasses.replace(params, seed=(params.seed + index) % 2**63)


class ServingBackend(ABC):
    """Executes tokenized requests. Implementations are safe to call from one asyncio loop."""

    @abstractmethod
    async def start(self) -> None:
        """Bring the backend up (load models, start workers). Idempotent."""

    @abstractmethod
    async def shutdown(self) -> None:
        """Abort everything in flight and release all resources."""

    @abstractmethod
    def submit(self, request: BackendRequest) -> AsyncIterator[BackendOutput]:
        """Start a request and stream its outputs (see the module docstring)."""

    @abstractmethod
    async def abort(self, request_id: str) -> None:
        """Abort a request if it is still running; a no-op otherwise."""

    @abstractmethod
    async def abort_sample(self, request_id: str, index: int) -> None:
        """n > 1: end sample ``index`` of a running request (the router matched a stop
        string in it) and free what only it holds; the request's other samples go on, and
        the sample's final output ("abort") follows. A no-op if the sample already ended,
        or cannot end alone yet (its KV is still arriving: it then runs to its end and the
        router drops its outputs)."""

    @abstractmethod
    def is_ready(self) -> bool:
        """True when at least one worker of each needed role can take requests."""

    def can_accept(self) -> bool:
        """True when a new request may be submitted: ready now, or a lost worker's
        replacement is on its way (the request then waits for it, within its deadline)."""
        return self.is_ready()

    def watch_readiness(self, callback: Callable[[], None]) -> Callable[[], None]:
        """Call ``callback`` whenever ``is_ready()`` may have changed (from the thread that
        changed it; keep it short); returns the function that stops the watch."""
        watchers = self.__dict__.setdefault("_readiness_watchers", [])
        watchers.append(callback)
        return lambda: watchers.remove(callback) if callback in watchers else None

    def readiness_may_have_changed(self) -> None:
        """Backends call this when what ``is_ready`` reads changes (workers join, leave,
        start draining)."""
        for callback in list(self.__dict__.get("_readiness_watchers", ())):
            callback()

    @abstractmethod
    def stats(self) -> dict:
        """A JSON-able snapshot for /health and debugging (pools, queue lengths, free blocks)."""
