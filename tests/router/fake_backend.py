"""A controllable ServingBackend for router tests: deterministic tokens, faults by prompt.

Output: the ``reply`` token ids in order, ``tokens_per_step`` per output (coalescing), then
the end-of-sequence id with finish "stop" (unless ignore_eos: the reply repeats); "length"
at max_tokens; "stop" on a stop token id. Faults, keyed by words in the decoded prompt:

  fail      one output, then finish "error" with a KVTransferError (UNAVAILABLE)
  busy      no output: finish "error" at once with ResourceExhaustedError, as the cluster
            backend refuses a request no worker can take (RESOURCE_EXHAUSTED)
  raytrace  no output: finish "error" with a worker's error as Ray wraps it (pid, node IP,
            actor id, file paths and a traceback in the message)
  slow      ``slow_step_s`` between outputs (cancellation and deadlines mid-stream)
  hang      no output at all until aborted

Every abort is recorded; tests on another thread wait for one with ``wait_aborted``.
``stats()["running"]`` counts the requests whose stream has not ended. With
``cleanup_s`` > 0 a stream that ends unfinished awaits that long (the cluster backend's
abort call to its workers) before it forgets the request, as the cluster backend does: a
consumer that cancels the stream again during that await leaks the entry.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable

from cluster.backend import BackendOutput, BackendRequest, ServingBackend, TokenLogprob
from engine.errors import KVTransferError, ResourceExhaustedError, SplitServeError

# str() of a RayTaskError for an InvalidRequestError raised in a decode worker: what reached
# clients before (issue 12, item 6).
RAY_TASK_ERROR_TEXT = (
    "ray::DecodeWorker.reserve() (pid=48213, ip=10.128.0.7, "
    "actor_id=5e4f6b1a2c3d4e5f6a7b8c9d01000000, "
    "repr=<decode_worker.worker.DecodeWorker object at 0x7f3a2b1c4d50>)\n"
    '  File "/home/ops/splitserve/.venv/lib/python3.11/site-packages/ray/_private/worker.py",'
    " line 917, in main_loop\n"
    "    return method(__ray_actor, *args, **kwargs)\n"
    '  File "/home/ops/splitserve/decode_worker/worker.py", line 88, in reserve\n'
    "    self.engine.reserve(request_id, prompt_token_ids, params)\n"
    "engine.errors.InvalidRequestError: prompt token ids must be in [0, 1024) "
    "(namespace=7c1e0d6a-3f6b-4b0e-9d5e-2c7d7f5e9a11, node 10.128.0.7:6379)")

MIGRATED_TIMING = {"migrations": 1.0, "migration": 2.5}
FAKE_TIMING = {"prefill_queue": 0.001, "prefill_compute": 0.002, "kv_transfer": 0.003,
               "decode_queue": 0.004, "decode": 0.005}


class FakeBackend(ServingBackend):
    def __init__(self, decode: Callable[[list[int]], str], reply: list[int],
                 eos_token_id: int, *, tokens_per_step: int = 2, step_s: float = 0.0,
                 slow_step_s: float = 0.2, cleanup_s: float = 0.0,
                 faults: bool = True) -> None:
        self.decode = decode
        self.reply = list(reply)
        self.eos_token_id = eos_token_id
        self.tokens_per_step = tokens_per_step
        self.step_s = step_s
        self.slow_step_s = slow_step_s
        self.cleanup_s = cleanup_s
        self.faults = faults  # False: prompt words trigger nothing (fuzzing: random text)
        self.ready = True
        self.started = False
        self.submitted: list[BackendRequest] = []
        self.aborted: list[str] = []
        self.samples_aborted: list[tuple[str, int]] = []  # (request id, sample index)
        self._abort_events: dict[str, asyncio.Event] = {}
        self._cond = threading.Condition()

    # ---- ServingBackend --------------------------------------------------------------

    async def start(self) -> None:
        self.started = True

    async def shutdown(self) -> None:
        for request_id in list(self._abort_events):
            await self.abort(request_id)

    def is_ready(self) -> bool:
        return self.ready

    @property
    def ready(self) -> bool:
        return self._ready

    @ready.setter
    def ready(self, value: bool) -> None:  # as a real backend reports workers coming and going
        self._ready = value
        self.readiness_may_have_changed()

    def stats(self) -> dict:
        return {"running": len(self._abort_events), "submitted": len(self.submitted)}

    async def abort(self, request_id: str) -> None:
        with self._cond:
            self.aborted.append(request_id)
            self._cond.notify_all()
        event = self._abort_events.get(request_id)
        if event is not None:
            event.set()

    async def abort_sample(self, request_id: str, index: int) -> None:
        self.samples_aborted.append((request_id, index))

    def submit(self, request: BackendRequest) -> AsyncIterator[BackendOutput]:
        self.submitted.append(request)
        self._abort_events[request.request_id] = asyncio.Event()
        return self._run(request)

    # ---- test helpers ----------------------------------------------------------------

    def wait_aborted(self, request_id: str, timeout: float) -> bool:
        """Block (another thread) until ``request_id`` was aborted; False on timeout."""
        with self._cond:
            return self._cond.wait_for(lambda: request_id in self.aborted, timeout)

    def last_request(self, request_id: str) -> BackendRequest:
        return next(r for r in reversed(self.submitted) if r.request_id == request_id)

    # ---- the fake engine -------------------------------------------------------------

    async def _run(self, req: BackendRequest) -> AsyncIterator[BackendOutput]:
        rid = req.request_id
        prompt = self.decode(req.prompt_token_ids) if self.faults else ""
        aborted = self._abort_events[rid]
        finished = False
        try:
            if "busy" in prompt or "raytrace" in prompt:
                finished = True
                error = (ResourceExhaustedError("decode workers have no free KV blocks; retry "
                                                "later") if "busy" in prompt
                         else SplitServeError(RAY_TASK_ERROR_TEXT))
                yield BackendOutput(rid, [], "error", error=error)
                return
            step_s = self.slow_step_s if "slow" in prompt else self.step_s
            if "hang" in prompt:
                step_s = None  # wait for the abort, however long
            produced: list[int] = []
            while True:
                if await _aborted_within(aborted, step_s):
                    finished = True
                    yield self._final(req, [], "abort")
                    return
                if "fail" in prompt and produced:
                    finished = True
                    yield BackendOutput(rid, [], "error", error=KVTransferError(
                        "fake KV transfer failed: peer died"))
                    return
                ids, finish = self._step(req, produced)
                produced += ids
                if finish is not None:
                    finished = True
                    final = self._final(req, ids, finish)
                    if "migrated" in prompt:  # as the cluster backend's after a worker died
                        final.timing.update(MIGRATED_TIMING)
                    yield final
                    return
                yield BackendOutput(rid, ids, logprobs=self._logprobs(req, ids),
                                    num_prompt_tokens=len(req.prompt_token_ids))
        finally:
            if not finished and self.cleanup_s > 0:
                await asyncio.sleep(self.cleanup_s)  # the cluster backend's abort RPCs
            self._abort_events.pop(rid, None)

    def _step(self, req: BackendRequest, produced: list[int]) -> tuple[list[int], str | None]:
        p = req.params
        ids: list[int] = []
        for _ in range(self.tokens_per_step):
            i = len(produced) + len(ids)
            if i < len(self.reply):
                token = self.reply[i]
            elif p.ignore_eos:
                token = self.reply[i % len(self.reply)]
            else:
                token = self.eos_token_id
            ids.append(token)
            stops = token == self.eos_token_id and not p.ignore_eos
            if (stops or token in p.stop_token_ids) and i + 1 >= p.min_tokens:
                return ids, "stop"
            if i + 1 >= p.max_tokens:
                return ids, "length"
        return ids, None

    def _logprobs(self, req: BackendRequest, ids: list[int]) -> list[TokenLogprob] | None:
        n = req.params.logprobs
        if n is None:
            return None
        return [TokenLogprob(t, -0.5, [(t, -0.5), (t + 1, -1.5), (t + 2, -2.5)][:n])
                for t in ids]

    def _final(self, req: BackendRequest, ids: list[int], finish: str) -> BackendOutput:
        return BackendOutput(req.request_id, ids, finish, logprobs=self._logprobs(req, ids),
                             num_prompt_tokens=len(req.prompt_token_ids),
                             num_cached_tokens=len(req.prompt_token_ids) // 2,
                             timing=dict(FAKE_TIMING))


async def _aborted_within(event: asyncio.Event, seconds: float | None) -> bool:
    """True if ``event`` is set within ``seconds`` (None: wait for it; 0: just yield)."""
    if seconds is None:
        await event.wait()
        return True
    if seconds <= 0:
        await asyncio.sleep(0)
        return event.is_set()
    try:
        await asyncio.wait_for(event.wait(), seconds)
        return True
    except asyncio.TimeoutError:
        return False
