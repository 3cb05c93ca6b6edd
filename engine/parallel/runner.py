"""Rank 0's model runner under tensor parallelism.

The same ``ModelRunner`` (inputs, forward, sampling), plus: each step's packed inputs are
broadcast to the other ranks before the forward (``_inputs``), copy-on-write block copies
are sent to them too, and a broken group becomes a ``TensorParallelError`` — raised at once
by every later call, so nothing waits on a dead rank. ``close`` stops the ranks.
"""

from __future__ import annotations

import logging
import weakref

import torch

from engine.model_runner import ModelRunner
from engine.parallel.comm import OP_COPY, OP_STEP, OP_STOP, TPComm
from engine.parallel.errors import TensorParallelError, describe_exit

log = logging.getLogger(__name__)

STOP_JOIN_S = 10.0  # how long close() lets each rank exit before killing it


class TPModelRunner(ModelRunner):
    supports_prompt_logprobs = False  # extra logits rows would need the ranks too

    def __init__(self, model, kv_cache: torch.Tensor, block_size: int, device: torch.device,
                 seed: int, comm: TPComm, handles: list, restore_threads: int) -> None:
        super().__init__(model, kv_cache, block_size, device, seed)
        self.comm, self.handles = comm, handles
        self.error: TensorParallelError | None = None
        self._restore_threads = restore_threads
        self._mid_step = False  # between a step's message and its last collective
        gather = model.gather_logits

        def gather_then_mark(local: torch.Tensor):  # the step's last collective
            out = gather(local)
            self._mid_step = False
            return out

        model.gather_logits = gather_then_mark
        # Stop the ranks when the engine is collected or the interpreter exits, too.
        self._finalizer = weakref.finalize(self, _shutdown, comm, handles, restore_threads)

    @property
    def tensor_parallel_size(self) -> int:
        return self.comm.size

    def execute(self, batch):
        self._raise_if_broken()
        try:
            out = super().execute(batch)
        except Exception as e:
            if self._mid_step:  # the ranks are out of step: the group cannot go on
                raise self._broken(e) from e
            raise  # after the last collective (sampling): the ranks wait for the next step
        self._mid_step = False
        return out

    def _inputs(self, longs, int32s, T, query_lens, seq_lens, num_decodes):
        self._mid_step = True
        self.comm.send(OP_STEP, longs, int32s, len(query_lens), num_decodes)
        return super()._inputs(longs, int32s, T, query_lens, seq_lens, num_decodes)

    @torch.inference_mode()
    def copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        if not copies:
            return
        self._raise_if_broken()
        try:
            src, dst = zip(*copies, strict=True)
            self.comm.send(OP_COPY, torch.tensor(src + dst, dtype=torch.long))
        except Exception as e:
            raise self._broken(e) from e
        super().copy_blocks(copies)

    def call_ranks(self, fn, *args) -> None:
        """Have ranks 1..N-1 run ``fn(runner, comm, *args)`` (picklable) between steps.
        On the engine thread, like every message to the ranks; returns once sent, not
        once run (``fn`` reports back through whatever it sets up)."""
        self._raise_if_broken()
        try:
            self.comm.send_call(fn, *args)
        except Exception as e:
            raise self._broken(e) from e

    def close(self) -> None:
        """Stop every rank (idempotent)."""
        self._finalizer()

    def _raise_if_broken(self) -> None:
        if self.error is not None:
            raise self.error
        if not self._finalizer.alive:
            raise TensorParallelError("this engine was closed; create a new one")

    def _broken(self, cause: Exception) -> TensorParallelError:
        """The error every later call raises; which rank stopped, in words."""
        log.error("tensor-parallel step failed: %s", cause)
        size = self.comm.size
        dead = [(rank, h.exitcode()) for rank, h in enumerate(self.handles, start=1)]
        dead = [(rank, code) for rank, code in dead if code is not None]
        if dead:
            rank, code = dead[0]
            what = f"tensor-parallel rank {rank} of {size} {describe_exit(code)}"
        elif self.comm.is_timeout(cause):
            what = (f"a tensor-parallel rank of {size} did not answer within "
                    f"{self.comm.timeout_s:.0f} s")
        else:
            what = f"a tensor-parallel step failed on rank 0 of {size} ({type(cause).__name__})"
        self.error = TensorParallelError(
            f"{what}; this engine cannot run its model any more: restart it")
        if self._finalizer.detach() is not None:  # out of step: no goodbye, just stop them
            _shutdown(self.comm, self.handles, self._restore_threads, graceful=False)
        return self.error


def _shutdown(comm: TPComm, handles: list, restore_threads: int, graceful: bool = True) -> None:
    if graceful:
        try:
            comm.send(OP_STOP)
        except Exception as e:  # a rank is already gone: the kills below end the others
            log.warning("tensor-parallel stop message not delivered: %s", e)
            graceful = False
    for handle in handles:
        if graceful:
            handle.join(STOP_JOIN_S)
        handle.kill()
        handle.join(STOP_JOIN_S)
    comm.close()
    torch.set_num_threads(restore_threads)
