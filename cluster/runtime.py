"""A running cluster: Ray bootstrap, the worker pools, the global scheduler and the backend.

    cluster = Cluster(config)            # mode="ray" (default) or "local" (tests)
    await cluster.start()                # ray.init (or connect), start the pools' replicas
    backend = cluster.backend            # a ServingBackend for the router
    await cluster.scale("prefill", +1)   # what the autoscaler calls
    await cluster.shutdown()

A lost worker is replaced, and the replacement goes first: losing a worker cancels the
autoscaler's pending scale-ups (their Ray actors are killed, freeing what they held or were
about to take), the autoscaler adds nothing to a pool while its replacement is pending, and a
pending replacement counts as a starting replica of its pool.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import threading
from collections.abc import Iterator

from cluster import tp_group
from cluster.cluster_backend import ClusterBackend
from cluster.config import ClusterConfig
from cluster.crash_backoff import CrashBackoff
from cluster.global_scheduler import GlobalScheduler
from cluster.pools import WorkerCannotBePlaced, WorkerFactory

log = logging.getLogger(__name__)

REPLACE_ATTEMPTS = 8  # a lost worker's replacement is retried with backoff up to this often
REPLACE_MAX_BACKOFF_S = 30.0


class Cluster:
    def __init__(self, config: ClusterConfig, mode: str = "ray") -> None:
        if not config.model.path:
            raise ValueError("the pool config names no model: set model.path or pass --model")
        config.check_tensor_parallel()  # a size that cannot split the model: said now
        self.config = config
        self.mode = mode
        self.factory = WorkerFactory(config, mode)
        self.scheduler = GlobalScheduler(config.scheduler)
        self.backend = ClusterBackend(self.scheduler)
        self._owns_ray = False
        self._starting = {"prefill": 0, "decode": 0, "colocated": 0}  # workers being created
        self._replacing = {"prefill": 0, "decode": 0, "colocated": 0}  # lost, not yet replaced
        self._replacements: set[asyncio.Task] = set()
        self._placing: set[asyncio.Task] = set()  # scale-ups waiting for their worker to be
        # placed and ready: cancelled on a loss (not once registering: that leaves no trace)
        self._backoff = CrashBackoff()  # how long a lost worker's replacement waits
        self._stopping = False
        # counters, per pool (exported as splitserve_worker_*): a crash loop shows here
        self.workers_lost = {"prefill": 0, "decode": 0, "colocated": 0}
        self.replacement_failures = {"prefill": 0, "decode": 0, "colocated": 0}  # starts
        self.replacements_given_up = {"prefill": 0, "decode": 0, "colocated": 0}
        self.backend.on_worker_lost = self._on_worker_lost
        self.backend.replacement_pending = self.replacement_pending  # new requests wait for it

    @property
    def roles(self) -> tuple[str, ...]:
        return ("colocated",) if self.config.colocated else ("prefill", "decode")

    def replicas(self, role: str, include_starting: bool = False) -> int:
        """Registered workers of a role (plus, if asked, those starting: being created or
        lost and awaiting their replacement)."""
        ready = sum(1 for h in self.backend.workers.values() if h.role == role)
        pending = self._starting[role] + self._replacing[role]
        return ready + (pending if include_starting else 0)

    def replacement_pending(self, role: str) -> bool:
        """Whether a lost worker of this pool is still being replaced."""
        return self._replacing[role] > 0

    def replacements_pending(self, role: str) -> int:
        """Lost workers of this pool not replaced yet (waiting out a back-off, or starting)."""
        return self._replacing[role]

    @property
    def start_timeouts(self) -> dict[str, int]:
        """Workers given up per pool because they were not ready in time (a counter)."""
        return dict(self.factory.start_timeouts)

    async def start(self) -> None:
        if self.mode == "ray":
            self._init_ray()
        await self.backend.start()
        counts = {"colocated": self.config.decode.replicas} if self.config.colocated else {
            "prefill": self.config.prefill.replicas, "decode": self.config.decode.replicas}
        tasks = [asyncio.ensure_future(self.add_worker(role)) for role, n in counts.items()
                 for _ in range(n)]
        try:
            await asyncio.gather(*tasks)
        except BaseException:  # one failed (e.g. not placed in time): stop the others' starts
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise

    def _init_ray(self) -> None:
        import ray

        if ray.is_initialized():
            return
        rc = self.config.ray
        with _sigterm_kept():
            if rc.address:
                ray.init(address=rc.address, namespace=rc.namespace, log_to_driver=False)
            else:  # a local node offers the pools' custom resources (a cluster's nodes would)
                resources = {name: 1000.0 for pool in (self.config.prefill, self.config.decode)
                             for name in pool.resources}
                start_local_ray(num_cpus=rc.num_cpus, namespace=rc.namespace,
                                resources=resources or None, node_ip=rc.node_ip or "127.0.0.1")
        self._owns_ray = True
        if not rc.address:
            self._check_fits_the_local_node(ray.cluster_resources())

    def _check_fits_the_local_node(self, node: dict[str, float]) -> None:
        """A local Ray is this one node, with no autoscaler to add another: a worker asking
        for more than it has would only wait out ray.worker_start_timeout_s (Ray's own
        "infeasible" warning goes to its log, not here). Raises ``WorkerCannotBePlaced``."""
        for role in self.roles:
            pool = self.factory.pool(role)
            need: dict[str, float] = {}
            for bundle in tp_group.bundles(pool):  # a TP group sits on one node
                for name, amount in bundle.items():
                    need[name] = need.get(name, 0.0) + amount
            short = {name: amount for name, amount in need.items()
                     if amount > node.get(name, 0.0) + 1e-9}
            if short:
                asks = ", ".join(f"{name} {amount:g} (this node has {node.get(name, 0.0):g})"
                                 for name, amount in short.items())
                raise WorkerCannotBePlaced(
                    f"a {role} worker asks for {asks} and this local Ray node is all there "
                    f"is: lower {role}.num_cpus / num_gpus / engine.tensor_parallel_size, or "
                    "give Ray more (ray.num_cpus), or join a cluster (--ray-address)")

    async def add_worker(self, role: str, growth: bool = False) -> str:
        """Start a worker of ``role``; a ``growth`` one yields to replacements while it waits
        to be placed (a worker loss cancels it, and the factory kills its pending actor)."""
        self._starting[role] += 1
        try:
            return await self._start_worker(role, growth)
        finally:
            self._starting[role] -= 1

    async def _start_worker(self, role: str, growth: bool = False, streak: int = 0) -> str:
        """``streak``: a replacement's line count (see ``CrashBackoff``)."""
        task = asyncio.current_task()
        if growth and task is not None:
            self._placing.add(task)
        try:
            handle = await self.factory.create(role)
        finally:
            self._placing.discard(task)
        # before registering: a worker lost while it registers is its line's early death too
        self._backoff.ready(handle.worker_id, streak)
        await self.backend.add_worker(handle)
        return handle.worker_id

    async def remove_worker(self, worker_id: str) -> None:
        """Drain (no new requests; in-flight ones finish), then stop the worker."""
        await self.backend.drain_and_remove(worker_id)
        self._backoff.forget(worker_id)
        await self.factory.destroy(worker_id)

    async def scale(self, role: str, delta: int) -> list[str]:
        """Add ``delta`` workers (> 0) or drain and remove ``-delta`` (< 0, newest first)."""
        if delta > 0:
            return await self._grow(role, delta)
        victims = [w for w, h in self.backend.workers.items() if h.role == role][delta:]
        await asyncio.gather(*(self.remove_worker(w) for w in victims))
        return victims

    async def _grow(self, role: str, n: int) -> list[str]:
        """Start ``n`` workers; those cancelled by a worker loss are left out of the result.
        Other failures are raised once all attempts have ended."""
        # (cancelling the caller cancels the gather, and with it every start)
        results = await asyncio.gather(*(self.add_worker(role, growth=True) for _ in range(n)),
                                       return_exceptions=True)
        errors = [r for r in results if isinstance(r, Exception)]
        if errors:
            raise errors[0]
        return [r for r in results if isinstance(r, str)]

    def _on_worker_lost(self, worker_id: str, role: str) -> None:
        """A worker died: cancel pending scale-ups (so they cannot take what the replacement
        needs) and start a replacement (counted as a starting worker of its pool)."""
        if self._stopping:
            return
        self.workers_lost[role] += 1
        pending = list(self._placing)
        for task in pending:
            task.cancel()
        if pending:
            log.warning("cancelled %d pending scale-up(s): the replacement of lost %s worker "
                        "%s goes first", len(pending), role, worker_id)
        self._replacing[role] += 1
        task = asyncio.get_running_loop().create_task(self._replace(worker_id, role))
        self._replacements.add(task)
        task.add_done_callback(self._replacements.discard)

    async def _replace(self, worker_id: str, role: str) -> None:
        try:
            await self._replace_with_retries(worker_id, role)
        finally:
            self._replacing[role] -= 1

    async def _replace_with_retries(self, worker_id: str, role: str) -> None:
        wait, streak = self._backoff.lost(worker_id)  # a worker line that keeps dying waits
        if wait:
            log.warning("replacing lost %s worker %s in %.0f s: its line died %d times soon "
                        "after starting", role, worker_id, wait, streak)
            await asyncio.sleep(wait)
        else:
            log.info("replacing lost %s worker %s now", role, worker_id)
        try:  # whatever is left of it (a hung actor is killed, its resources freed)
            await self.factory.destroy(worker_id)
        except Exception as exc:
            log.info("cleaning up lost worker %s: %s", worker_id, exc)
        for attempt in range(REPLACE_ATTEMPTS):
            try:
                new_id = await self._start_worker(role, streak=streak)  # in _replacing meanwhile
            except Exception as exc:  # e.g. no node fits yet: back off and retry
                self.replacement_failures[role] += 1
                delay = min(REPLACE_MAX_BACKOFF_S, 2.0**attempt)
                log.warning("replacing %s worker %s failed (%s); retry in %.0f s", role,
                            worker_id, exc, delay)
                await asyncio.sleep(delay)
            else:
                log.info("replaced lost %s worker %s with %s", role, worker_id, new_id)
                return
        self.replacements_given_up[role] += 1
        log.error("gave up replacing %s worker %s after %d attempts", role, worker_id,
                  REPLACE_ATTEMPTS)

    def stop_replacing(self) -> None:
        """From now on a lost worker is neither counted nor replaced: the cluster is being
        shut down (a deleted RayCluster takes its worker pods while the router drains)."""
        self._stopping = True

    async def shutdown(self) -> None:
        self._stopping = True
        tasks = [*self._replacements, *self._placing]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self.backend.shutdown()
        await self.factory.destroy_all()
        if self._owns_ray:
            import ray

            ray.shutdown()


_RAY_CLUSTER_MODE = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
RAY_START_ATTEMPTS = 2


@contextlib.contextmanager
def _sigterm_kept() -> Iterator[None]:
    """Keep a SIGTERM handler that this process set (``splitserve serve``'s graceful stop)
    through ``ray.init``, which puts its own in (one that exits at once, mid start-up)."""
    mine = (signal.getsignal(signal.SIGTERM)
            if threading.current_thread() is threading.main_thread() else None)
    try:
        yield
    finally:
        if callable(mine):  # not SIG_DFL / SIG_IGN / a handler set outside Python
            signal.signal(signal.SIGTERM, mine)


def start_local_ray(node_ip: str = "127.0.0.1", **init_kwargs) -> None:
    """``ray.init`` of a local node (no dashboard, workers' logs not copied here), listening
    on ``node_ip`` only where that is loopback (see ``_ray_local_only``).

    Ray gives a new node's raylet a fixed 30 s to register with its GCS; a loaded host can
    miss that ("The current node timed out during startup", seen in CI on 2 cores), so the
    start is tried once more before the error is raised."""
    import ray

    init_kwargs = {"include_dashboard": False, "log_to_driver": False, **init_kwargs}
    for attempt in range(1, RAY_START_ATTEMPTS + 1):
        try:
            with _ray_local_only(node_ip):
                ray.init(_node_ip_address=node_ip, **init_kwargs)
            return
        except Exception as e:  # Ray raises a bare Exception for this
            if "timed out during startup" not in str(e) or attempt == RAY_START_ATTEMPTS:
                raise
            log.warning("Ray's local node did not start in time (%s); starting it again", e)
            ray.shutdown()


@contextlib.contextmanager
def _ray_local_only(node_ip: str) -> Iterator[None]:
    """Let a local Ray keep a loopback node IP, so that all its servers (GCS, raylet, workers'
    gRPC, agents, metrics export) listen on loopback only.

    On Linux ``ray.init`` replaces a loopback node IP by the machine's address (its "cluster
    mode"); with that mode off, as it is by default on macOS and Windows, it keeps it. The
    mode is read from the environment by Ray's processes at start (the ones started here
    inherit it) and from a constant in this one, so both are switched for ``ray.init`` only.
    Ray's token authentication is left as it is."""
    if node_ip not in ("127.0.0.1", "localhost", "::1"):
        yield
        return
    from ray._private import ray_constants

    saved_env, saved_const = os.environ.get(_RAY_CLUSTER_MODE), ray_constants.ENABLE_RAY_CLUSTER
    os.environ[_RAY_CLUSTER_MODE] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved_const
        if saved_env is None:
            os.environ.pop(_RAY_CLUSTER_MODE, None)
        else:
            os.environ[_RAY_CLUSTER_MODE] = saved_env
