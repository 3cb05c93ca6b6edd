"""The request lifecycle shared by the gRPC and HTTP edges.

Life of a request in the router:
  1. prepare   check the model name (NOT_FOUND), every client field's size and form (request
               id, valid Unicode, prompt length: INVALID_ARGUMENT naming the field), readiness
               (UNAVAILABLE) and capacity (RESOURCE_EXHAUSTED); tokenize (large prompts on the
               tokenizer threads, so the event loop keeps streaming); check the token ids
               against the model's vocabulary, the context and the sampling values. Holds
               nothing afterwards, so an edge can answer an HTTP error before streaming starts.
  2. admit     at most ``max_inflight_requests`` in flight (RESOURCE_EXHAUSTED beyond); the
               requests being prepared count too, so tokenization work is bounded as well.
  3. submit    hand a BackendRequest to the ServingBackend.
  4. stream    each BackendOutput -> RequestState -> GenerateChunk (text deltas, stop
               strings). A matched stop string ends the request at once ("stop"). With
               n > 1 samples (``BackendOutput.index`` / ``GenerateChunk.index``) the request
               ends when every sample has its final chunk.
  5. end       exactly one terminal event: the final chunk (stop | length | abort) or an
               exception (backend error, DEADLINE_EXCEEDED, the consumer cancelling).
               On every exit path where the backend has not finished the request, the
               router aborts it there; the admission slot is released; the outcome is counted.

Consumers must close the stream when they stop early (``contextlib.aclosing``), or let
cancellation of their task reach it; both run step 5. Step 5's backend clean-up (abort, then
closing the backend's stream) runs in a task of its own: an HTTP disconnect cancels the
consumer's task again at every await (anyio's cancel scopes), which used to cut the clean-up
short and leave the backend's entry for the request behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor

from cluster.backend import BackendOutput, BackendRequest, ServingBackend
from engine.errors import (
    DeadlineExceededError,
    NotFoundError,
    ResourceExhaustedError,
    SplitServeError,
    UnavailableError,
)
from router.config import RouterConfig
from router.errors import InvalidParamError, outcome_code
from router.metrics import ServingMetrics
from router.request_state import RequestState
from router.types import (
    GenerateChunk,
    GenerateInput,
    ModelCard,
    ModelInfo,
    PreparedRequest,
    merge_samples,
)
from router.validation import (
    build_prepared,
    check_input,
    check_request_id,
    check_token_ids,
    prompt_chars,
    tokenize_prompt,
)

logger = logging.getLogger(__name__)

# After draining, the aborted requests' final chunks get this long to reach their clients.
ABORT_DELIVERY_S = 5.0
_SHUTTING_DOWN = ("this server is shutting down and takes no new requests; retry (another "
                  "replica will take it)")

# Prompts up to this many characters are tokenized on the event loop: that takes less
# (~0.1 ms) than handing the work to a thread and back.
INLINE_TOKENIZE_CHARS = 4096


class GenerationService:
    """Validates, admits and streams requests through a ServingBackend."""

    def __init__(self, backend: ServingBackend, tokenizer, config: RouterConfig | None = None,
                 metrics: ServingMetrics | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.backend = backend
        self.tokenizer = tokenizer
        self.config = config if config is not None else RouterConfig()
        self.metrics = metrics if metrics is not None else ServingMetrics()
        self._clock = clock
        self._inflight: set[str] = set()
        # Ids of ended requests whose backend clean-up (abort on the workers) still runs: the
        # backend and its workers know requests by id until then, so a new request with the
        # same id (a retry, or another client's) would be hit by the old one's abort.
        self._releasing: set[str] = set()
        self._preparing = 0  # requests in prepare(): they hold tokenizer time and memory
        self._cleanups: set[asyncio.Task] = set()  # step 5's backend clean-ups still running
        self._tokenize_pool = ThreadPoolExecutor(self.config.tokenizer_threads,
                                                 thread_name_prefix="router-tokenize")
        self._created = int(clock())
        # Draining (shutdown): new requests are refused and readiness is down, while those in
        # flight go on; ``_idle`` is set whenever none is (what ``drain`` awaits). Once
        # ``_closed``, not even a request prepared before the drain is admitted: a 503
        # before its response starts, never a stream the stopping servers would cut.
        self._draining = False
        self._closed = False
        self._idle = asyncio.Event()
        self._idle.set()
        self._readiness_watchers: set[Callable[[], None]] = set()

    # ---- service-level ---------------------------------------------------------------

    async def start(self) -> None:
        await self.backend.start()

    async def drain(self, timeout_s: float, give_up: asyncio.Event | None = None) -> int:
        """Graceful shutdown's first half: refuse new requests (UNAVAILABLE: a client retries
        on another replica) and report not ready (/health 503, gRPC NOT_SERVING), let the
        requests in flight finish for up to ``timeout_s`` (or until ``give_up`` is set: a
        second Ctrl-C), then abort the rest, whose streams end with "abort", and wait for
        those final chunks to go out. Returns how many were aborted."""
        self._draining = True
        for callback in list(self._readiness_watchers):
            callback()
        waits = [asyncio.ensure_future(self._idle.wait())]
        if give_up is not None:
            waits.append(asyncio.ensure_future(give_up.wait()))
        try:
            await asyncio.wait(waits, timeout=max(timeout_s, 0.0),
                               return_when=asyncio.FIRST_COMPLETED)
        finally:
            for wait in waits:
                wait.cancel()
        self._closed = True  # a request prepared by now is refused at admission (a 503)
        left = await self._abort_in_flight()
        if left:
            logger.warning("shutdown: %d request(s) still in flight after draining; aborted "
                           "them", left)
        with contextlib.suppress(asyncio.TimeoutError):  # their final chunks, on their way
            await asyncio.wait_for(self._idle.wait(), ABORT_DELIVERY_S)
        return left

    async def shutdown(self) -> None:
        """Abort every in-flight request (their streams end with "abort"), then the backend."""
        await self._abort_in_flight()
        await asyncio.gather(*self._cleanups, return_exceptions=True)
        await self.backend.shutdown()
        self._tokenize_pool.shutdown(wait=False, cancel_futures=True)

    async def _abort_in_flight(self) -> int:
        """Abort every request in flight (their streams end with "abort"); how many."""
        left = list(self._inflight)
        for request_id in left:
            await self.backend.abort(request_id)
        return len(left)

    def is_ready(self) -> bool:
        return not self._draining and self.backend.is_ready()

    def watch_readiness(self, callback: Callable[[], None]) -> Callable[[], None]:
        """See ``ServingBackend.watch_readiness``; draining is reported too."""
        unwatch = self.backend.watch_readiness(callback)
        self._readiness_watchers.add(callback)

        def stop() -> None:
            self._readiness_watchers.discard(callback)
            unwatch()
        return stop

    @property
    def num_inflight(self) -> int:
        return len(self._inflight)

    def is_inflight(self, request_id: str) -> bool:
        return request_id in self._inflight

    def list_models(self) -> list[ModelCard]:
        return [ModelCard(self.config.model_name, self.config.owned_by, self._created,
                          self.config.max_model_len)]

    def resolve_model(self, name: str) -> ModelCard:
        """The card of ``name`` ("" = the default model); NOT_FOUND for any other name."""
        card = self.list_models()[0]
        if name and name != card.id:
            raise NotFoundError(f"model {name!r} does not exist; this server serves {card.id!r}"
                                " (see /v1/models or ListModels)")
        return card

    def model_info(self, name: str = "") -> ModelInfo:
        card = self.resolve_model(name)
        return ModelInfo(card, int(self.tokenizer.vocab_size),
                         tuple(self.tokenizer.eos_token_ids), self.is_ready())

    async def abort(self, request_id: str) -> bool:
        """Abort an in-flight request; its stream ends with "abort". False if unknown;
        INVALID_ARGUMENT for an id no request can have (as Generate refuses it)."""
        check_request_id(request_id)
        if request_id not in self._inflight:
            return False
        await self.backend.abort(request_id)
        return True

    # ---- one request -----------------------------------------------------------------

    async def prepare(self, inp: GenerateInput) -> PreparedRequest:
        """Step 1. Raises a classified error (and counts it) when the request is refused."""
        now = self._clock()
        try:
            self.resolve_model(inp.model)
            check_input(inp, self.config)
            request_id = inp.request_id or f"req-{uuid.uuid4().hex}"
            if request_id in self._inflight or request_id in self._releasing:
                raise _duplicate_id(request_id)
            if self._draining:
                raise UnavailableError(_SHUTTING_DOWN)
            if not self.backend.can_accept():  # a lost worker's replacement: wait for it
                raise UnavailableError("no worker is ready to serve requests yet; retry later")
            self._check_capacity()
            self._preparing += 1
            try:
                prompt = await self._tokenize(inp)
            finally:
                self._preparing -= 1
            prep = build_prepared(inp, request_id, prompt, self.config, now)
            check_token_ids(prep.params, int(self.tokenizer.vocab_size))
            return prep
        except (SplitServeError, ValueError) as exc:
            self.metrics.requests.labels(code=outcome_code(exc)).inc()
            raise

    async def _tokenize(self, inp: GenerateInput) -> tuple[list[int], str]:
        if prompt_chars(inp) <= INLINE_TOKENIZE_CHARS:
            return tokenize_prompt(inp, self.tokenizer)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._tokenize_pool, tokenize_prompt, inp,
                                          self.tokenizer)

    async def generate(self, inp: GenerateInput) -> AsyncIterator[GenerateChunk]:
        """prepare + stream, for callers that need no error before the first chunk."""
        prep = await self.prepare(inp)
        async with contextlib.aclosing(self.stream(prep)) as chunks:
            async for chunk in chunks:
                yield chunk

    async def complete(self, prep: PreparedRequest) -> list[GenerateChunk]:
        """Run a prepared request to the end: one merged chunk per sample, in sample order."""
        chunks = [c async for c in self.stream(prep)]
        return merge_samples(chunks)

    async def stream(self, prep: PreparedRequest) -> AsyncIterator[GenerateChunk]:
        """Steps 2-5 for a prepared request: yields chunks, the last one final."""
        self._admit(prep.request_id)
        state = RequestState(prep, self.tokenizer, self.metrics, self._clock)
        outputs: _BackendStream | None = None
        backend_done = False
        ended: set[int] = set()  # samples the backend has finished
        error: BaseException | None = None
        try:
            outputs = _BackendStream(aiter(self.backend.submit(_backend_request(prep))))
            state.on_submit()
            while not state.finished:
                out = await self._next_output(outputs, prep.deadline)
                if out.finish_reason is not None:
                    ended.add(out.index)
                backend_done = len(ended) == prep.n
                if out.finish_reason == "error":
                    raise _backend_error(out)
                chunk = state.process(out)
                if (chunk is not None and chunk.finish_reason is not None
                        and out.finish_reason is None and not state.finished):
                    # n > 1: a stop string ended this sample here; end it on the workers
                    # too (the request's other samples go on).
                    self._background(self.backend.abort_sample(prep.request_id, out.index))
                if chunk is not None:
                    yield chunk
                if backend_done and not state.finished:
                    raise SplitServeError("the backend ended the request without a final chunk")
        except BaseException as exc:
            error = exc
            raise
        finally:
            self._inflight.discard(prep.request_id)
            if not self._inflight:
                self._idle.set()
            state.on_end(error)
            await self._release(prep.request_id, outputs, backend_done)

    # ---- helpers ---------------------------------------------------------------------

    def _check_capacity(self, preparing: int | None = None) -> None:
        limit = self.config.max_inflight_requests
        busy = len(self._inflight) + (self._preparing if preparing is None else preparing)
        if busy >= limit:
            raise ResourceExhaustedError(
                f"the server is at its limit of {limit} requests in flight; retry later")

    def _admit(self, request_id: str) -> None:
        try:
            if self._closed:
                raise UnavailableError(_SHUTTING_DOWN)
            if request_id in self._inflight or request_id in self._releasing:
                raise _duplicate_id(request_id)
            self._check_capacity(preparing=0)  # the requests being prepared come later
        except SplitServeError as exc:
            self.metrics.requests.labels(code=exc.code).inc()
            raise
        self._inflight.add(request_id)
        self._idle.clear()

    async def _next_output(self, outputs: _BackendStream,
                           deadline: float | None) -> BackendOutput:
        try:
            if deadline is None:
                return await outputs.next(None)
            remaining = deadline - self._clock()
            if remaining <= 0:
                raise asyncio.TimeoutError
            return await outputs.next(remaining)
        except asyncio.TimeoutError:
            raise DeadlineExceededError("the request's deadline passed before it finished; "
                                        "it was aborted") from None
        except StopAsyncIteration:
            raise SplitServeError("the backend stream ended without a final output") from None

    async def _release(self, request_id: str, outputs: _BackendStream | None,
                       backend_done: bool) -> None:
        """Abort the backend request unless it finished there, then close its stream, in a
        task of its own: cancelling this one (again and again, as anyio does) cannot cut
        it short."""
        if outputs is None:
            return
        abort = None if backend_done else (lambda: self.backend.abort(request_id))
        task = self._background(outputs.close(abort))
        if abort is not None:  # the id stays taken until the backend has forgotten it
            self._releasing.add(request_id)
            task.add_done_callback(lambda _: self._releasing.discard(request_id))
        await asyncio.shield(task)

    def _background(self, coro) -> asyncio.Task:
        """Run a backend clean-up as a task of its own, held until done (the loop keeps
        only weak references to tasks)."""
        task = asyncio.get_running_loop().create_task(coro)
        self._cleanups.add(task)
        task.add_done_callback(self._cleanups.discard)
        return task

    @property
    def num_cleanups(self) -> int:
        """Backend clean-ups of ended requests still running (0 when the router is idle)."""
        return len(self._cleanups)


class _BackendStream:
    """A backend's output stream for one request, read so that cancelling the reader never
    reaches the backend's generator: each read runs as a task of its own and the reader
    waits on it shielded. The generator sees one cancellation at most, from ``close``, in a
    task nobody else cancels, so its clean-up (finally blocks that await) runs to the end."""

    def __init__(self, outputs: AsyncIterator[BackendOutput]) -> None:
        self._outputs = outputs
        self._step: asyncio.Future | None = None  # the read in progress

    async def next(self, timeout: float | None) -> BackendOutput:
        """The next output; ``asyncio.TimeoutError`` after ``timeout`` seconds (the read
        goes on, for ``close`` to end)."""
        if self._step is None:
            self._step = asyncio.ensure_future(anext(self._outputs))
        step = self._step
        try:
            if timeout is None:
                return await asyncio.shield(step)
            return await asyncio.wait_for(asyncio.shield(step), timeout)
        finally:
            if step.done():
                self._step = None

    async def close(self, abort: Callable[[], Awaitable[None]] | None) -> None:
        """Abort (when given), end a read in progress, then close the stream."""
        try:
            if abort is not None:
                await abort()
        finally:
            if self._step is not None:
                self._step.cancel()
                await asyncio.gather(self._step, return_exceptions=True)
            aclose = getattr(self._outputs, "aclose", None)
            if aclose is not None:
                await aclose()


def _backend_request(prep: PreparedRequest) -> BackendRequest:
    return BackendRequest(request_id=prep.request_id, prompt_token_ids=prep.prompt_token_ids,
                          params=prep.params, arrival_time=prep.arrival_time,
                          deadline=prep.deadline, n=prep.n)


def _backend_error(out: BackendOutput) -> BaseException:
    if isinstance(out.error, SplitServeError):
        return out.error
    if out.error is not None:
        logger.error("request %s failed in the backend", out.request_id, exc_info=out.error)
    return SplitServeError(f"request {out.request_id} failed in the backend")


def _duplicate_id(request_id: str) -> SplitServeError:
    return InvalidParamError(f"request_id {request_id!r} is already in flight (or its "
                             "cancellation is still being cleaned up); ids must be unique "
                             "among running requests", "request_id")
