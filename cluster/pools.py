"""Worker pools: build prefill / decode / colocated workers as Ray actors (or, for tests,
as plain objects in this process) from the pool config, and hand out handles.

On KubeRay, creating an actor whose resources no node has is what makes the Ray autoscaler
add a GPU node; removal goes through ``ClusterBackend.drain_and_remove`` first. An actor not
placed and loaded within ``ray.worker_start_timeout_s`` is given up: killed, logged with the
resources it asked for, and counted in ``WorkerFactory.start_timeouts``. An actor whose
creation is cancelled (the cluster cancels pending growth when a worker is lost, so that the
replacement gets the freed resources) is killed as well: a cancelled start leaves nothing
pending in Ray.

A worker of a pool with ``engine.tensor_parallel_size`` N > 1 is a group of N actors in one
STRICT_PACK placement group (``cluster.tp_group``): placed first, within the same start
timeout; destroying the worker removes the group, and a rank lost while serving ends the
worker actor, so the cluster replaces the whole group.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from cluster import tp_group
from cluster.config import ClusterConfig, PoolSection
from cluster.handles import LocalTransport, RayTransport, WorkerHandle, make_handle
from kv_transfer.base import TransferConfig

log = logging.getLogger(__name__)
_RESOURCE_OPTIONS = ("num_cpus", "num_gpus", "resources", "accelerator_type")
ACTOR_CONCURRENCY = 512  # blocking calls in flight per actor (prefill() waits for its token)


class WorkerStartTimeout(RuntimeError):
    """A worker was not placed and ready within ``ray.worker_start_timeout_s``."""


class WorkerCannotBePlaced(RuntimeError):
    """A worker asks for more than any node of the (local, fixed) Ray cluster has."""


def transfer_host(config: ClusterConfig) -> str:
    """The address the workers' KV transfer listeners bind to and advertise: the configured
    node IP, loopback for a local Ray, or "" (each worker's Ray node IP) on a joined cluster."""
    if config.ray.node_ip:
        return config.ray.node_ip
    return "" if config.ray.address else "127.0.0.1"


class WorkerFactory:
    """Creates and destroys workers of each role; ``mode`` is "ray" or "local"."""

    def __init__(self, config: ClusterConfig, mode: str = "ray") -> None:
        if mode not in ("ray", "local"):
            raise ValueError(f"mode must be ray or local, got {mode!r}")
        self.config = config
        self.mode = mode
        self._ids = {role: itertools.count() for role in ("prefill", "decode", "colocated")}
        self._objects: dict[str, Any] = {}  # worker id -> actor handle or object
        self._groups: dict[str, Any] = {}  # worker id -> placement group (tensor parallel)
        self._executor = ThreadPoolExecutor(max_workers=64, thread_name_prefix="worker-call")
        self._hub = None
        self.start_timeouts = {role: 0 for role in ("prefill", "decode", "colocated")}
        """Workers given up per pool because they were not ready within the start timeout."""
        tc = config.transfer
        backend = "loopback" if mode == "local" and tc.backend == "ray" else tc.backend
        self.transfer_config = TransferConfig(backend=backend, timeout_s=tc.timeout_s,
                                              max_channels=tc.max_channels,
                                              host=transfer_host(config))

    def pool(self, role: str) -> PoolSection:
        return self.config.prefill if role == "prefill" else self.config.decode

    def _worker_class(self, role: str):
        if role == "prefill":
            from prefill_worker import PrefillWorker

            return PrefillWorker
        from decode_worker import DecodeWorker

        return DecodeWorker

    def _args(self, role: str, worker_id: str) -> tuple[tuple, dict]:
        pool = self.pool(role)
        options = pool.engine.engine_options(self.config.model, self.config.model.device)
        if pool.engine.num_threads:
            options["num_threads"] = pool.engine.num_threads
        kwargs: dict[str, Any] = {"transfer_config": self.transfer_config}
        if role != "prefill":
            kwargs["role"] = role
        return (worker_id, self.config.model.path, options), kwargs

    async def create(self, role: str) -> WorkerHandle:
        worker_id = f"{role}-{next(self._ids[role])}"
        args, kwargs = self._args(role, worker_id)
        if self.mode == "local":
            handle = await self._create_local(role, worker_id, args, kwargs)
        else:
            handle = await self._create_actor(role, worker_id, args, kwargs)
        log.info("worker %s ready", worker_id)
        return handle

    async def _create_local(self, role, worker_id, args, kwargs) -> WorkerHandle:
        import asyncio

        if self.transfer_config.backend == "loopback":
            from kv_transfer.loopback import LoopbackHub

            self._hub = self._hub or LoopbackHub()
            kwargs["hub"] = self._hub
        cls = self._worker_class(role)
        loop = asyncio.get_running_loop()
        worker = await loop.run_in_executor(self._executor, lambda: cls(*args, **kwargs))
        self._objects[worker_id] = worker
        return make_handle(worker_id, role, LocalTransport(worker, self._executor))

    async def _create_actor(self, role, worker_id, args, kwargs) -> WorkerHandle:
        import ray

        pool = self.pool(role)
        options: dict[str, Any] = dict(
            name=worker_id, namespace=self.config.ray.namespace, num_cpus=pool.num_cpus,
            num_gpus=pool.num_gpus, max_concurrency=ACTOR_CONCURRENCY,
            resources=dict(pool.resources) or None,
        )
        if pool.accelerator_type:
            options["accelerator_type"] = pool.accelerator_type
        timeout = self.config.ray.worker_start_timeout_s
        deadline = asyncio.get_running_loop().time() + timeout
        worker_class, actor = self._worker_class(role), None
        try:
            if pool.tensor_parallel_size > 1:  # a group: placed first, the worker in bundle 0
                worker_class = await self._place_group(role, worker_id, args[2], options)
            actor = ray.remote(worker_class).options(**options).remote(*args, **kwargs)
            # health() answers once the actor is placed and its constructor succeeded
            await asyncio.wait_for(asyncio.wrap_future(actor.health.remote().future()),
                                   deadline - asyncio.get_running_loop().time())
        except asyncio.TimeoutError:
            self._kill(worker_id, actor)  # else it stays pending, holding its request
            raise self._gave_up(role, worker_id, timeout, options) from None
        except BaseException:  # constructor failed, or cancelled: leave nothing pending
            self._kill(worker_id, actor)
            raise
        self._objects[worker_id] = actor
        return make_handle(worker_id, role, RayTransport(worker_id, actor))

    async def _place_group(self, role: str, worker_id: str, engine_options: dict,
                           options: dict) -> type:
        """Reserve a tensor-parallel worker's placement group (``cluster.tp_group``) within
        the start timeout, put the worker actor in its bundle 0 and give its engine the
        launcher of the other ranks. Returns the worker class that watches its ranks."""
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        pool = self.pool(role)
        group = await tp_group.place_group(worker_id, pool,
                                           self.config.ray.worker_start_timeout_s)
        self._groups[worker_id] = group
        options["scheduling_strategy"] = PlacementGroupSchedulingStrategy(group, 0)
        host = tp_group.group_host(group, self.transfer_config.host)
        engine_options["parallel"] = tp_group.parallel_options(group, worker_id, pool, host)
        return tp_group.tensor_parallel_worker(self._worker_class(role))

    def _gave_up(self, role: str, worker_id: str, timeout: float,
                 options: dict) -> WorkerStartTimeout:
        """Count and log a worker not ready in time; the error to raise."""
        self.start_timeouts[role] += 1
        asked = {k: v for k, v in options.items() if k in _RESOURCE_OPTIONS and v}
        tp = self.pool(role).tensor_parallel_size
        if tp > 1:
            asked = {"tensor_parallel_size": tp, "per rank": asked}
        log.error("%s worker %s was not placed and ready within %.0f s; gave it up. It "
                  "asked for %s: check that a node offers that (or raise "
                  "ray.worker_start_timeout_s)", role, worker_id, timeout, asked)
        return WorkerStartTimeout(f"a {role} worker was not placed and ready within "
                                  f"{timeout:.0f} s (it asked for {asked}): check that a "
                                  "node offers that, or raise ray.worker_start_timeout_s")

    def _kill(self, worker_id: str, actor: Any) -> None:
        """Kill a worker's actor (if created) and, for a tensor-parallel worker, remove its
        placement group (which kills its rank actors)."""
        import ray

        try:
            if actor is not None:
                ray.kill(actor, no_restart=True)
        finally:
            group = self._groups.pop(worker_id, None)
            if group is not None:
                tp_group.remove_group(group)

    async def destroy(self, worker_id: str) -> None:
        obj = self._objects.pop(worker_id, None)
        if obj is None:
            return
        if self.mode == "local":
            obj.shutdown()
            return
        try:
            await obj.shutdown.remote()
        finally:
            self._kill(worker_id, obj)

    async def destroy_all(self) -> None:
        for worker_id in list(self._objects):
            try:
                await self.destroy(worker_id)
            except Exception as exc:  # keep shutting the others down; say which failed
                log.warning("shutting down %s failed: %s", worker_id, exc)
        if self._hub is not None:
            self._hub.close()
        self._executor.shutdown(wait=False)
