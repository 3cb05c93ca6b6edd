"""One request in flight through the cluster, across the attempts that serve it.

A request is served by one *attempt* at a time: a (prefill, decode) placement with a
worker-side request id of its own. When a worker of the attempt dies (or its KV transfer
fails) the request *migrates*: the attempt is aborted on whatever is left of it, and a new
attempt re-prefills the prompt plus every token already streamed to the client on a healthy
pair, continuing at the next output position. The client sees one stream with no token
missing or repeated:

    attempt 0   prompt                    -> t0 t1 t2   (decode worker dies)
    attempt 1   prompt + [t0 t1 t2]       -> t3 t4 ...  (same tokens an undisturbed run gives)

Worker-side ids are unique per attempt (``AttemptIds``: ``rid#0.<tag>``, ``rid#1.<tag>``,
...), so a late delta of an abandoned attempt can never reach the new one's stream, and a
late call of an ended request can never act on a later request that reuses its id.

n > 1: the first attempt serves every sample: one prefill, one KV transfer, and the decode
worker forks the samples (``rid/1``, ``rid/2``, ...) from the same blocks. If it fails, each
unfinished sample goes on as a request of its own (a child flight ``rid.i``, with the
sample's seed and the tokens it already streamed): the samples no longer share KV then,
but every stream continues exactly.
"""

from __future__ import annotations

import asyncio
import itertools
import secrets
from dataclasses import dataclass, field

from cluster.backend import BackendRequest

# Why an attempt ended early; each has its own counter (metrics, timing breakdown).
MIGRATION_KINDS = ("prefill", "decode", "transfer")


class Migrate(Exception):
    """Internal: the current attempt cannot finish; serve the request on another."""

    def __init__(self, kind: str, why: str) -> None:
        super().__init__(why)
        self.kind = kind


class AttemptIds:
    """Worker-side request ids: ``{request id}#{attempt}.{tag}``, the tag unique to this
    backend (a random prefix, then a serial number). A client may reuse a request id once
    its request has ended, while a call of the old one is still on its way to a worker (a
    reserve, a prefill or an abort in flight; a threaded Ray actor runs calls in any order):
    under the client's id it would act on the new request (refuse it as "already in use",
    abort it, or land the old prompt's KV in its blocks). The prefix keeps the ids of two
    routers that share workers, or of a restarted one, apart too."""

    def __init__(self) -> None:
        self._prefix = secrets.token_hex(3)
        self._serial = itertools.count()

    def new(self, request_id: str, attempt: int) -> str:
        return f"{request_id}#{attempt}.{self._prefix}{next(self._serial):x}"


@dataclass
class Attempt:
    """One placement of the request: where it runs and what it has reached there."""

    worker_rid: str
    prefill_id: str | None = None
    decode_id: str | None = None
    # "placing" -> "prefill" (waiting for the first token) -> "kv" (first token out, decode
    # side waiting for the KV) -> "decode" (decode worker streaming)
    phase: str = "placing"
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    members: dict[str, int] = field(default_factory=dict)  # worker-side id -> sample index
    times: dict[str, float] = field(default_factory=dict)  # its prefill's wall-clock stamps

    def __post_init__(self) -> None:
        self.members.setdefault(self.worker_rid, 0)

    def workers(self) -> tuple[str, ...]:
        return tuple(w for w in (self.prefill_id, self.decode_id) if w is not None)


@dataclass
class Flight:
    """Per-request state in the cluster backend (one record instead of parallel dicts)."""

    req: BackendRequest
    attempt: Attempt
    outputs: dict[int, list[int]] = field(default_factory=dict)  # sample -> tokens streamed
    finished: set[int] = field(default_factory=set)  # samples whose final output went out
    children: list[Flight] = field(default_factory=list)  # n > 1 after a failed attempt
    migrations: dict[str, int] = field(default_factory=lambda: dict.fromkeys(MIGRATION_KINDS, 0))
    timing: dict[str, float] = field(default_factory=dict)  # wall-clock stamps
    migration_s: float = 0.0  # time spent between an attempt's failure and the next one's start
    last_token_time: float | None = None  # for the autoscaler's ITL samples

    @property
    def request_id(self) -> str:
        return self.req.request_id

    @property
    def generated(self) -> list[int]:
        """The tokens of sample 0 streamed to the client (the whole request when n == 1)."""
        return self.outputs.setdefault(0, [])

    def done(self) -> bool:
        return len(self.finished) >= self.req.n

    @property
    def num_migrations(self) -> int:
        return sum(self.migrations.values())

    def next_attempt(self, ids: AttemptIds) -> Attempt:
        self.attempt = Attempt(ids.new(self.request_id, self.num_migrations))
        return self.attempt

    def placement_tokens(self) -> list[int]:
        """What the current attempt prefills: the prompt plus every token already streamed
        (the global scheduler places on these; the workers get them apart, the streamed
        ones as ``output_token_ids``, so they count as output: max_tokens, penalties and
        the seeded random stream continue where they were)."""
        return list(self.req.prompt_token_ids) + self.generated

    def remaining_tokens(self) -> int:
        return self.req.params.max_tokens - len(self.generated)
