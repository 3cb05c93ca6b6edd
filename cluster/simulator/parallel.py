"""Independent simulations on several cores.

The simulator is pure Python, so one process runs on one core; a sweep's configurations do
not depend on one another, so each is simulated in a process of its own
(``concurrent.futures.ProcessPoolExecutor``). Results come back in the order of the inputs
and are the same as a serial run's: each simulation is deterministic.

How the processes are run, and why:
- started with ``spawn`` (a fresh interpreter, no torch, ray or grpc imported): forking a
  process that runs threads (a server, a test session, numpy's) can deadlock a child;
- the shared input (the trace) is pickled once into a temporary file that each process
  loads with its first task (an error loading it is that task's error): passed as a
  start-up argument, it would be written into each child's pipe from ``submit``, which
  then waits for the child to read it all (and forever if the child dies first);
- a process ignores Ctrl-C (this process stops them all) and exits when this process dies,
  however it dies, instead of running on with its copy of the trace (removing the trace's
  file, which a process killed with -9 leaves behind).
"""

from __future__ import annotations

import math
import multiprocessing
import multiprocessing.connection
import os
import pickle
import signal
import tempfile
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from cluster import compiled


class SimulationProcessDied(RuntimeError):
    """A process running simulations ended before its work did (killed by a signal or the
    OOM killer, or it could not start)."""


_shared: str | None = None  # in a sweep process: the shared input's file, until loaded
_context: Any = None  # ... and the shared input, loaded by the first task


def default_jobs(cpu_max: Path = Path("/sys/fs/cgroup/cpu.max")) -> int:
    """The cores this process may use: its CPU affinity (as ``nproc`` counts them), capped
    by a cgroup v2 CPU quota (``cpu_max``: a container's ``--cpus``) when there is one."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    try:
        quota, period = cpu_max.read_text().split()
    except (OSError, ValueError):
        return cores
    if quota == "max":
        return cores
    return max(1, min(cores, math.ceil(int(quota) / int(period))))


def map_in_processes(
    task: Callable[..., Any],
    items: Sequence[tuple],
    context: Any,
    jobs: int = 1,
    progress: Callable[[int, int, Any], None] | None = None,
) -> list:
    """``[task(context, *item) for item in items]``, on up to ``jobs`` processes.

    ``task`` must be a module-level function (a process imports it by name) and ``context``
    picklable. ``progress(done, total, result)`` is called in this process as each result
    arrives. An exception raised by a task is raised here, and a process that dies raises
    ``SimulationProcessDied``; either way the other processes are stopped at once.
    """
    n = len(items)
    if jobs <= 1 or n <= 1:
        results = []
        for item in items:
            results.append(task(context, *item))
            if progress is not None:
                progress(len(results), n, results[-1])
        return results
    with tempfile.TemporaryDirectory(prefix="splitserve-sweep-") as tmp:
        shared = Path(tmp) / "context.pickle"
        shared.write_bytes(pickle.dumps(context, protocol=pickle.HIGHEST_PROTOCOL))
        return _run_pool(task, items, str(shared), min(jobs, n), progress)


def _run_pool(task: Callable[..., Any], items: Sequence[tuple], shared: str, jobs: int,
              progress: Callable[[int, int, Any], None] | None) -> list:
    n = len(items)
    out: list = [None] * n
    spawn = _RecordingContext()
    pool = ProcessPoolExecutor(max_workers=jobs, mp_context=spawn,  # type: ignore[arg-type]
                               initializer=_start, initargs=(shared, compiled.active_build()))
    mine = spawn.processes
    try:
        with _ctrl_c_held():  # the processes start in ``submit``
            futures = {pool.submit(_call, task, item): i for i, item in enumerate(items)}
        for done, future in enumerate(as_completed(futures), 1):
            i = futures[future]
            out[i] = future.result()
            if progress is not None:
                progress(done, n, out[i])
    except BrokenProcessPool as e:
        _stop(pool, mine)
        # the pool SIGTERMs the others once one died: -15 is the cause only if alone
        codes = sorted({p.exitcode for p in mine if p.exitcode not in (None, 0)})
        codes = [c for c in codes if c != -signal.SIGTERM] or codes
        raise SimulationProcessDied(
            f"a simulation process ended before its work did (exit code "
            f"{', '.join(map(str, codes)) or 'unknown'}; -9 is SIGKILL, as the OOM killer "
            "sends it: each process holds its own copy of the trace, so fewer jobs at once "
            "need less memory)"
        ) from e
    except BaseException:  # a task's error, or Ctrl-C: no process may run on
        _stop(pool, mine)
        raise
    pool.shutdown(wait=True)
    return out


class _RecordingContext:
    """The ``spawn`` context, keeping the processes it makes: the pool's own, to end."""

    def __init__(self) -> None:
        self._context = multiprocessing.get_context("spawn")
        self.processes: list[multiprocessing.process.BaseProcess] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._context, name)

    def Process(self, *args: Any, **kwargs: Any) -> multiprocessing.process.BaseProcess:  # noqa: N802
        proc = self._context.Process(*args, **kwargs)
        self.processes.append(proc)
        return proc


@contextmanager
def _ctrl_c_held() -> Iterator[None]:
    """Ctrl-C while processes start takes effect once they have started (one cut off half
    started would be known to no one). They start with SIGINT blocked (a signal mask
    survives exec) until they ignore it (``_start``). Here it is caught by a handler, not
    only masked (another thread of this process, numpy's, may take the signal), then sent
    again to the handler it had, once the processes are known."""
    previous = signal.getsignal(signal.SIGINT)
    if threading.current_thread() is not threading.main_thread() or previous is None:
        yield  # not ours to hold: only the main thread handles it, and a C handler is kept
        return
    caught: list[int] = []
    signal.signal(signal.SIGINT, lambda signum, frame: caught.append(signum))
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        signal.signal(signal.SIGINT, previous)
        if caught:
            signal.raise_signal(signal.SIGINT)  # KeyboardInterrupt, if that is its handler


def _stop(pool: ProcessPoolExecutor, processes: list[multiprocessing.process.BaseProcess]
          ) -> None:
    """Cancel what has not started and end the pool's processes instead of waiting for
    the simulations they run (a second Ctrl-C meanwhile cannot cut this short)."""
    with _ctrl_c_held():
        pool.shutdown(wait=False, cancel_futures=True)
        started = [proc for proc in processes if proc.pid is not None]  # not: start() failed
        for proc in started:
            proc.terminate()
        for proc in started:
            proc.join(5)
            if proc.exitcode is None:  # it outlived SIGTERM (a handler of its own, ...)
                proc.kill()
                proc.join()
        pool.shutdown(wait=True)  # the pool's thread sees its processes end, and reaps them


def _start(shared: str, build: Path | None) -> None:
    """A sweep process's start: run the simulator compiled as the parent does (``build``),
    leave Ctrl-C to the parent (which ends this process), and exit when the parent is gone.
    The shared input is loaded by the first task, so that an error loading it comes back as
    that task's error."""
    global _shared
    compiled.use_build(build)  # before a task imports the simulator's modules
    _shared = shared
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # drops a Ctrl-C pending since start-up
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    parent = multiprocessing.parent_process()
    if parent is not None:
        threading.Thread(target=_exit_with, args=(parent.sentinel, shared), daemon=True,
                         name="exit-with-parent").start()


def _exit_with(parent_sentinel: int, shared: str) -> None:
    """Once the parent is gone: remove the shared input's file (a parent killed with -9
    could not), then exit."""
    multiprocessing.connection.wait([parent_sentinel])
    try:
        os.unlink(shared)
        os.rmdir(os.path.dirname(shared))
    except FileNotFoundError:  # another of the parent's processes removed it first
        pass
    finally:
        os._exit(1)


def _call(task: Callable[..., Any], item: tuple) -> Any:
    global _context, _shared
    if _shared is not None:
        _context = pickle.loads(Path(_shared).read_bytes())
        _shared = None
    return task(_context, *item)
