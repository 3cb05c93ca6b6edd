"""The tensor-parallel group of one engine: its collectives and the per-step message.

A stateless group (no ``init_process_group``, no global state): rank 0 hosts a TCPStore on a
free port, every rank builds its ``ProcessGroupGloo`` from it, so an engine process can host
several engines (tests do) and a cluster worker keeps its KV-transfer groups apart. The
control group is always gloo (the step message is a host tensor); the data group (all-reduce,
logits gather) is gloo on CPU and would be NCCL on CUDA.

The step message (rank 0 -> all), int64::

    [op, n_longs, n_int32s, num_seqs, num_decodes, 0, 0, 0 | payload ...]
     <---------------- header (HEADER) ----------------->  <-- INLINE -->

The payload (the runner's two packed host tensors: int64 ids/positions/slots/sample rows,
then the int32 cumulative lengths and block tables two to an int64) rides inline when it
fits — one broadcast per step — else a second broadcast carries the rest.
"""

from __future__ import annotations

import datetime
import pickle
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

HEADER = 8
INLINE = 1024  # int64s of payload sent with the header (8 KiB: a decode step of ~100 seqs)
OP_STEP, OP_COPY, OP_STOP, OP_CALL = 1, 2, 3, 4
IDLE_WAIT_S = 365 * 24 * 3600.0


def _td(seconds: float) -> datetime.timedelta:
    return datetime.timedelta(seconds=seconds)


def host_store(host: str = "127.0.0.1", timeout_s: float = 60.0) -> Any:
    """Rank 0's TCPStore on a free port of ``host`` (``store.port`` tells which)."""
    return dist.TCPStore(host, 0, is_master=True, wait_for_workers=False,
                         timeout=_td(timeout_s))


class TPComm:
    """One rank's view of the group: ``all_reduce`` (in place, sum), ``gather_logits``,
    the step message, and ``close``."""

    def __init__(self, store: Any, rank: int, size: int, host: str, timeout_s: float,
                 device: torch.device, startup_timeout_s: float = 600.0) -> None:
        """``timeout_s``: longest wait of a step's collective; ``startup_timeout_s``: of
        joining the group and of the agreement after loading (big checkpoints load for
        minutes)."""
        self.rank, self.size, self.store, self.timeout_s = rank, size, store, timeout_s
        self.startup_timeout_s = startup_timeout_s
        opts = dist.ProcessGroupGloo._Options()
        opts._devices = [dist.ProcessGroupGloo.create_device(hostname=host)]
        opts._timeout = _td(startup_timeout_s)
        self.ctrl = dist.ProcessGroupGloo(dist.PrefixStore("tp/ctrl/", store), rank, size, opts)
        self.data = self.ctrl
        if device.type == "cuda":  # untested here (no multi-GPU machine): NCCL for tensors
            nccl = dist.ProcessGroupNCCL.Options()
            nccl._timeout = _td(startup_timeout_s)
            self.data = dist.ProcessGroupNCCL(dist.PrefixStore("tp/data/", store), rank, size,
                                              nccl)
        self._buf = torch.zeros(HEADER + INLINE, dtype=torch.long)
        # Options made once (not per call): every step collective waits at most timeout_s.
        self._reduce_opts = dist.AllreduceOptions()
        self._gather_opts = dist.GatherOptions()
        self._gather_opts.rootRank = 0
        self._bcast_opts = dist.BroadcastOptions()
        self._bcast_opts.rootRank = 0
        for o in (self._reduce_opts, self._gather_opts, self._bcast_opts):
            o.timeout = _td(timeout_s)
        # A rank >= 1 waits for the next step as long as rank 0 stays idle (no timeout in
        # practice); rank 0 dying still ends the wait at once (its sockets close).
        self._idle_opts = dist.BroadcastOptions()
        self._idle_opts.rootRank = 0
        self._idle_opts.timeout = _td(IDLE_WAIT_S)
        # Benchmarks: seconds spent inside each kind of collective, while ``count_time``
        # (waiting for a slower rank counts here too: it is time the collective costs).
        self.count_time = False
        self.seconds = {"all_reduce": 0.0, "gather": 0.0, "broadcast": 0.0}
        self.calls = {"all_reduce": 0, "gather": 0, "broadcast": 0}

    def _count(self, kind: str, t0: float) -> None:
        self.seconds[kind] += time.perf_counter() - t0
        self.calls[kind] += 1

    # -- collectives on activations (every rank, every layer) -------------------------------
    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum ``x`` over the ranks, in place; returns it."""
        if self.count_time:
            t0 = time.perf_counter()
            self.data.allreduce([x], self._reduce_opts).wait()
            self._count("all_reduce", t0)
        else:
            self.data.allreduce([x], self._reduce_opts).wait()
        return x

    def gather_logits(self, local: torch.Tensor) -> torch.Tensor | None:
        """``local`` [V / tp, n] (this rank's vocabulary rows) -> on rank 0 all ranks' rows
        stacked [V_padded, n]; None on the others."""
        local = local.contiguous()
        t0, opts = time.perf_counter(), self._gather_opts
        if self.rank == 0:
            parts = [torch.empty_like(local) for _ in range(self.size)]
            self.data.gather([parts], [local], opts).wait()
            out = torch.cat(parts)
        else:
            self.data.gather([], [local], opts).wait()
            out = None
        if self.count_time:
            self._count("gather", t0)
        return out

    # -- the step message (rank 0 -> others) ------------------------------------------------
    def send(self, op: int, longs: torch.Tensor | None = None,
             int32s: torch.Tensor | None = None, num_seqs: int = 0,
             num_decodes: int = 0) -> None:
        """Rank 0: broadcast one message (``longs`` int64, ``int32s`` int32, both 1-D)."""
        n_longs = 0 if longs is None else longs.numel()
        n_int32s = 0 if int32s is None else int32s.numel()
        parts = [] if longs is None else [longs]
        if n_int32s:
            if n_int32s % 2:  # two int32s per int64
                int32s = torch.cat([int32s, int32s.new_zeros(1)])
            parts.append(int32s.view(torch.long))
        payload = torch.cat(parts) if len(parts) > 1 else (parts[0] if parts else None)
        n = 0 if payload is None else payload.numel()
        buf = self._buf
        buf[:HEADER] = torch.tensor([op, n_longs, n_int32s, num_seqs, num_decodes, 0, 0, 0])
        if n:
            buf[HEADER : HEADER + min(n, INLINE)] = payload[:INLINE]
        self._broadcast(buf)
        if n > INLINE:
            self._broadcast(payload[INLINE:].contiguous())

    def send_call(self, fn: Callable, *args: Any) -> None:
        """Rank 0: have every other rank run ``fn(runner, comm, *args)`` between two steps
        (start-up work such as the KV-transfer agents; pickled, so rare and small)."""
        data = pickle.dumps((fn, args))
        padded = torch.zeros(-(-len(data) // 8) * 8, dtype=torch.uint8)
        padded[: len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        self.send(OP_CALL, padded.view(torch.long), num_seqs=len(data))

    @staticmethod
    def call_of(longs: torch.Tensor, nbytes: int) -> tuple[Callable, tuple]:
        """The (fn, args) an OP_CALL message carries (``nbytes``: its num_seqs field)."""
        return pickle.loads(longs.view(torch.uint8)[:nbytes].numpy().tobytes())

    def receive(self) -> tuple[int, torch.Tensor, torch.Tensor, int, int]:
        """Other ranks: (op, longs, int32s, num_seqs, num_decodes) of the next message."""
        buf = self._buf
        self.ctrl.broadcast([buf], self._idle_opts).wait()
        op, n_longs, n_int32s, num_seqs, num_decodes = buf[:5].tolist()
        n = n_longs + (n_int32s + 1) // 2
        payload = torch.empty(n, dtype=torch.long)
        payload[: min(n, INLINE)] = buf[HEADER : HEADER + min(n, INLINE)]
        if n > INLINE:
            rest = torch.empty(n - INLINE, dtype=torch.long)
            self._broadcast(rest)
            payload[INLINE:] = rest
        int32s = payload[n_longs:].view(torch.int32)[:n_int32s]
        return op, payload[:n_longs], int32s, num_seqs, num_decodes

    def _broadcast(self, t: torch.Tensor) -> None:
        t0 = time.perf_counter()
        self.ctrl.broadcast([t], self._bcast_opts).wait()
        if self.count_time:
            self._count("broadcast", t0)

    def agree_min(self, value: int) -> int:
        """The smallest ``value`` over the ranks (startup: KV blocks every rank can hold;
        a rank that failed to start sends 0)."""
        t = torch.tensor([value], dtype=torch.long)
        opts = dist.AllreduceOptions()
        opts.reduceOp = dist.ReduceOp.MIN
        opts.timeout = _td(self.startup_timeout_s)
        self.ctrl.allreduce([t], opts).wait()
        return int(t.item())

    @staticmethod
    def is_timeout(error: BaseException) -> bool:
        """True for a collective that gave up waiting (gloo says "Timed out")."""
        return "timed out" in str(error).lower()

    def close(self) -> None:
        for group in {id(self.ctrl): self.ctrl, id(self.data): self.data}.values():
            shutdown: Callable | None = getattr(group, "shutdown", None)
            if shutdown is not None:
                shutdown()
