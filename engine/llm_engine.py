"""``Engine``: one process running prefill and decode together (colocated).

This is the core both pools run (the prefill and decode workers drive it in their modes),
and the baseline disaggregation must beat. One step reads::

    batch = scheduler.schedule()
    out = runner.execute(batch)
    finished = scheduler.update(batch, out)
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from engine import cuda_graphs
from engine.batch import SchedulerOutput
from engine.block_pool import BlockPool, NoFreeBlocksError
from engine.config import CacheConfig, GraphConfig, SchedulerConfig
from engine.errors import InvalidRequestError, WorkerFatalError
from engine.kv_cache_manager import KVCacheManager, cdiv
from engine.kv_layout import new_kv_cache
from engine.memory_budget import (
    GIB,
    CudaMemoryProfiler,
    MemoryProfile,
    MemoryProfiler,
    budget_from_profile,
    device_share_bytes,
    kv_cache_log_line,
)
from engine.model_runner import ModelRunner
from engine.outputs import RequestOutput
from engine.parallel.shard import kv_heads_per_rank
from engine.request import Request, RequestStatus
from engine.sampling_params import SamplingParams
from engine.scheduler import Scheduler
from engine.text_output import TextTracker

log = logging.getLogger(__name__)


class Engine:
    def __init__(self, model_dir: str | Path, *, cache_config: CacheConfig | None = None,
                 scheduler_config: SchedulerConfig | None = None, dtype: str = "float32",
                 device: str = "cpu", attention_backend: str | None = None, seed: int = 0,
                 load_tokenizer: bool = True, tensor_parallel_size: int = 1,
                 parallel: dict | None = None, graph_config: GraphConfig | None = None) -> None:
        from engine.attention.registry import select_backend
        from engine.model_config import ModelConfig
        from engine.models.loader import load_model

        self.model_dir = Path(model_dir)
        self.cache_config = cache_config = cache_config or CacheConfig()
        self.graph_config = graph_config or GraphConfig()
        self.device = torch.device(device)
        self.dtype = _parse_dtype(dtype)
        self.model_config = ModelConfig.from_pretrained(self.model_dir)
        sched = scheduler_config or SchedulerConfig()
        max_len = min(sched.max_model_len, self.model_config.max_position_embeddings)
        self.scheduler_config = SchedulerConfig(
            sched.max_num_batched_tokens, sched.max_num_seqs, max_len
        )
        self.attn_backend = select_backend(attention_backend, self.device, cache_config.block_size,
                                           cache_config.kv_cache_dtype,
                                           (cache_config.k_scale, cache_config.v_scale))
        self.kv_heads_per_rank = kv_heads_per_rank(self.model_config, tensor_parallel_size)
        if tensor_parallel_size == 1:
            self.model = load_model(self.model_dir, self.dtype, self.device, self.attn_backend)
            self.runner = self._single_device_runner(seed)  # sets self.num_blocks
        else:  # starts ranks 1..N-1; sets self.model (rank 0's shard) and self.num_blocks
            from engine.parallel.launch import ParallelConfig, start_tensor_parallel

            options = dict(parallel or {})
            launcher = options.pop("launcher", None)
            self.runner = start_tensor_parallel(
                self, ParallelConfig(tensor_parallel_size, **options), launcher, seed)
        self.pool = BlockPool(self.num_blocks, cache_config.enable_prefix_caching)
        self.kv_manager = KVCacheManager(self.pool, cache_config.block_size)
        self.scheduler = Scheduler(self.scheduler_config, self.kv_manager)
        self.scheduler.on_prompt_done = self._start_siblings
        self.tokenizer = None
        if load_tokenizer:
            from engine.tokenizer import Tokenizer

            self.tokenizer = Tokenizer(self.model_dir)
        self.eos_token_ids = tuple(self.model_config.eos_token_ids)
        self._text = TextTracker(self.tokenizer)
        self._num_reported: dict[str, int] = {}
        self._prefilled: dict[str, Request] = {}  # prefill-only requests holding their blocks
        self.last_batch: SchedulerOutput | None = None  # the latest step's batch (stats)
        self._ids = itertools.count()
        self._grammar_backend = None  # structured outputs: built on the first such request
        # Prefill side: called (on the engine thread) with each prefill-only request whose
        # last prompt chunk was just scheduled, before the step runs: its blocks are final,
        # its KV is one forward pass away (the prefill worker announces the transfer).
        self.on_last_chunk_scheduled: Callable[[Request], None] | None = None
        # Called (on the engine thread) when the model cannot run any more (a
        # tensor-parallel rank died) before every request fails: a cluster worker ends its
        # process there, so that the cluster moves the requests instead.
        self.on_fatal: Callable[[WorkerFatalError], None] | None = None

    @classmethod
    def from_pretrained(cls, model_dir: str | Path, dtype: str = "float32", device: str = "cpu",
                        block_size: int = 16, max_num_batched_tokens: int = 512,
                        max_num_seqs: int = 64, kv_cache_memory_bytes: int | None = None,
                        enable_prefix_caching: bool = True, **kwargs) -> Engine:
        """vLLM-style constructor. Extra kwargs: max_model_len, num_blocks,
        attention_backend, seed, load_tokenizer, gpu_memory_utilization, kv_cache_dtype,
        k_scale, v_scale, enforce_eager (no CUDA graphs), max_capture_batch,
        tensor_parallel_size (N > 1 starts N - 1 more ranks: call ``close()``), parallel
        (``engine.parallel.launch.ParallelConfig`` fields, and ``launcher``)."""
        cache = CacheConfig(
            block_size=block_size,
            kv_cache_memory_bytes=kv_cache_memory_bytes,
            enable_prefix_caching=enable_prefix_caching,
            num_blocks_override=kwargs.pop("num_blocks", None),
            gpu_memory_utilization=kwargs.pop("gpu_memory_utilization", 0.9),
            kv_cache_dtype=kwargs.pop("kv_cache_dtype", "auto"),
            k_scale=kwargs.pop("k_scale", 1.0),
            v_scale=kwargs.pop("v_scale", 1.0),
        )
        sched = SchedulerConfig(
            max_num_batched_tokens=max_num_batched_tokens,
            max_num_seqs=max_num_seqs,
            max_model_len=kwargs.pop("max_model_len", 1 << 20),
        )
        graphs = GraphConfig(enforce_eager=kwargs.pop("enforce_eager", False),
                             max_capture_batch=kwargs.pop("max_capture_batch", None))
        return cls(model_dir, cache_config=cache, scheduler_config=sched, dtype=dtype,
                   device=device, graph_config=graphs, **kwargs)

    # -- memory ----------------------------------------------------------------------------
    @property
    def bytes_per_block(self) -> int:
        cfg = self.model_config
        # One rank's share: its KV heads only under tensor parallelism.
        elems = (cfg.num_layers * 2 * self.cache_config.block_size * self.kv_heads_per_rank
                 * cfg.head_dim)
        return elems * self.kv_cache_dtype.itemsize

    @property
    def tensor_parallel_size(self) -> int:
        return getattr(self.runner, "tensor_parallel_size", 1)

    def kv_heads_of_ranks(self) -> list[tuple[int, int]]:
        """Each rank's KV heads (global indices), rank 0 first (one range without TP)."""
        from engine.parallel.shard import kv_heads_of_ranks

        return kv_heads_of_ranks(self.model_config, self.tensor_parallel_size)

    def call_ranks(self, fn, *args) -> None:
        """Tensor parallelism: run ``fn(runner, comm, *args)`` on ranks 1..N-1 between two
        steps (on the engine thread; see ``TPModelRunner.call_ranks``)."""
        self.runner.call_ranks(fn, *args)

    @property
    def kv_cache_dtype(self) -> torch.dtype:
        """The KV cache's element type: the model's, or fp8 (``CacheConfig.kv_cache_dtype``)."""
        from engine.attention.kv_quant import cache_dtype

        return cache_dtype(self.cache_config.kv_cache_dtype, self.dtype)

    def _single_device_runner(self, seed: int) -> ModelRunner:
        """The runner of a one-device engine: the KV cache sized (on CUDA from a profiled
        run: engine.memory_budget) and allocated; on CUDA the decode graphs captured, over
        a cache with one scratch block past the pool's (engine.cuda_graphs)."""
        cc, sched = self.cache_config, self.scheduler_config
        sizes = self._graph_sizes()
        profiler = None
        if (self.device.type == "cuda" and cc.kv_cache_memory_bytes is None
                and cc.num_blocks_override is None):
            profiler = CudaMemoryProfiler(
                self.model, self.device, self._allocate_kv_cache, cc.block_size,
                min(sched.max_num_batched_tokens, sched.max_model_len), sched.max_num_seqs,
                sched.max_model_len, max(sizes) if sizes else None)
        self.num_blocks = n = self._num_kv_blocks(profiler)
        if not sizes:
            return ModelRunner(self.model, self._allocate_kv_cache(n), cc.block_size,
                               self.device, seed)
        kv_cache = self._allocate_kv_cache(n + 1)  # block n: the graphs' padding rows' scratch
        runner = ModelRunner(self.model, kv_cache[:n], cc.block_size, self.device, seed)
        runner.decode_graphs = cuda_graphs.capture_decode_graphs(
            self.model, kv_cache, sizes, sched.max_model_len, cc.block_size, scratch_block=n)
        return runner

    def _graph_sizes(self) -> list[int]:
        """The decode batch sizes to capture as CUDA graphs; none on CPU, with
        ``enforce_eager``, or when the model or attention backend cannot be captured."""
        if self.device.type != "cuda" or self.graph_config.enforce_eager:
            return []
        blocker = cuda_graphs.capture_blocker(self.model, self.attn_backend)
        if blocker is not None:
            log.info("CUDA graphs off: %s; decode steps run eagerly", blocker)
            return []
        max_seqs = self.scheduler_config.max_num_seqs
        return cuda_graphs.capture_sizes(min(self.graph_config.max_capture_batch or max_seqs,
                                             max_seqs))

    def _num_kv_blocks(self, profiler: MemoryProfiler | None = None) -> int:
        """KV blocks for this engine (this rank). ``profiler``: a one-device CUDA engine's
        budget from ``gpu_memory_utilization`` and a measured profile (engine.memory_budget;
        it logs what it gave); without one, CUDA (tensor-parallel ranks) takes its share
        less what the process holds."""
        cc = self.cache_config
        if cc.num_blocks_override is not None:
            return cc.num_blocks_override
        profile = None
        if cc.kv_cache_memory_bytes is not None:
            budget = cc.kv_cache_memory_bytes
        elif profiler is not None:
            profile = profiler.profile()
            budget = budget_from_profile(profile, cc.gpu_memory_utilization)
        elif self.device.type == "cuda":
            budget = device_share_bytes(self.device, cc.gpu_memory_utilization)
        else:
            budget = cc.cpu_kv_cache_bytes_default
        blocks_per_seq = cdiv(self.scheduler_config.max_model_len, cc.block_size)
        needed = self.scheduler_config.max_num_seqs * blocks_per_seq
        num_blocks = min(budget // self.bytes_per_block, needed)
        if profile is not None:
            _check_profiled_budget(num_blocks, profile, cc.gpu_memory_utilization)
            log.info(kv_cache_log_line(num_blocks, cc.block_size, self.bytes_per_block, profile,
                                       cc.gpu_memory_utilization))
        if num_blocks < blocks_per_seq and num_blocks < 2:
            raise ValueError(
                f"KV cache budget of {budget} bytes holds {num_blocks} blocks of "
                f"{self.bytes_per_block} bytes; raise kv_cache_memory_bytes"
            )
        return int(num_blocks)

    def _allocate_kv_cache(self, num_blocks: int) -> torch.Tensor:
        cfg = self.model_config
        # Block-major (a block holds every layer's K and V) and head-major inside a block, so
        # a KV transfer moves a block, or any head range of one, as one message straight
        # from/to the cache (see engine.kv_layout).
        return new_kv_cache(num_blocks, cfg.num_layers, self.cache_config.block_size,
                            self.kv_heads_per_rank, cfg.head_dim, self.kv_cache_dtype,
                            self.device)

    # -- requests --------------------------------------------------------------------------
    def add_request(self, request_id: str | None, prompt: str | Sequence[int],
                    params: SamplingParams | None = None, *, prefill_only: bool = False,
                    arrival_time: float | None = None,
                    output_token_ids: Sequence[int] = (),
                    siblings: Sequence[tuple[str, SamplingParams]] = ()) -> Request:
        """Queue a request. ``prompt`` is text (needs the tokenizer) or token ids.

        ``output_token_ids``: resume a request whose stream began elsewhere: the tokens it
        already generated (and streamed). They are prefilled after the prompt and count as
        output (max_tokens, min_tokens, penalties, the seeded stream's output index), so the
        continuation equals the undisturbed run's; outputs report only new tokens in
        ``new_token_ids`` (``token_ids`` holds them all).

        ``siblings``: n > 1, (child id, params) of the other samples of this prompt: forked
        (``fork``) as soon as the prompt is computed, sharing its KV blocks."""
        params = params or SamplingParams()
        request_id = request_id if request_id is not None else f"req-{next(self._ids)}"
        token_ids = self._tokenize(prompt)
        resumed = tuple(int(t) for t in output_token_ids)
        self._validate(token_ids, params, resumed)
        request = Request(request_id, token_ids, params, self.eos_token_ids,
                          prefill_only=prefill_only, resumed_token_ids=resumed,
                          siblings=tuple(siblings))
        self._attach_grammar(request)
        if arrival_time is not None:
            request.arrival_time = arrival_time
        self.scheduler.add_request(request)
        self._text.add(request)
        self._num_reported[request_id] = len(resumed)
        return request

    def _tokenize(self, prompt: str | Sequence[int]) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise InvalidRequestError("text prompts need a tokenizer; pass token ids")
            return self.tokenizer.encode(prompt)
        return [int(t) for t in prompt]

    def _validate(self, token_ids: list[int], params: SamplingParams,
                  resumed: tuple[int, ...] = ()) -> None:
        if not token_ids:
            raise InvalidRequestError("prompt is empty: send at least one token")
        vocab = self.model_config.vocab_size
        if min(token_ids) < 0 or max(token_ids) >= vocab:
            raise InvalidRequestError(f"prompt token ids must be in [0, {vocab})")
        if params.logit_bias and params.logit_bias[-1][0] >= vocab:  # sorted by id
            raise InvalidRequestError(f"logit_bias token ids must be in [0, {vocab})")
        if params.prompt_logprobs is not None and not self.runner.supports_prompt_logprobs:
            raise InvalidRequestError(
                "prompt_logprobs is not supported with tensor parallelism "
                "(tensor_parallel_size > 1): leave it out, or serve this model with "
                "tensor_parallel_size 1")
        if resumed and (min(resumed) < 0 or max(resumed) >= vocab):
            raise InvalidRequestError(f"output_token_ids must be in [0, {vocab})")
        if len(resumed) >= params.max_tokens:
            raise InvalidRequestError(
                f"output_token_ids already holds {len(resumed)} tokens, max_tokens is "
                f"{params.max_tokens}: nothing is left to generate"
            )
        max_len = self.scheduler_config.max_model_len
        if len(token_ids) + params.max_tokens > max_len:
            raise InvalidRequestError(
                f"prompt ({len(token_ids)} tokens) + max_tokens ({params.max_tokens}) exceeds "
                f"the maximum context length of {max_len} tokens; shorten the prompt or lower "
                "max_tokens"
            )
        if cdiv(len(token_ids) + params.max_tokens, self.cache_config.block_size) > self.num_blocks:
            raise InvalidRequestError(
                f"request needs more KV blocks than this engine has ({self.num_blocks}); "
                "shorten it or give the engine more KV cache memory"
            )

    def _attach_grammar(self, request: Request) -> None:
        """Structured output: the request's grammar state, advanced by the output tokens it
        already has (a resume), before it can be scheduled."""
        spec = request.params.structured
        if spec is not None:
            request.grammar = self.grammar_backend().new_state(spec, request.output_token_ids)

    def precompile(self, params: SamplingParams | None) -> None:
        """Compile ``params``' structured-output spec now, on the calling thread (thread
        safe), so that adding the request on the engine thread finds it compiled: a new
        JSON schema takes 1-3 s to compile, which would stall every running request of
        this worker. Raises what adding the request would (a bad spec)."""
        spec = params.structured if params is not None else None
        if spec is not None:
            self.grammar_backend().compile(spec.kind, spec.spec)

    def grammar_backend(self):
        """This model's structured-output backend (``engine.structured.grammar``), built on
        first use from the tokenizer files (also with load_tokenizer=False)."""
        if self._grammar_backend is None:
            from engine.structured.grammar import backend_for

            self._grammar_backend = backend_for(
                str(self.model_dir.resolve()), self.model_config.vocab_size, self.eos_token_ids)
        return self._grammar_backend

    def abort(self, request_id: str) -> RequestOutput | None:
        """Abort a request; returns its final output, or None if it was not running."""
        request = self.scheduler.finish(request_id, RequestStatus.FINISHED_ABORTED)
        if request is None:
            if request_id in self._prefilled:
                self.release(request_id)
            return None
        return self._output(request)

    def fail(self, request_id: str, message: str) -> RequestOutput | None:
        """End a request with finish_reason "error" (its blocks are freed)."""
        request = self.scheduler.finish(request_id, RequestStatus.FINISHED_ERROR)
        if request is None:
            return None
        out = self._output(request)
        out.error = message
        return out

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished()

    # -- the step --------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Run one engine step; an output for every request that got a token or finished."""
        return self._step(finished_only=False)

    def _step(self, finished_only: bool) -> list[RequestOutput]:
        """``finished_only``: build outputs for finished requests only (``generate`` needs
        no others; an output copies the request's whole token list). Either way a finished
        request's output is the same: its new tokens are those since the last step."""
        batch: SchedulerOutput = self.scheduler.schedule()
        self.last_batch = batch
        if batch.is_empty:
            return []
        if self.on_last_chunk_scheduled is not None:
            for scheduled in batch.scheduled[batch.num_decodes :]:
                if scheduled.sample and scheduled.request.prefill_only:
                    self.on_last_chunk_scheduled(scheduled.request)
        try:
            out = self.runner.execute(batch)
        except WorkerFatalError as e:  # e.g. a tensor-parallel rank died: fail, never hang
            if self.on_fatal is not None:
                self.on_fatal(e)
            return self._fail_all(str(e))
        touched = self.scheduler.update(batch, out)
        outputs = []
        for request in touched:
            if request.status == RequestStatus.FINISHED_PREFILLED:
                self._prefilled[request.request_id] = request
            elif self._text.check_stop_strings(request) and not request.is_finished:
                self.scheduler.finish(request.request_id, RequestStatus.FINISHED_STOPPED)
            if finished_only and not request.is_finished:
                self._num_reported[request.request_id] = request.num_output_tokens
            else:
                outputs.append(self._output(request, whole=finished_only))
        return outputs

    def _fail_all(self, message: str) -> list[RequestOutput]:
        """The model cannot run any more: every unfinished request ends with ``message``."""
        outputs = [self.fail(request_id, message) for request_id in list(self.scheduler.requests)]
        return [out for out in outputs if out is not None]

    # -- disaggregation hooks --------------------------------------------------------------
    def prefilled_block_ids(self, request_id: str) -> list[int]:
        """Prefill side: the blocks holding a prefilled request's prompt KV, in order."""
        return self.prompt_block_ids(self._prefilled[request_id])

    def prompt_block_ids(self, request: Request) -> list[int]:
        """The blocks that hold (or will hold) the KV a request's prefill computes (its
        prompt, and for a resumed request the output tokens it was resumed with), in order."""
        return request.block_ids[: cdiv(request.num_prefill_tokens, self.cache_config.block_size)]

    def prefilled_request(self, request_id: str) -> Request:
        """Prefill side: the finished-prefill request (its counters and timestamps)."""
        return self._prefilled[request_id]

    def release(self, request_id: str) -> None:
        """Prefill side: the KV transfer is done (or failed): drop the request's blocks.
        Its full blocks stay in the prefix cache (evictable) for later prompts."""
        request = self._prefilled.pop(request_id, None)
        if request is not None:
            self.kv_manager.free(request)

    def reserve(self, request_id: str, prompt_token_ids: Sequence[int],
                params: SamplingParams, *,
                output_token_ids: Sequence[int] = (),
                siblings: Sequence[tuple[str, SamplingParams]] = ()) -> list[int] | None:
        """Decode side: preallocate blocks for a prompt whose KV will be transferred.
        Returns the block ids, or None when there is no room (backpressure).

        ``output_token_ids``: a resumed request's tokens already generated before the
        prefill (see ``add_request``); their KV is transferred with the prompt's, so the
        blocks cover prompt + these tokens. ``activate`` then gets the token the prefill
        side sampled after them. ``siblings``: n > 1 (see ``add_request``), forked at
        ``activate``, before the first token may finish this request."""
        token_ids = [int(t) for t in prompt_token_ids]
        resumed = tuple(int(t) for t in output_token_ids)
        self._validate(token_ids, params, resumed)
        request = Request(request_id, token_ids, params, self.eos_token_ids,
                          resumed_token_ids=resumed, siblings=tuple(siblings))
        self._attach_grammar(request)
        if not self.scheduler.reserve(request):
            return None
        self._text.add(request)
        self._num_reported[request_id] = len(resumed)
        return list(request.block_ids)

    def activate(self, request_id: str, first_token: int) -> RequestOutput | None:
        """Decode side: KV landed, first token known (already streamed by the prefill
        side): start decoding. Returns the final output if that token ends the request."""
        request = self.scheduler.activate(request_id, first_token)
        self._num_reported[request_id] = request.num_output_tokens
        self._text.check_stop_strings(request)
        return self._output(request) if request.is_finished else None

    def fork(self, request_id: str, child_id: str, params: SamplingParams) -> Request | None:
        """n > 1: start a sibling of a running request whose prompt KV is computed (e.g. on
        the decode side right after ``activate``). The sibling has the same prompt, shares
        its KV blocks by reference (the block it first writes is copied: copy-on-write)
        and samples its own tokens with ``params`` (e.g. ``seed + i``): it recomputes the
        prompt's last token for its first sample, so it gives what the same request run
        alone with ``params`` gives. Its outputs stream under ``child_id``; aborting one
        sibling leaves the others running. None when there is no seat or free block."""
        parent = self.scheduler.requests.get(request_id)
        if parent is None:
            raise InvalidRequestError(f"request {request_id!r} is not running here")
        self._validate(list(parent.prompt_token_ids), params)
        child = Request(child_id, list(parent.prompt_token_ids), params, self.eos_token_ids,
                        arrival_time=parent.arrival_time)
        self._attach_grammar(child)
        if not self.scheduler.has_seat():
            return None
        try:
            copy = self.scheduler.fork(parent, child)
        except NoFreeBlocksError:
            return None
        if copy is not None:
            self.runner.copy_blocks([copy])
        self._text.add(child)
        self._num_reported[child_id] = 0
        return child

    def _start_siblings(self, parent: Request) -> None:
        """n > 1: fork the parent's siblings now that its prompt is computed (called by the
        scheduler before the parent's first token may finish it). A sibling that finds no
        seat or block is queued as a request of its own (it prefills the prompt itself,
        reusing the prefix cache's full blocks): it waits, it never fails."""
        for child_id, params in parent.siblings:
            if self.fork(parent.request_id, child_id, params) is None:
                self.add_request(child_id, list(parent.prompt_token_ids), params,
                                 arrival_time=parent.arrival_time)

    def _output(self, request: Request, whole: bool = False) -> RequestOutput:
        """``whole``: the caller keeps only final outputs (``generate``), so this one carries
        the prompt logprobs too; otherwise only a request's first output does."""
        generated = request.output_token_ids
        start = self._num_reported.get(request.request_id, 0)
        out = RequestOutput(
            request_id=request.request_id,
            new_token_ids=generated[start:],
            token_ids=generated,
            finish_reason=request.status.finish_reason,
            num_prompt_tokens=request.num_prompt_tokens,
            num_cached_tokens=request.num_cached_tokens,
            logprobs=request.logprobs,
        )
        if len(request.prompt_logprobs) == request.num_prompt_tokens and (
                whole or start == len(request.resumed_token_ids)):
            out.prompt_logprobs = request.prompt_logprobs
        self._num_reported[request.request_id] = len(generated)
        if request.error is not None:
            out.error = request.error
        if request.is_finished:
            out.text, out.stop_reason = self._text.finish(request)
            self._num_reported.pop(request.request_id, None)
        return out

    def generate(self, prompts: Sequence[str | Sequence[int]],
                 params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_tqdm: bool = False) -> list[RequestOutput]:
        """Run prompts to completion with continuous batching; outputs in prompt order."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]  # a single prompt
        if params is None or isinstance(params, SamplingParams):
            params = [params or SamplingParams()] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError("give one SamplingParams, or one per prompt")
        ids = [self.add_request(None, p, sp).request_id
               for p, sp in zip(prompts, params, strict=True)]
        final: dict[str, RequestOutput] = {}
        bar = _progress(len(ids)) if use_tqdm else None
        while self.has_unfinished_requests():
            for out in self._step(finished_only=True):
                final[out.request_id] = out
                if bar is not None:
                    bar.update(1)
        if bar is not None:
            bar.close()
        return [final[i] for i in ids]

    def check_integrity(self) -> None:
        self.pool.check_integrity()

    def warmup(self) -> float:
        """Run once, before serving, the steps a first real batch would meet for the first
        time: a prompt of a full prefill chunk (``max_num_batched_tokens`` tokens, the
        longest attention a step computes), then a full batch (``max_num_seqs``) of short
        requests through prefill and decode. First-call costs (Triton's JIT on CUDA, the
        allocator growing its heap to the largest activations on CPU, lazy inits) are paid
        here instead of by the first requests. Leaves no trace a client or the cluster
        sees: nothing enters the prefix cache, the counters are as they were, every block
        is free again. Returns the seconds it took."""
        import time

        t0 = time.perf_counter()
        sched, pool, kv = self.scheduler_config, self.pool, self.kv_manager
        block, vocab = self.cache_config.block_size, self.model_config.vocab_size
        gen = max(1, min(4, sched.max_model_len - 1))  # decode steps: the first few shapes
        room = pool.num_free * block - gen  # prompt tokens the cache holds
        long_len = max(1, min(sched.max_num_batched_tokens, sched.max_model_len - gen, room))
        batch = max(1, min(sched.max_num_seqs, long_len))
        short_len = max(1, long_len // batch)  # the batch's prompts fill one chunk
        batch = max(1, min(batch, pool.num_free // cdiv(short_len + gen, block)))
        params = SamplingParams(max_tokens=gen, temperature=0.0, ignore_eos=True)
        counters = (kv.num_prefix_queries, kv.num_prefix_hits, self.scheduler.num_preemptions)
        caching, pool.enable_prefix_caching = pool.enable_prefix_caching, False
        try:
            self.generate([[j % vocab for j in range(long_len)]], params)
            self.generate([[(i + j) % vocab for j in range(short_len)] for i in range(batch)],
                          params)
        finally:
            pool.enable_prefix_caching = caching
            (kv.num_prefix_queries, kv.num_prefix_hits,
             self.scheduler.num_preemptions) = counters
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter() - t0

    def close(self) -> None:
        """Stop the other tensor-parallel ranks (nothing to do at TP=1). Idempotent."""
        close = getattr(self.runner, "close", None)
        if close is not None:
            close()


def _check_profiled_budget(num_blocks: int, profile: MemoryProfile,
                           utilization: float) -> None:
    """A CUDA budget that holds fewer than two blocks: say what took the memory."""
    if num_blocks < 2:
        raise ValueError(
            f"no room for a KV cache on the GPU at gpu_memory_utilization {utilization:g}: "
            f"{profile.total / GIB:.2f} GiB in all, {profile.free / GIB:.2f} GiB free, weights "
            f"{profile.weights / GIB:.2f} GiB, activations peak "
            f"{profile.activation_peak / GIB:.2f} GiB, CUDA graphs {profile.graphs / GIB:.2f} "
            "GiB; raise gpu_memory_utilization, lower max_num_batched_tokens or max_num_seqs, "
            "set enforce_eager, or free the GPU")


def _progress(total: int):
    from tqdm import tqdm

    return tqdm(total=total, desc="generate", unit="req")


def _parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    table = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16,
             "fp16": torch.float16, "half": torch.float16, "bfloat16": torch.bfloat16,
             "bf16": torch.bfloat16}
    if dtype not in table:
        raise ValueError(f"dtype={dtype!r} is not supported; use one of {sorted(table)}")
    return table[dtype]
