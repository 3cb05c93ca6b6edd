"""A tensor-parallel rank other than 0: load this rank's shard, then run every step rank 0
broadcasts, writing this rank's KV shard, until rank 0 says stop.

``run_rank(spec)`` is the whole life of such a rank, the function any launcher runs (a
local process here; a Ray actor in a cluster). ``build_rank`` is the startup shared with
rank 0. A rank never schedules or samples: it holds no block pool, and the tokens it needs
arrive in the next step's message.
"""

from __future__ import annotations

import datetime
import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch

from engine.parallel.comm import OP_CALL, OP_COPY, OP_STEP, OP_STOP, TPComm

log = logging.getLogger(__name__)

ANY_BLOCKS = 1 << 62  # a rank that lets rank 0's KV budget decide


@dataclass(frozen=True)
class RankSpec:
    """What a rank needs to start (picklable: it crosses to the new process)."""

    model_dir: str
    dtype: str  # "float32", "bfloat16", ...
    device: str  # this rank's device: "cpu", "cuda:1"
    attention_backend: str  # rank 0's choice (a registry name), so every rank runs the same
    block_size: int
    rank: int
    size: int
    host: str  # rank 0's store
    port: int
    timeout_s: float  # a step's collectives
    startup_timeout_s: float  # joining the group, loading the shards
    num_threads: int | None  # CPU: torch threads of this rank
    kv_cache_dtype: str = "auto"  # "auto" (the model's dtype), "fp8_e4m3", "fp8_e5m2"
    kv_scales: tuple[float, float] = (1.0, 1.0)  # an fp8 cache's per-tensor (k, v) scales
    gpu_memory_utilization: float = 0.9  # CUDA: this rank's share of its device


def build_rank(spec: RankSpec, comm: TPComm, local_blocks: Callable[[int], int]):
    """Load this rank's shard and allocate its KV cache for the block count every rank
    agreed on: the least of what each rank's ``local_blocks(bytes per block of its shard)``
    says it holds. Returns (model, kv_cache, num_blocks), or None when some rank failed
    (rank 0 re-raises its own failure: its message says what to change)."""
    from engine.attention.kv_quant import cache_dtype
    from engine.attention.registry import select_backend
    from engine.kv_layout import new_kv_cache
    from engine.models.loader import load_model
    from engine.parallel.shard import Shard
    from engine.parallel.sharding import TPContext

    device, dtype = torch.device(spec.device), getattr(torch, spec.dtype)
    shard = Shard(spec.rank, spec.size)
    error: Exception | None = None
    try:
        backend = select_backend(spec.attention_backend, device, spec.block_size,
                                 spec.kv_cache_dtype, spec.kv_scales)
        model = load_model(spec.model_dir, dtype, device, backend, TPContext(shard, comm))
        cfg = model.config
        k0, k1 = shard.kv_heads(cfg.num_kv_heads, cfg.num_heads)
        kv_dtype = cache_dtype(spec.kv_cache_dtype, dtype)
        mine = local_blocks(cfg.num_layers * 2 * spec.block_size * (k1 - k0) * cfg.head_dim
                            * kv_dtype.itemsize)
    except Exception as e:  # every rank must still take part in the agreement below
        error, mine = e, 0
        if spec.rank:
            log.exception("tensor-parallel rank %d could not load its shard", spec.rank)
    num_blocks = comm.agree_min(mine)
    if error is not None and spec.rank == 0:
        raise error
    if num_blocks == 0:
        return None
    # This rank's KV heads only, laid out as the engine's (see engine.kv_layout).
    kv_cache = new_kv_cache(num_blocks, cfg.num_layers, spec.block_size, k1 - k0,
                            cfg.head_dim, kv_dtype, device)
    return model, kv_cache, num_blocks


def run_rank(spec: RankSpec) -> None:
    """The life of rank ``spec.rank`` >= 1 (blocks until rank 0 stops it or goes away)."""
    import torch.distributed as dist

    from engine.model_runner import ModelRunner

    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    if spec.num_threads:
        torch.set_num_threads(spec.num_threads)
    store = dist.TCPStore(spec.host, spec.port, is_master=False, wait_for_workers=False,
                          timeout=datetime.timedelta(seconds=spec.startup_timeout_s))
    store.set(f"tp/ready/{spec.rank}", "1")
    comm = TPComm(store, spec.rank, spec.size, spec.host, spec.timeout_s,
                  torch.device(spec.device), spec.startup_timeout_s)
    try:
        built = build_rank(spec, comm, lambda nbytes: own_kv_blocks(spec, nbytes))
        if built is not None:
            model, kv_cache, _ = built
            serve(ModelRunner(model, kv_cache, spec.block_size, torch.device(spec.device)), comm)
    except RuntimeError as e:  # the group broke: rank 0 is gone, nothing is left to serve
        log.warning("tensor-parallel rank %d stops: the group broke (%s)", spec.rank, e)
        sys.exit(1)
    finally:
        comm.close()


def own_kv_blocks(spec: RankSpec, bytes_per_block: int) -> int:
    """The KV blocks rank ``spec.rank`` >= 1 can hold: on CUDA what its share of its own
    device holds once its shard is loaded (the devices of one group may differ in what
    else they hold); elsewhere ``ANY_BLOCKS`` (one host memory: rank 0's budget decides).
    0 (the group fails to start, naming this rank) when not one block fits."""
    device = torch.device(spec.device)
    if device.type != "cuda":
        return ANY_BLOCKS
    from engine.memory_budget import GIB, device_share_bytes

    budget = device_share_bytes(device, spec.gpu_memory_utilization)
    if budget < bytes_per_block:
        log.error("tensor-parallel rank %d: %.2f GiB of %s is left for its KV cache, less than "
                  "one block (%d bytes); raise gpu_memory_utilization or free the device",
                  spec.rank, max(budget, 0) / GIB, device, bytes_per_block)
        return 0
    return budget // bytes_per_block


@torch.inference_mode()
def serve(runner, comm: TPComm) -> None:
    """Run rank 0's messages until OP_STOP: each step the same forward as rank 0 on the
    same inputs (this rank's heads, experts and vocabulary rows)."""
    model, device = runner.model, runner.device
    while True:
        op, longs, int32s, S, num_decodes = comm.receive()
        if op == OP_STOP:
            return
        if op == OP_COPY:  # copy-on-write of forked requests: src ids, then dst ids
            n = longs.numel() // 2
            runner.copy_blocks(list(zip(longs[:n].tolist(), longs[n:].tolist(), strict=True)))
            continue
        if op == OP_CALL:  # start-up work rank 0 asks for (see TPComm.send_call)
            fn, args = comm.call_of(longs, S)
            try:
                fn(runner, comm, *args)
            except Exception:  # rank 0 learns it from what fn was to do (it times out)
                log.exception("tensor-parallel rank %d: %s failed", comm.rank,
                              getattr(fn, "__name__", fn))
            continue
        if op != OP_STEP:
            raise RuntimeError(f"unknown tensor-parallel message {op}")
        cu_q = int32s[: S + 1]
        query_lens, seq_lens = cu_q.diff().tolist(), int32s[2 * S + 2 : 3 * S + 2].tolist()
        input_ids, positions, metadata, sample_rows = runner._inputs(
            longs.to(device), int32s.to(device), int(cu_q[-1]), query_lens, seq_lens,
            num_decodes)
        hidden = model(input_ids, positions, runner.kv_cache, metadata)
        if sample_rows.numel():  # this rank's vocabulary rows, gathered on rank 0
            model.compute_logits(hidden.index_select(0, sample_rows))
