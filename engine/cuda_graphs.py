"""CUDA graphs of decode-only steps: the GPU counterpart of the CPU ``decode_step``.

A decode step of a small batch is a few kernels per layer of a few microseconds each;
launching them one by one from Python costs more than running them. A CUDA graph records a
step's kernels once and replays them with one launch. The scheme is vLLM's:

* Buckets. Graphs are captured for decode batches of 1, 2, 4, 8, 16, 24, 32, ... up to a cap
  (``GraphConfig.max_capture_batch``, default ``max_num_seqs``). A decode-only step of n
  sequences replays the smallest bucket b >= n; rows n .. b-1 are padding. Mixed and
  prefill steps, and decode steps larger than the cap, run eagerly.
* Static inputs. A graph reads fixed addresses, so every replay writes its inputs into one
  set of buffers (``DecodeInputs``): token ids, positions, slots, seq lens, block tables
  ``[cap, width]`` with ``width = cdiv(max_model_len, block_size)``. The host fills a
  staging copy (pinned on CUDA) and one copy per buffer group moves it to the device.
* Padding rows: token 0 at position 0, context length 1, block table ``[scratch]``, slot 0
  of a scratch block the engine allocates past the pool's blocks (never handed out). Every
  padding row writes the same K/V into that one slot, reads only it, and its output row is
  dropped: real blocks are never touched.
* Attention plans from shapes alone (``AttentionMetadata.static_shapes``; the backend must
  declare ``supports_cuda_graphs``): the torch backend gathers each row's whole table width
  and masks past ``seq_len`` on the device; the Triton kernels loop to each row's
  ``seq_len`` read on the device. flash-attn (not verified under capture) and mixture-of-
  experts models (routing reads expert counts on the host) are not captured: one log line,
  and their steps run eagerly.
* Capture happens once at start-up, after the KV cache is allocated: largest bucket first,
  every graph in one memory pool (``torch.cuda.graph_pool_handle()``; one step runs at a
  time, so the buckets' activations can share it), each after an eager warm-up run on the
  capture stream (Triton's JIT, cuBLAS's workspace for that stream).
* Only the model's forward (to hidden states) is in the graph; logits and sampling run
  after it, on the real rows. The graph's output buffer is overwritten by the next replay:
  the runner consumes it within the step.

The pool's size is estimated before the KV cache is sized (``engine.memory_budget``) by an
eager run of the largest bucket's padded step, which allocates what its capture holds.
"""

from __future__ import annotations

import bisect
import logging
import time
from collections.abc import Sequence
from itertools import accumulate

import torch

from engine.attention.metadata import AttentionMetadata
from engine.batch import ScheduledRequest

log = logging.getLogger(__name__)


def capture_sizes(cap: int) -> list[int]:
    """The decode batch sizes captured: 1, 2, 4, then every multiple of 8 below ``cap``, and
    ``cap`` itself (a step of n rows replays the smallest size >= n)."""
    if cap < 1:
        raise ValueError(f"the largest captured batch must be >= 1, got {cap}")
    small = [s for s in (1, 2, 4) if s < cap]
    return small + list(range(8, cap, 8)) + [cap]


def bucket_for(num_rows: int, sizes: Sequence[int]) -> int | None:
    """The smallest of ``sizes`` (ascending) that holds ``num_rows``; None past the largest."""
    i = bisect.bisect_left(sizes, num_rows)
    return sizes[i] if i < len(sizes) and num_rows >= 1 else None


def capture_blocker(model: torch.nn.Module, backend) -> str | None:
    """Why this model cannot be captured with this attention backend, or None when it can."""
    if not getattr(backend, "supports_cuda_graphs", False):
        return f"the {backend.name} attention backend does not support capture"
    from engine.models.moe import MoeExperts

    if any(isinstance(m, MoeExperts) for m in model.modules()):
        return "mixture-of-experts layers read their expert counts on the host"
    return None


class DecodeInputs:
    """The static input buffers every replay reads, for up to ``max_batch`` decode rows.

    Device layout (host staging identical, so one copy moves each group)::

        longs [3, max_batch] int64:  token ids | positions | slots
        ints  [2 * max_batch + 1 + max_batch * width] int32:
              seq_lens [max_batch] | cu_seqlens_k [max_batch + 1] | block tables [max_batch, width]

    Columns of a block-table row past its context are left stale (ids of earlier steps,
    always in range): the torch backend masks them, the Triton kernels never read them.
    """

    def __init__(self, max_batch: int, max_model_len: int, block_size: int, scratch_block: int,
                 device: torch.device) -> None:
        self.max_batch = B = max_batch
        self.block_size = block_size
        self.width = W = -(-max_model_len // block_size)  # block-table columns
        self.capacity = W * block_size  # longest context a row can have
        self.scratch_block = scratch_block
        pin = device.type == "cuda"
        self._host_longs = torch.zeros(3, B, dtype=torch.long, pin_memory=pin)
        self._host_ints = torch.zeros(2 * B + 1 + B * W, dtype=torch.int32, pin_memory=pin)
        self._longs_np = self._host_longs.numpy()
        self._ints_np = self._host_ints.numpy()
        self._tables_np = self._ints_np[2 * B + 1 :].reshape(B, W)  # a view
        self.longs = torch.zeros(3, B, dtype=torch.long, device=device)
        self.ints = torch.zeros(2 * B + 1 + B * W, dtype=torch.int32, device=device)
        self.cu_seqlens_q = torch.arange(B + 1, dtype=torch.int32, device=device)  # 1 query each
        self.input_ids, self.positions, self.slot_mapping = self.longs  # [B] each
        self.seq_lens = self.ints[:B]
        self.cu_seqlens_k = self.ints[B : 2 * B + 1]
        self.block_tables = self.ints[2 * B + 1 :].view(B, W)

    def fill(self, scheduled: Sequence[ScheduledRequest], bucket: int) -> bool:
        """Write a decode-only step's rows (one new token each), padded to ``bucket`` rows,
        into the buffers. False (nothing usable written) when a row's context does not fit
        the table width: that step runs eagerly."""
        bs, n = self.block_size, len(scheduled)
        ids, positions, slots, lens = [], [], [], []
        tables = self._tables_np
        for i, entry in enumerate(scheduled):
            request, pos = entry.request, entry.start
            num_blocks = pos // bs + 1
            if num_blocks > self.width:
                return False
            table = request.block_ids
            ids.append(request.token_ids[pos])
            positions.append(pos)
            slots.append(table[pos // bs] * bs + pos % bs)
            lens.append(pos + 1)
            tables[i, :num_blocks] = table[:num_blocks]
        pad = bucket - n
        longs, ints = self._longs_np, self._ints_np
        longs[0, :bucket] = ids + [0] * pad
        longs[1, :bucket] = positions + [0] * pad
        longs[2, :bucket] = slots + [self.scratch_block * bs] * pad
        lens += [1] * pad
        ints[:bucket] = lens
        B = self.max_batch
        ints[B : B + bucket + 1] = list(accumulate(lens, initial=0))
        tables[n:bucket, 0] = self.scratch_block
        # Non-blocking from pinned memory: the staging is next written by the next step's
        # fill, after this step's sampler has read its tokens (a sync on this stream).
        self.longs.copy_(self._host_longs, non_blocking=True)
        end = 2 * B + 1 + bucket * self.width  # seq lens, cu_seqlens_k, the bucket's rows
        self.ints[:end].copy_(self._host_ints[:end], non_blocking=True)
        return True

    def metadata(self, bucket: int) -> AttentionMetadata:
        """A new metadata object over the buffers' first ``bucket`` rows (new each call:
        backends cache per-step plans by the object's identity, and a capture must build
        its plan inside the capture)."""
        b = bucket
        return AttentionMetadata(
            slot_mapping=self.slot_mapping[:b],
            cu_seqlens_q=self.cu_seqlens_q[: b + 1],
            cu_seqlens_k=self.cu_seqlens_k[: b + 1],
            seq_lens=self.seq_lens[:b],
            block_tables=self.block_tables[:b],
            query_lens_cpu=[1] * b,
            seq_lens_cpu=[self.capacity] * b,  # upper bounds: the plan fits every replay
            num_decodes=b,
            max_query_len=1,
            max_seq_len=self.capacity,
            static_shapes=True,
        )


class DecodeGraphs:
    """One CUDA graph per bucket of decode-only steps, over one KV cache.

    ``kv_cache`` is the engine's whole cache, the scratch block included (the runner's
    view stops before it). ``run_eager`` runs a padded step without a graph (warm-up, the
    memory profile, and CPU tests of the padding); ``capture`` (CUDA only) records the
    graphs; ``try_run`` replays one for a step, or returns None (run it eagerly)."""

    def __init__(self, model: torch.nn.Module, kv_cache: torch.Tensor, inputs: DecodeInputs,
                 sizes: Sequence[int]) -> None:
        self.model = model
        self.kv_cache = kv_cache
        self.inputs = inputs
        self.sizes = sorted(sizes)
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.num_replays = 0  # steps run by a graph (tests, stats)

    @classmethod
    def build(cls, model: torch.nn.Module, kv_cache: torch.Tensor, sizes: Sequence[int],
              max_model_len: int, block_size: int, scratch_block: int) -> DecodeGraphs:
        inputs = DecodeInputs(max(sizes), max_model_len, block_size, scratch_block,
                              kv_cache.device)
        return cls(model, kv_cache, inputs, sizes)

    def run_eager(self, bucket: int) -> torch.Tensor:  # [bucket, hidden]
        """The model on the buffers' first ``bucket`` rows, as filled, without a graph."""
        ins = self.inputs
        return self.model(ins.input_ids[:bucket], ins.positions[:bucket], self.kv_cache,
                          ins.metadata(bucket))

    @torch.inference_mode()
    def capture(self) -> float:
        """Record every bucket's graph, largest first, into one pool. Returns seconds."""
        t0 = time.perf_counter()
        pool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream(self.kv_cache.device)
        for bucket in reversed(self.sizes):
            self.inputs.fill((), bucket)  # padding rows only: they write the scratch block
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):  # warm-up on the stream the capture will use
                self.run_eager(bucket)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool, stream=stream):
                out = self.run_eager(bucket)
            self._graphs[bucket] = (graph, out)
        torch.cuda.synchronize(self.kv_cache.device)
        return time.perf_counter() - t0

    def try_run(self, scheduled: Sequence[ScheduledRequest]) -> torch.Tensor | None:
        """Hidden states [n, hidden] of a decode-only step by a graph replay, or None when
        no captured bucket fits it (the caller runs it eagerly). The tensor is the graph's
        output buffer: valid until the next replay."""
        n = len(scheduled)
        bucket = bucket_for(n, self.sizes)
        if bucket is None or not self.has(bucket) or not self.inputs.fill(scheduled, bucket):
            return None
        out = self._replay(bucket)
        self.num_replays += 1
        return out[:n]

    def has(self, bucket: int) -> bool:
        """Whether ``bucket``'s graph was captured."""
        return bucket in self._graphs

    def _replay(self, bucket: int) -> torch.Tensor:  # [bucket, hidden], the graph's output
        graph, out = self._graphs[bucket]
        graph.replay()
        return out


def capture_decode_graphs(model: torch.nn.Module, kv_cache: torch.Tensor, sizes: Sequence[int],
                          max_model_len: int, block_size: int,
                          scratch_block: int) -> DecodeGraphs:
    """Build and capture the decode graphs of a CUDA engine; logs what it took."""
    device = kv_cache.device
    free_before = torch.cuda.mem_get_info(device)[0]
    graphs = DecodeGraphs.build(model, kv_cache, sizes, max_model_len, block_size,
                                scratch_block)
    seconds = graphs.capture()
    used = free_before - torch.cuda.mem_get_info(device)[0]
    log.info("CUDA graphs: %d decode batch sizes (%s) captured in %.1f s, %.2f GiB",
             len(sizes), ", ".join(map(str, sizes)), seconds, used / (1 << 30))
    return graphs
