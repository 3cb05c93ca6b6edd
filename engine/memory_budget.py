"""The KV cache's share of a GPU: ``gpu_memory_utilization`` as vLLM users know it.

On CUDA (one device, no explicit ``kv_cache_memory_bytes`` or block count) the engine lets
the KV cache have what is left of its share of the device once everything else it needs is
counted::

    kv = total * gpu_memory_utilization - weights - activation peak - CUDA graph pool
    kv <= free now - activation peak - graph pool      (other processes, the CUDA context)

* weights: what this process holds after loading the model;
* activation peak: the most a step allocates on top of that, measured by running one
  prefill of ``max_num_batched_tokens`` tokens (the largest step; ``max_num_seqs`` of them
  sampled, through the sampler) on a tiny temporary KV cache;
* graph pool: the memory the captured decode graphs keep (``engine.cuda_graphs``),
  estimated by an eager run of the largest bucket's padded step (what its capture
  allocates; the buckets share one pool), with a margin.

The arithmetic is ``kv_budget_bytes`` (pure); the measuring is behind ``MemoryProfiler``
(``CudaMemoryProfiler`` on a GPU, a fake with fixed numbers in CPU tests). CPU engines do
not come here; tensor-parallel ranks take ``device_share_bytes``, each on its own device
(see ``Engine._num_kv_blocks`` and ``engine.parallel.worker.own_kv_blocks``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch

log = logging.getLogger(__name__)

GIB = 1 << 30
# The graph pool holds a capture's activations in the caching allocator's segments (rounded
# up, some fragmentation) plus cuBLAS's workspace of the capture stream: the eager peak of
# the largest bucket is scaled by this, plus a fixed allowance.
GRAPH_POOL_MARGIN = 1.25
GRAPH_POOL_FIXED_BYTES = 64 << 20


@dataclass(frozen=True)
class MemoryProfile:
    """What serving needs besides the KV cache, in bytes, on one device."""

    total: int  # the device's memory
    free: int  # free on the device with the weights loaded and the profile's memory returned
    weights: int  # held by this process after loading the model
    activation_peak: int  # the largest step's peak on top of the weights
    graphs: int  # estimated CUDA graph pool (0: no graphs)


class MemoryProfiler(Protocol):
    def profile(self) -> MemoryProfile:
        """Measure (or, in tests, make up) the numbers the KV budget is computed from."""


def kv_budget_bytes(total: int, utilization: float, weights: int, peak: int, graphs: int,
                    free: int) -> int:
    """Bytes the KV cache may take: the engine's share of the device (``total *
    utilization``) less the weights, the activation peak and the graph pool, and never more
    than ``free`` (measured with only the weights held) less the activations and graphs
    still to come. 0 when nothing is left."""
    share = int(total * utilization) - weights - peak - graphs
    room = free - peak - graphs
    return max(0, min(share, room))


def device_share_bytes(device: torch.device, utilization: float) -> int:
    """Without a profile (tensor-parallel ranks): this process's share of CUDA ``device``
    (``total * utilization``) less what it already holds (its weights), never more than is
    actually free (other processes may share the GPU)."""
    torch.cuda.empty_cache()  # cached blocks of dead tensors are not ours to count
    free, total = torch.cuda.mem_get_info(device)
    own = torch.cuda.memory_allocated(device)
    return min(int(total * utilization) - own, int(free * 0.95))


def budget_from_profile(profile: MemoryProfile, utilization: float) -> int:
    return kv_budget_bytes(profile.total, utilization, profile.weights,
                           profile.activation_peak, profile.graphs, profile.free)


def kv_cache_log_line(num_blocks: int, block_size: int, bytes_per_block: int,
                      profile: MemoryProfile, utilization: float) -> str:
    """The start-up line saying what the budget gave."""
    return (f"KV cache: {num_blocks} blocks = {num_blocks * block_size} tokens "
            f"({num_blocks * bytes_per_block / GIB:.2f} GiB); weights "
            f"{profile.weights / GIB:.2f} GiB, activations peak "
            f"{profile.activation_peak / GIB:.2f} GiB, CUDA graphs "
            f"{profile.graphs / GIB:.2f} GiB, gpu_memory_utilization {utilization:g}")


@dataclass
class CudaMemoryProfiler:
    """Measures a ``MemoryProfile`` on the model's CUDA device (run once, before the KV cache
    is allocated)."""

    model: torch.nn.Module
    device: torch.device
    allocate_cache: Callable[[int], torch.Tensor]  # num_blocks -> a zeroed KV cache
    block_size: int
    num_tokens: int  # tokens of the largest step (max_num_batched_tokens, <= max_model_len)
    num_seqs: int  # most sequences sampled in a step (max_num_seqs)
    max_model_len: int
    graph_batch: int | None  # the largest captured decode batch; None: no graphs

    def profile(self) -> MemoryProfile:
        dev = self.device
        torch.cuda.synchronize(dev)
        torch.cuda.empty_cache()
        weights = torch.cuda.memory_allocated(dev)
        peak, graphs = self._measure_steps()  # their temporary cache is gone on return
        torch.cuda.empty_cache()
        free, total = torch.cuda.mem_get_info(dev)
        return MemoryProfile(total, free, weights, peak, graphs)

    def _measure_steps(self) -> tuple[int, int]:
        """(activation peak, graph pool estimate), on a KV cache just big enough."""
        seqs = max(1, min(self.num_seqs, self.num_tokens))
        blocks = -(-(self.num_tokens - seqs + 1) // self.block_size) + seqs - 1
        cache = self.allocate_cache(blocks + 1)  # + a scratch block for the graph probe
        peak = self._peak(lambda: self._prefill(cache[:blocks], seqs))
        graphs = 0
        if self.graph_batch is not None:
            decode = self._peak(lambda: self._padded_decode(cache, scratch=blocks))
            graphs = int(decode * GRAPH_POOL_MARGIN) + GRAPH_POOL_FIXED_BYTES
        return peak, graphs

    def _peak(self, run: Callable[[], object]) -> int:
        """Bytes ``run`` allocates at its peak above what is held before it."""
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        base = torch.cuda.memory_allocated(self.device)
        run()
        torch.cuda.synchronize(self.device)
        return torch.cuda.max_memory_allocated(self.device) - base

    def _prefill(self, cache: torch.Tensor, seqs: int) -> None:
        """One step of ``num_tokens`` prompt tokens: ``seqs - 1`` one-token prompts and one
        long one (the longest attention), every sequence sampled (temperature 1, top-p)."""
        from engine.model_runner import ModelRunner

        runner = ModelRunner(self.model, cache, self.block_size, self.device)
        runner.execute(profile_batch(self.num_tokens, seqs, self.block_size,
                                     self.model.config.vocab_size))

    def _padded_decode(self, cache: torch.Tensor, scratch: int) -> None:
        """The largest bucket's padded decode step, eagerly (every row a padding row: only
        the scratch block is written)."""
        from engine.cuda_graphs import DecodeGraphs

        graphs = DecodeGraphs.build(self.model, cache, [self.graph_batch], self.max_model_len,
                                    self.block_size, scratch)
        with torch.inference_mode():
            graphs.inputs.fill((), self.graph_batch)
            graphs.run_eager(self.graph_batch)


def profile_batch(num_tokens: int, seqs: int, block_size: int, vocab_size: int):
    """A ``SchedulerOutput`` of ``seqs`` prompts totalling ``num_tokens`` tokens (all but one
    of a single token), on blocks 0, 1, ... in order, each sampled."""
    from engine.batch import ScheduledRequest, SchedulerOutput
    from engine.request import Request
    from engine.sampling_params import SamplingParams

    params = SamplingParams(max_tokens=1, temperature=1.0, top_p=0.95)
    lengths = [1] * (seqs - 1) + [num_tokens - seqs + 1]
    scheduled, next_block = [], 0
    for i, n in enumerate(lengths):
        request = Request(f"profile-{i}", [(i + j) % vocab_size for j in range(n)], params)
        used = -(-n // block_size)
        request.block_ids = list(range(next_block, next_block + used))
        next_block += used
        scheduled.append(ScheduledRequest(request, n, 0, True))
    return SchedulerOutput(scheduled, 0, num_tokens)
