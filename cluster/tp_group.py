"""A tensor-parallel worker on Ray: a group of N actors on one node, placed together.

A pool whose ``engine.tensor_parallel_size`` is N > 1 runs each worker as a group::

    placement group "<worker id>" (STRICT_PACK: every bundle on one node)
      bundle 0   the worker actor = rank 0: engine loop, scheduler, sampler, KV transfer;
                 the pool's custom resources (one unit per worker) are asked for here
      bundle k   rank k's actor (k = 1 .. N-1), running engine.parallel.worker.run_rank
    each bundle: num_gpus (1 on GPU: one device per rank) and num_cpus of the pool

Life of a group (``cluster.pools.WorkerFactory``):
  1. ``place_group`` reserves the bundles; not placed within ``ray.worker_start_timeout_s``
     -> the group is removed and the worker given up, as a single worker would be.
  2. The worker actor is created in bundle 0 with ``parallel={"launcher": RayRankLauncher,
     "host": ...}`` in its engine options; its engine starts ranks 1..N-1 through the
     launcher (each an actor in its bundle) and waits for them to load their shards.
  3. Serving: ``RankWatch`` (armed by ``tensor_parallel_worker`` once the worker is built)
     waits on the ranks' ``run_rank`` tasks. A rank that ends while the worker serves —
     killed, crashed, or stopped by rank 0 after a broken step — ends the worker actor's
     process at once: every call to it then raises ``WorkerGone``, the cluster migrates its
     requests (or fails them with a clear error) and replaces the group as a whole.
  4. Destroying the worker removes the placement group, which kills the rank actors (they
     are also the worker actor's children: they die with it).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import threading
from dataclasses import dataclass, replace
from typing import Any

from cluster.config import PoolSection

log = logging.getLogger(__name__)

EXIT_RANK_LOST = 70  # the worker actor's exit status after losing a rank (EX_SOFTWARE)


def bundles(pool: PoolSection) -> list[dict[str, float]]:
    """The placement group's bundles: one per rank; the worker's own resources (custom
    resources, accelerator type) once, in bundle 0 where the worker actor runs."""
    rank = {"CPU": pool.num_cpus} | ({"GPU": pool.num_gpus} if pool.num_gpus else {})
    first = rank | dict(pool.resources)
    if pool.accelerator_type:  # what Ray's accelerator_type option asks for
        first[f"accelerator_type:{pool.accelerator_type}"] = 0.001
    return [first] + [dict(rank) for _ in range(pool.tensor_parallel_size - 1)]


async def place_group(worker_id: str, pool: PoolSection, timeout_s: float):
    """A STRICT_PACK placement group for one worker, ready (its bundles reserved on one
    node). Raises ``asyncio.TimeoutError`` after ``timeout_s`` and removes the group (else
    it stays pending, holding its request); removes it too when cancelled or failing."""
    from ray.util.placement_group import placement_group, remove_placement_group

    group = placement_group(bundles(pool), strategy="STRICT_PACK", name=worker_id)
    try:
        await asyncio.wait_for(asyncio.wrap_future(group.ready().future()), timeout_s)
    except BaseException:
        remove_placement_group(group)
        raise
    return group


def remove_group(group: Any) -> None:
    """Free the group's bundles; Ray kills the actors still running in them."""
    from ray.util.placement_group import remove_placement_group

    remove_placement_group(group)


def group_host(group: Any, configured: str) -> str:
    """The address rank 0's store listens on: ``configured`` (``transfer_host``: the node
    IP set in the config, or loopback on a local Ray), else the IP of the node Ray placed
    the group on."""
    if configured:
        return configured
    import ray
    from ray.util.placement_group import placement_group_table

    node_id = placement_group_table(group)["bundles_to_node_id"][0]
    return next(n["NodeManagerAddress"] for n in ray.nodes() if n["NodeID"] == node_id)


# -- the ranks ---------------------------------------------------------------------------------
class _Rank:
    """The actor of one rank >= 1 (its whole life is one ``run`` task)."""

    def pid(self) -> int:
        return os.getpid()

    def run(self, spec) -> None:
        from engine.parallel.worker import run_rank

        run_rank(spec)


@functools.cache
def _rank_actor_class():
    import ray

    return ray.remote(_Rank)


class RayRankHandle:
    """``engine.parallel.launch.RankHandle`` of a rank actor. Its ``run`` task's state is
    the rank's: running (None), returned after rank 0's stop message (0), or ended any
    other way (1: Ray reports the actor's death, not its exit status)."""

    def __init__(self, actor: Any, task: Any, pid: Any) -> None:
        self.actor, self.task, self._pid = actor, task, pid

    def exitcode(self) -> int | None:
        import ray

        ready, _ = ray.wait([self.task], timeout=0)
        if not ready:
            return None
        try:
            ray.get(self.task)
        except Exception:  # RayActorError (killed, crashed) or RayTaskError (raised)
            return 1
        return 0

    def kill(self) -> None:
        import ray

        ray.kill(self.actor, no_restart=True)

    def join(self, timeout: float) -> None:
        import ray

        ray.wait([self.task], timeout=timeout)

    @property
    def pid(self) -> int:
        """The rank's process id (on the group's node)."""
        import ray

        return ray.get(self._pid)


@dataclass(frozen=True)
class RayRankLauncher:
    """``engine.parallel.launch.RankLauncher``: rank k is an actor in bundle k of the
    worker's placement group. Picklable (the group handle is): it travels to the worker
    actor in its engine options."""

    group: Any  # ray.util.placement_group.PlacementGroup
    worker_id: str
    num_cpus: float
    num_gpus: float

    def start(self, spec) -> RayRankHandle:
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        if spec.device.startswith("cuda"):  # Ray shows each rank only its own GPU
            spec = replace(spec, device="cuda:0")
        strategy = PlacementGroupSchedulingStrategy(self.group, spec.rank)
        actor = _rank_actor_class().options(
            name=f"{self.worker_id}-rank{spec.rank}", num_cpus=self.num_cpus,
            num_gpus=self.num_gpus, scheduling_strategy=strategy,
        ).remote()
        pid = actor.pid.remote()  # queued before run: answers as soon as the actor is up
        return RayRankHandle(actor, actor.run.remote(spec), pid)


def parallel_options(group: Any, worker_id: str, pool: PoolSection, host: str) -> dict:
    """The engine's ``parallel`` option for a worker of ``pool`` in ``group``: the
    launcher, where rank 0's store listens, each rank's CPU threads (every rank is an
    actor of its own: its threads are its own CPUs, not a share of rank 0's) and how long
    a collective may wait for a hung rank."""
    threads = pool.engine.num_threads or max(1, int(pool.num_cpus))
    return {"launcher": RayRankLauncher(group, worker_id, pool.num_cpus, pool.num_gpus),
            "host": host, "threads_per_rank": threads,
            "timeout_s": pool.engine.tp_collective_timeout_s}


# -- the worker side ---------------------------------------------------------------------------
class RankWatch:
    """Ends this process when a rank's ``run`` task ends while armed (a thread blocked in
    ``ray.wait`` on the tasks: an event, not a poll). Disarmed by an orderly shutdown,
    whose stop message ends the tasks too."""

    def __init__(self, handles: list[RayRankHandle], worker_id: str) -> None:
        self.handles, self.worker_id = handles, worker_id
        self._armed = threading.Event()
        self._armed.set()
        self._thread = threading.Thread(target=self._watch, name=f"{worker_id}-rank-watch",
                                        daemon=True)
        self._thread.start()

    def disarm(self) -> None:
        self._armed.clear()

    def exit_on_fatal(self, error: BaseException) -> None:
        """The engine's step found the group broken (``Engine.on_fatal``): end this process
        unless an orderly shutdown is under way (then the requests fail as they are)."""
        if self._armed.is_set():
            log.error("%s: %s; the worker exits so that the cluster moves its requests and "
                      "replaces the whole group", self.worker_id, error)
            os._exit(EXIT_RANK_LOST)

    def _watch(self) -> None:
        import ray

        ready, _ = ray.wait([h.task for h in self.handles], num_returns=1)
        if not self._armed.is_set():
            return
        rank = next(k for k, h in enumerate(self.handles, start=1) if h.task == ready[0])
        log.error("%s: tensor-parallel rank %d of %d ended (status %s); the worker exits so "
                  "that the cluster moves its requests and replaces the whole group",
                  self.worker_id, rank, len(self.handles) + 1, self.handles[rank - 1].exitcode())
        os._exit(EXIT_RANK_LOST)  # a clean exit would wait on the engine thread, stuck mid-step


@functools.cache  # one class per worker class: Ray exports each actor class once
def tensor_parallel_worker(cls: type) -> type:
    """``cls`` (a prefill or decode worker class) whose actor watches its ranks once it is
    built (``RankWatch``): a rank lost while serving ends the worker, and with it the group.
    A rank lost while starting fails the constructor instead (its own clear error)."""

    class TensorParallelWorker(cls):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.rank_watch = RankWatch(self.host.engine.runner.handles, self.worker_id)
            # A step that finds the group broken (the watch not yet woken) ends the worker
            # the same way, before failing its requests: the cluster moves them instead.
            self.host.engine.on_fatal = self.rank_watch.exit_on_fatal

        def shutdown(self) -> None:
            self.rank_watch.disarm()
            super().shutdown()

    TensorParallelWorker.__name__ = TensorParallelWorker.__qualname__ = cls.__name__
    return TensorParallelWorker
