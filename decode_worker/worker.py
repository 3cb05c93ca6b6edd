"""DecodeWorker: reserves KV blocks, receives a prompt's KV, decodes with continuous batching.

Life of a request on the decode side:
  1. ``reserve()`` — blocks for the prompt are preallocated (WAITING_FOR_KV) and registered
     with the KV receiver; None means no room (backpressure: place it elsewhere or queue).
  2. Two things must happen, in either order: the KV lands (receiver callback) and the router
     calls ``start()`` with the first token that the prefill worker sampled.
  3. Both done → the request joins the running batch (``Engine.activate``).
  4. Tokens stream out per engine step: ``stream_outputs()`` (a Ray streaming generator)
     yields each step's deltas for every request as the step ends (never one message per
     token, never several steps held back for a poll).
  5. One final delta per request: finished, aborted, or failed (transfer error or timeout),
     and every block is freed.
``generate()`` is the other entry: the worker prefills the prompt itself (conditional
disaggregation for short prompts, or the colocated baseline) and streams from token one.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field

from decode_worker.deadlines import DeadlineTimer
from engine.engine_host import EngineHost, HostedWorker
from engine.outputs import RequestOutput, TokenDelta
from engine.sampling_params import SamplingParams
from kv_transfer.base import Endpoint, TransferConfig
from kv_transfer.group import GroupReceiver

log = logging.getLogger(__name__)


@dataclass
class _Incoming:
    """A reserved request waiting for its KV and its first token."""

    kv_landed: bool = False
    first_token: int | None = None
    times: dict[str, float] = field(default_factory=dict)


class DecodeWorker(HostedWorker):
    role = "decode"

    def __init__(self, worker_id: str, model_dir: str, engine_options: dict | None = None,
                 transfer_config: TransferConfig | None = None, role: str = "decode",
                 **receiver_kwargs) -> None:
        self.worker_id = worker_id
        self.role = role
        self.transfer_config = transfer_config or TransferConfig()
        self._lock = threading.Lock()
        self._incoming: dict[str, _Incoming] = {}
        # n > 1: request id -> the ids of its family (itself and its siblings) not finished
        self._families: dict[str, set[str]] = {}
        self._times: dict[str, dict[str, float]] = {}  # stamps of requests being decoded
        self._steps: deque[list[TokenDelta]] = deque()  # one entry per engine step (or event)
        self._deltas_ready = threading.Condition(self._lock)
        self._stopped = False
        self.host = EngineHost(worker_id, role, model_dir, engine_options or {},
                               self._on_outputs)
        if self.transfer_config.backend == "ray" and "actor" not in receiver_kwargs:
            import ray  # the ray backend delivers KV by calling this actor's receive_kv

            receiver_kwargs.update(actor=ray.get_runtime_context().current_actor,
                                   method="receive_kv")
        engine = self.host.engine
        # One receiver per tensor-parallel rank, each taking its own KV heads (one rank:
        # today's receiver, unchanged); see kv_transfer.group.
        self.receiver = GroupReceiver(
            self.transfer_config, engine.runner.kv_cache, worker_id,
            engine.kv_heads_of_ranks(), engine.model_config.num_kv_heads,
            call_ranks=self.host.call_ranks,
            kv_scales=(engine.cache_config.k_scale, engine.cache_config.v_scale),
            **receiver_kwargs)
        self._kv_deadlines = DeadlineTimer(self._kv_timed_out)

    # -- disaggregated path ---------------------------------------------------------------------
    def endpoint(self) -> Endpoint:
        return self.receiver.endpoint()

    def reserve(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                output_token_ids: list[int] = (),
                siblings: list[tuple[str, SamplingParams]] = (),
                source_heads: list[tuple[int, int]] | None = None) -> list[int] | None:
        """``output_token_ids``: a resumed request's tokens already streamed (see
        ``Engine.add_request``); their KV comes with the prompt's. ``siblings``: n > 1,
        (id, params) of the request's other samples, forked here once its KV landed (they
        share its blocks; ``abort`` of the request aborts them too). ``source_heads``: the
        sending prefill worker's KV heads per tensor-parallel rank
        (``PrefillWorker.kv_heads``; None: one rank with every head)."""
        self.host.engine.precompile(params)  # here, not on the engine thread
        blocks = self.host.call(lambda e: e.reserve(request_id, prompt_token_ids, params,
                                                    output_token_ids=output_token_ids,
                                                    siblings=siblings))
        if blocks is None:
            return None
        self._add_family(request_id, siblings)
        with self._lock:
            self._incoming[request_id] = _Incoming(times={"reserved": time.time()})
        self.receiver.expect(request_id, blocks, on_done=self._kv_done,
                             source_heads=source_heads)
        return blocks

    def start(self, request_id: str, first_token: int) -> bool:
        """The first token is known. False if the request is gone (aborted or failed)."""
        with self._lock:
            incoming = self._incoming.get(request_id)
            if incoming is None:
                return False
            incoming.first_token = first_token
            incoming.times["start"] = time.time()
            ready = incoming.kv_landed
        if ready:
            self._activate(request_id)
        else:
            self._kv_deadlines.add(request_id, self.transfer_config.timeout_s)
        return True

    def _kv_done(self, request_id: str, error) -> None:  # on a transfer thread
        with self._lock:
            incoming = self._incoming.get(request_id)
            if incoming is None:
                return
            if error is None:
                incoming.kv_landed = True
                incoming.times["kv_landed"] = time.time()
            ready = error is None and incoming.first_token is not None
        if error is not None:
            self._fail_incoming(request_id, f"KV transfer failed: {error}")
        elif ready:
            self._activate(request_id)

    def _kv_timed_out(self, request_id: str) -> None:  # on the deadline thread
        with self._lock:
            incoming = self._incoming.get(request_id)
            waiting = incoming is not None and not incoming.kv_landed
        if waiting:  # off the deadline thread: the abort may wait (see _give_up_on_kv)
            threading.Thread(target=self._give_up_on_kv, args=(request_id,),
                             name=f"kv-timeout {request_id}", daemon=True).start()

    def _give_up_on_kv(self, request_id: str) -> None:
        """Fail a request whose KV is late. The receiver's abort returns once nothing writes
        into its blocks: for an announced transfer, when the sender settles it (its own send
        times out by then) or the channel ends; other deadlines must not wait for that."""
        self.receiver.abort(request_id)
        self._fail_incoming(
            request_id,
            f"KV cache did not arrive within {self.transfer_config.timeout_s} s "
            "(prefill worker slow or gone); retry the request",
        )

    def _activate(self, request_id: str) -> None:
        with self._lock:
            incoming = self._incoming.pop(request_id, None)
        if incoming is None:
            return
        self._kv_deadlines.cancel(request_id)
        incoming.times["activated"] = time.time()
        with self._lock:
            self._times[request_id] = incoming.times
        self.host.loop.call(self._activate_on_loop, request_id, incoming.first_token)

    def _activate_on_loop(self, engine, request_id: str, first_token: int) -> None:
        if request_id not in engine.scheduler.requests:
            return  # aborted in between
        out = engine.activate(request_id, first_token)
        if out is not None:
            self._on_outputs([out])

    def _fail_incoming(self, request_id: str, message: str) -> None:
        with self._lock:
            incoming = self._incoming.pop(request_id, None)
        if incoming is None:
            return
        self._kv_deadlines.cancel(request_id)
        log.warning("request %s failed on %s: %s", request_id, self.worker_id, message)
        out = self.host.call(lambda e: e.fail(request_id, message))
        if out is not None:
            self._on_outputs([out])

    # -- local path (conditional disaggregation, colocated) ----------------------------------
    def generate(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                 output_token_ids: list[int] = (),
                 siblings: list[tuple[str, SamplingParams]] = ()) -> None:
        """Prefill here and decode; outputs stream through ``stream_outputs``
        (``output_token_ids``: a resumed request's tokens already streamed; ``siblings``:
        n > 1, forked once the prompt is computed)."""
        self.host.engine.precompile(params)  # here, not on the engine thread
        with self._lock:
            self._times[request_id] = {"local_arrival": time.time()}
        try:
            self.host.call(lambda e: e.add_request(request_id, prompt_token_ids, params,
                                                   output_token_ids=output_token_ids,
                                                   siblings=siblings))
        except Exception:
            with self._lock:
                self._times.pop(request_id, None)
            raise
        self._add_family(request_id, siblings)

    def _add_family(self, request_id: str, siblings) -> None:
        if siblings:
            with self._lock:
                self._families[request_id] = {request_id, *(child for child, _ in siblings)}

    # -- both --------------------------------------------------------------------------------------
    def abort(self, request_id: str) -> bool:
        """End the request (and its n > 1 siblings) here, freeing its blocks."""
        self.receiver.abort(request_id)
        self._kv_deadlines.cancel(request_id)
        with self._lock:
            self._incoming.pop(request_id, None)
            members = sorted(self._families.pop(request_id, {request_id}))
        outs = self.host.call(lambda e: [e.abort(rid) for rid in members])
        outs = [out for out in outs if out is not None]
        if outs:
            self._on_outputs(outs)
        return bool(outs)

    def abort_sample(self, request_id: str) -> bool:
        """n > 1: end one member of a family (the router matched a stop string in it),
        leaving the others running. Only a member that decodes (its KV landed, the family
        forked): before that, the other samples still need the shared blocks, and the
        router drops this one's outputs instead. True if it was ended."""
        with self._lock:
            if request_id in self._incoming:
                return False
        out = self.host.call(lambda e: e.abort(request_id)
                             if request_id in e.scheduler.requests
                             and e.scheduler.requests[request_id].output_token_ids else None)
        if out is not None:
            self._on_outputs([out])
        return out is not None

    def _forget_sibling(self, request_id: str) -> None:
        """A finished member leaves its family; the last one takes the family along
        (called with the lock held)."""
        for parent, members in list(self._families.items()):
            members.discard(request_id)
            if not members:
                del self._families[parent]

    def stream_outputs(self) -> Iterator[list[TokenDelta]]:
        """Every request's new tokens, one item per engine step, as soon as the step ends
        (the router consumes it as a Ray streaming generator); ends at shutdown."""
        while True:
            with self._deltas_ready:
                while not self._steps and not self._stopped:
                    self._deltas_ready.wait()
                if not self._steps:
                    return
                step = self._steps.popleft()
            yield step

    def get_outputs(self, timeout_s: float = 1.0) -> list[TokenDelta]:
        """Every delta produced since the last call; waits up to ``timeout_s`` for one
        (tests and tools; the router streams)."""
        with self._deltas_ready:
            if not self._steps:
                self._deltas_ready.wait(timeout_s)
            steps, self._steps = list(self._steps), deque()
        return [delta for step in steps for delta in step]

    def _on_outputs(self, outputs: list[RequestOutput]) -> None:
        now = time.time()
        with self._deltas_ready:
            step = []
            for out in outputs:
                times = None
                if out.finish_reason is not None:
                    times = self._times.pop(out.request_id, {})
                    times["finished"] = now
                    self._forget_sibling(out.request_id)
                step.append(TokenDelta.from_output(out, times))
            self._steps.append(step)
            self._deltas_ready.notify_all()

    # -- reporting / lifecycle ----------------------------------------------------------------
    def receive_kv(self, header: bytes, payload) -> bool:
        """Ray transfer backend delivery (see kv_transfer.ray_backend)."""
        return self.receiver.deliver(header, payload)

    def shutdown(self) -> None:
        with self._deltas_ready:  # ends stream_outputs
            self._stopped = True
            self._deltas_ready.notify_all()
        self._kv_deadlines.stop()
        self.receiver.close()
        self.host.shutdown()
