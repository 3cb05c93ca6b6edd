"""PrefillWorker: an Engine in prefill-only mode that ships each prompt's KV to a decode worker.

Life of a request on the prefill side:
  1. ``prefill()`` — the router sends the prompt, the chosen decode worker's endpoint and the
     block ids that worker reserved for it.
  2. WAITING → RUNNING in the engine's continuous batch: chunked prefill alongside other
     prompts; cached prefix blocks are skipped (the prefix cache is on). When the last chunk
     is scheduled the source blocks are final: the transfer is announced to the decode
     worker (``KVSender.announce``: it posts its receives during that forward pass).
  3. The last chunk samples the first token: the request ends FINISHED_PREFILLED, keeping its
     blocks, and ``prefill()`` returns that token at once (TTFT does not wait for the
     transfer: a step's first tokens are all answered before its payloads are written).
  4. The request's blocks are pushed to the decode worker (push model: KVSender).
  5. Transfer done or failed → the blocks are released; their full blocks stay in the
     prefix cache (evictable) for later prompts.
  Abort at any point frees the blocks (a send already on the wire finishes first); an abort
  that overtook its ``prefill()`` call makes that call fail at once, unrun. A failure
  (bad request, engine error) raises from ``prefill()`` with a client-safe message. Every
  path that ends a request without sending its KV withdraws the announcement
  (``KVSender.abort``).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from concurrent.futures import Future
from dataclasses import dataclass, field

from engine.batch import TokenLogprobs
from engine.engine_host import EngineHost, HostedWorker
from engine.errors import InvalidRequestError, SplitServeError
from engine.outputs import RequestOutput
from engine.sampling_params import SamplingParams
from kv_transfer.base import Endpoint, TransferConfig, TransferHandle
from kv_transfer.group import GroupSender

log = logging.getLogger(__name__)

# An abort can overtake the prefill() call it was sent after (a threaded Ray actor runs
# calls concurrently): that call would run the whole prefill and ship KV nobody expects. So
# an abort of an id this worker has not seen is remembered, and refuses the call when it
# comes (once). Ids seen are remembered too, so that an abort after the prefill (a client
# cancelling while it decodes) leaves nothing behind: a client may reuse its request id.
# The cluster aborts a prefill worker only once the call was sent.
ABORTED_REMEMBERED = 4096
SEEN_REMEMBERED = 16384


@dataclass
class PrefillResult:
    request_id: str
    first_token: int
    logprob: TokenLogprobs | None
    num_cached_tokens: int
    finish_reason: str | None  # "stop"/"length" when the first token already ends it
    times: dict[str, float] = field(default_factory=dict)  # wall-clock stamps
    # SamplingParams.prompt_logprobs: one per prompt token, None first (computed here)
    prompt_logprobs: list[TokenLogprobs | None] | None = None


class PrefillFailed(SplitServeError):
    """The prefill side could not produce the first token."""

    code = "INTERNAL"


class PrefillWorker(HostedWorker):
    role = "prefill"

    def __init__(self, worker_id: str, model_dir: str, engine_options: dict | None = None,
                 transfer_config: TransferConfig | None = None, **sender_kwargs) -> None:
        self.worker_id = worker_id
        # request id -> (future, peer, reserved ids, time stamps, params, ship_always)
        self._pending: dict[str, tuple[Future, Endpoint, list[int], dict, SamplingParams,
                                       bool]] = {}
        self._lock = threading.Lock()
        self._aborted_first: OrderedDict[str, None] = OrderedDict()  # see ABORTED_REMEMBERED
        self._seen: OrderedDict[str, None] = OrderedDict()
        self.host = EngineHost(worker_id, self.role, model_dir, engine_options or {},
                               self._on_outputs)
        self.transfer_config = transfer_config or TransferConfig()
        engine = self.host.engine
        # One sender per tensor-parallel rank, each shipping its own KV heads (one rank:
        # today's sender, unchanged); see kv_transfer.group.
        self.sender = GroupSender(
            self.transfer_config, engine.runner.kv_cache, worker_id,
            engine.kv_heads_of_ranks(), engine.model_config.num_kv_heads,
            call_ranks=self.host.call_ranks,
            kv_scales=(engine.cache_config.k_scale, engine.cache_config.v_scale), **sender_kwargs)
        self.num_transfers_failed = 0
        self.host.engine.on_last_chunk_scheduled = self._announce

    def kv_heads(self) -> list[tuple[int, int]]:
        """The KV heads each of this worker's tensor-parallel ranks holds (the decode side
        plans its receives from them: ``DecodeWorker.reserve(source_heads=)``)."""
        return self.host.engine.kv_heads_of_ranks()

    # -- called by the router (Ray actor methods) -------------------------------------------
    def prefill(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                peer: Endpoint, dst_block_ids: list[int], timeout_s: float | None = None,
                output_token_ids: list[int] = (), ship_always: bool = False) -> PrefillResult:
        """Prefill, return the first token, and ship the KV to ``peer`` in the background.
        ``output_token_ids``: a resumed request's tokens already streamed (prefilled after
        the prompt; the token returned is the one after them). ``ship_always``: ship the KV
        even when that token ends the request (n > 1: its siblings decode from it)."""
        self.host.engine.precompile(params)  # here, not on the engine thread
        future: Future = Future()
        times = {"prefill_arrival": time.time()}
        with self._lock:
            if self._aborted_first.pop(request_id, False) is None:
                raise PrefillFailed(f"request {request_id} was aborted")
            _remember(self._seen, request_id, SEEN_REMEMBERED)
            self._pending[request_id] = (future, peer, list(dst_block_ids), times, params,
                                         ship_always)
        try:
            self.host.call(_add_prefill, request_id, prompt_token_ids, params,
                           tuple(output_token_ids))
        except Exception:
            with self._lock:
                self._pending.pop(request_id, None)
            self.sender.abort(request_id)
            raise
        return future.result(timeout_s)

    def abort(self, request_id: str) -> bool:
        with self._lock:
            pending = self._pending.pop(request_id, None)
            if pending is None and request_id not in self._seen:  # its prefill() is to come
                _remember(self._aborted_first, request_id, ABORTED_REMEMBERED)
        aborted = self.sender.abort(request_id)
        self.host.call(lambda engine: engine.abort(request_id))
        if pending is not None:
            pending[0].set_exception(PrefillFailed(f"request {request_id} was aborted"))
        return pending is not None or aborted

    def shutdown(self) -> None:
        self.sender.close()
        self.host.shutdown()

    # -- on the engine thread -----------------------------------------------------------------
    def _announce(self, request) -> None:
        """The last chunk of ``request`` is scheduled: announce its transfer (the receiver
        posts its receives while this step computes the KV)."""
        with self._lock:  # atomic with abort's pop: an announcement it missed would linger
            pending = self._pending.get(request.request_id)
            if pending is None:
                return  # aborted meanwhile
            try:
                src = self.host.engine.prompt_block_ids(request)
                self.sender.announce(request.request_id, pending[1], src, pending[2])
            except Exception:  # an optimisation: never fail the step for it
                log.exception("request %s: announcing its KV transfer failed",
                              request.request_id)

    def _on_outputs(self, outputs: list[RequestOutput]) -> None:
        # Every finished prefill of the step gets its first token answered before any of
        # their payloads is written from this thread (see KVSender.deferred_writes).
        with self.sender.deferred_writes():
            self._finish_all(outputs)

    def _finish_all(self, outputs: list[RequestOutput]) -> None:
        for out in outputs:
            if out.finish_reason is None:
                continue
            with self._lock:
                pending = self._pending.pop(out.request_id, None)
            if pending is None:  # aborted meanwhile: the abort path frees the blocks
                self.host.engine.release(out.request_id)
                continue
            try:
                self._complete(out, *pending)
            except Exception as e:  # a bug must fail this request, never hang its caller
                log.exception("request %s: finishing its prefill failed", out.request_id)
                self.sender.abort(out.request_id)
                if not pending[0].done():
                    pending[0].set_exception(PrefillFailed(
                        f"request {out.request_id}: internal error in the prefill worker: {e!r}"
                    ))

    def _complete(self, out: RequestOutput, future, peer: Endpoint, dst_blocks: list[int],
                  times: dict, params: SamplingParams, ship_always: bool) -> None:
        """A finished prefill: answer with its first token and ship its KV (or free it)."""
        times["first_token"] = time.time()
        if out.finish_reason == "error":
            self.sender.abort(out.request_id)  # withdraw the announced transfer
            future.set_exception(PrefillFailed(out.error or "prefill failed"))
            return
        request = self.host.engine.prefilled_request(out.request_id)
        if request.first_scheduled_time is not None:  # monotonic -> wall clock
            times["prefill_start"] = time.time() - (time.monotonic()
                                                     - request.first_scheduled_time)
        first = out.token_ids[-1]
        finish = first_token_finish(first, params, self.host.engine.eos_token_ids,
                                    len(out.token_ids) - 1)
        if finish is None or ship_always:
            self._ship(out.request_id, peer, dst_blocks)
        else:  # nothing left to decode: no transfer
            self.sender.abort(out.request_id)
            self.host.engine.release(out.request_id)
        future.set_result(PrefillResult(
            out.request_id, first, out.logprobs[-1] if out.logprobs else None,
            out.num_cached_tokens, finish, times, out.prompt_logprobs,
        ))

    def _ship(self, request_id: str, peer: Endpoint, dst_blocks: list[int]) -> None:
        src_blocks = self.host.engine.prefilled_block_ids(request_id)
        if len(src_blocks) != len(dst_blocks):
            log.error("request %s: %d source blocks but %d reserved", request_id,
                      len(src_blocks), len(dst_blocks))
        try:  # the reserved ids let spans contiguous on both sides move as one message
            handle = self.sender.send(request_id, peer, src_blocks, dst_block_ids=dst_blocks)
        except BaseException:
            self.host.engine.release(request_id)  # nothing is reading the blocks
            raise
        handle.add_done_callback(self._transfer_done)

    def _transfer_done(self, handle: TransferHandle) -> None:
        if handle.error is not None:
            self.num_transfers_failed += 1
            log.warning("KV transfer of %s failed: %s", handle.request_id, handle.error)
        else:
            self.host.kv_bytes_sent += handle.result().nbytes
        # Source blocks are released on the engine thread (the engine is single-threaded).
        self.host.loop.call(lambda engine: engine.release(handle.request_id))


def first_token_finish(token: int, params: SamplingParams, eos_ids,
                       num_before: int = 0) -> str | None:
    """The finish reason if the token the prefill sampled (after ``num_before`` output
    tokens of a resumed request) already ends the request, else None."""
    if params.min_tokens <= num_before and (
        token in params.stop_token_ids or (not params.ignore_eos and token in eos_ids)
    ):
        return "stop"
    return "length" if params.max_tokens <= num_before + 1 else None


def _remember(ids: OrderedDict[str, None], request_id: str, cap: int) -> None:
    ids[request_id] = None
    if len(ids) > cap:
        ids.popitem(last=False)


def _add_prefill(engine, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                 output_token_ids: tuple[int, ...] = ()):
    if not prompt_token_ids:
        raise InvalidRequestError("prompt is empty")
    engine.add_request(request_id, prompt_token_ids, params, prefill_only=True,
                       output_token_ids=output_token_ids)
