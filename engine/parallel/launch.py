"""Starting the tensor-parallel ranks of one engine, and rank 0's side of the startup.

``start_tensor_parallel(engine, size)`` (called by ``Engine`` when ``tensor_parallel_size >
1``) hosts the group's TCPStore on a free port of 127.0.0.1, starts ranks 1 .. size-1
through a ``RankLauncher``, joins the group as rank 0, loads rank 0's shard and returns
rank 0's model runner. Startup, in order, on every rank::

    connect to rank 0's store -> announce "ready" -> join the gloo group
    -> load this rank's shard -> agree on the KV block count (MIN; 0 = a rank failed)
    -> allocate this rank's KV cache -> (ranks >= 1) serve step messages

While waiting for the others to announce themselves, rank 0 watches their handles, so a
rank that dies at startup is an error at once, not a timeout.

Swapping how ranks start: a ``RankLauncher`` has one method, ``start(spec) ->
RankHandle``; the handle says whether the rank still runs (``exitcode``) and can
``kill``/``join`` it. ``LocalProcessLauncher`` (the default) spawns local processes; a
cluster worker would pass a launcher whose ``start`` creates a Ray actor in the worker
group's placement group and calls ``engine.parallel.worker.run_rank(spec)`` in it (with
``spec.host`` the node's address instead of 127.0.0.1), and whose handle maps the actor's
state to ``exitcode``.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace
from typing import Any, Protocol

import torch

from engine.parallel.comm import TPComm, host_store
from engine.parallel.errors import TensorParallelError, describe_exit
from engine.parallel.worker import RankSpec, build_rank

log = logging.getLogger(__name__)

STARTUP_POLL_S = 0.05


class RankHandle(Protocol):
    def exitcode(self) -> int | None:
        """None while the rank runs; else its exit status (negative: killed by signal)."""

    def kill(self) -> None: ...

    def join(self, timeout: float) -> None: ...


class RankLauncher(Protocol):
    def start(self, spec: RankSpec) -> RankHandle:
        """Start rank ``spec.rank``: something that calls ``worker.run_rank(spec)``."""


class _ProcessHandle:
    def __init__(self, process: Any) -> None:
        self.process = process

    def exitcode(self) -> int | None:
        return self.process.exitcode

    def kill(self) -> None:
        if self.process.exitcode is None:
            self.process.kill()

    def join(self, timeout: float) -> None:
        self.process.join(timeout)

    @property
    def pid(self) -> int:
        return self.process.pid


class LocalProcessLauncher:
    """Each rank a local daemon process (``torch.multiprocessing``). Never a plain fork of
    the engine process (its threads and CUDA state do not survive one): ``"forkserver"``
    (the default) forks from a clean server process that imported the engine once, so
    only the first rank start of a process pays for importing torch (~2-5 s here), later
    ones take well under a second; ``"spawn"`` starts a fresh interpreter every time."""

    PRELOAD = ["engine.parallel.worker", "engine.models.loader", "engine.model_runner"]

    def __init__(self, start_method: str = "forkserver") -> None:
        self.start_method = start_method

    def start(self, spec: RankSpec) -> RankHandle:
        import torch.multiprocessing as mp

        from engine.parallel.worker import run_rank

        context = mp.get_context(self.start_method)
        if self.start_method == "forkserver":
            context.set_forkserver_preload(self.PRELOAD)
        process = context.Process(target=run_rank, args=(spec,), daemon=True,
                                  name=f"tp-rank-{spec.rank}")
        process.start()
        return _ProcessHandle(process)


@dataclass(frozen=True)
class ParallelConfig:
    tensor_parallel_size: int = 1
    """Ranks the model is split over (1: no tensor parallelism)."""
    host: str = "127.0.0.1"
    """Address rank 0's store and the gloo group listen on (local ranks: loopback)."""
    timeout_s: float = 60.0
    """Longest wait of a step's collective (a rank silent that long fails the engine)."""
    startup_timeout_s: float = 600.0
    """Longest wait for the ranks to start and load their shards."""
    threads_per_rank: int | None = None
    """CPU: torch threads of each rank (rank 0 included, restored at close); None = this
    process's threads divided by the size, so the ranks share the cores, not fight."""


def start_tensor_parallel(engine: Any, config: ParallelConfig,
                          launcher: RankLauncher | None = None, seed: int = 0):
    """Start the other ranks and return rank 0's ``TPModelRunner``; sets ``engine.model``
    (rank 0's shard) and ``engine.num_blocks`` (agreed by every rank)."""
    from engine.parallel.runner import TPModelRunner

    size, launcher = config.tensor_parallel_size, launcher or LocalProcessLauncher()
    threads = config.threads_per_rank or max(1, torch.get_num_threads() // size)
    store = host_store(config.host, config.startup_timeout_s)
    base = RankSpec(str(engine.model_dir), str(engine.dtype).removeprefix("torch."),
                    str(engine.device), engine.attn_backend.name,
                    engine.cache_config.block_size, 0, size, config.host, store.port,
                    config.timeout_s, config.startup_timeout_s,
                    threads if engine.device.type == "cpu" else None,
                    engine.cache_config.kv_cache_dtype,
                    (engine.cache_config.k_scale, engine.cache_config.v_scale),
                    engine.cache_config.gpu_memory_utilization)
    handles: list[RankHandle] = []
    previous_threads = torch.get_num_threads()
    try:
        for rank in range(1, size):
            handles.append(launcher.start(replace(base, rank=rank, device=_device(engine, rank))))
        _wait_ready(store, handles, config.startup_timeout_s)
        if base.num_threads:
            torch.set_num_threads(base.num_threads)
        comm = TPComm(store, 0, size, config.host, config.timeout_s, engine.device,
                      config.startup_timeout_s)
        build = build_rank(base, comm, lambda _bytes_per_block: engine._num_kv_blocks())
        if build is None:
            raise TensorParallelError("a tensor-parallel rank could not load its shard of the "
                                      "model or fit a KV block (its log says why); fix that "
                                      "and restart")
        model, kv_cache, engine.num_blocks = build
    except BaseException:
        torch.set_num_threads(previous_threads)
        for handle in handles:
            handle.kill()
        raise
    engine.model = model
    return TPModelRunner(model, kv_cache, engine.cache_config.block_size, engine.device, seed,
                         comm, handles, previous_threads)


def _device(engine: Any, rank: int) -> str:
    """Rank ``rank``'s device: CPU for a CPU engine, else the ``rank``-th card after rank
    0's (one GPU per rank)."""
    if engine.device.type != "cuda":
        return str(engine.device)
    return f"cuda:{(engine.device.index or 0) + rank}"


def _wait_ready(store: Any, handles: list[RankHandle], timeout_s: float) -> None:
    """Until every rank has announced itself; TensorParallelError as soon as one is dead
    or when ``timeout_s`` passes."""
    deadline = time.monotonic() + timeout_s
    for rank, handle in enumerate(handles, start=1):
        while not store.check([f"tp/ready/{rank}"]):
            code = handle.exitcode()
            if code is not None:
                raise TensorParallelError(
                    f"tensor-parallel rank {rank} of {len(handles) + 1} {describe_exit(code)} "
                    "while starting; see its log, fix the cause and restart")
            if time.monotonic() > deadline:
                raise TensorParallelError(
                    f"tensor-parallel rank {rank} did not start within {timeout_s:.0f} s; "
                    "check the machine's load and restart")
            time.sleep(STARTUP_POLL_S)
