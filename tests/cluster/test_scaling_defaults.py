"""Safe scaling defaults: fixed pools unless autoscaling is asked for, a lost worker's
replacement before any growth, pool_replicas counting what its help says, and (on Ray) a
worker that cannot be placed given up after the start timeout instead of pending forever."""

from __future__ import annotations

import argparse
import asyncio
import logging
import time

import pytest

from app.commands.serve import add_cluster_flags, load_config
from cluster.config import ClusterConfig
from cluster.handles import Transport, WorkerHandle, make_handle
from cluster.runtime import Cluster
from engine.worker_stats import WorkerStats


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_cluster_flags(parser)
    return parser.parse_args(["--model", "m", *argv])


def test_serve_pool_sizes_mean_fixed_pools_unless_autoscaling_is_asked(tmp_path):
    assert not load_config(_args("--prefill", "1", "--decode", "1")).autoscaler.enabled
    assert not load_config(_args()).autoscaler.enabled
    assert load_config(_args("--prefill", "1", "--decode", "1", "--autoscale")).autoscaler.enabled
    written = tmp_path / "pool.yaml"
    written.write_text("autoscaler:\n  enabled: true\n")
    assert load_config(_args("--config", str(written), "--prefill", "2")).autoscaler.enabled
    silent = tmp_path / "silent.yaml"  # an autoscaler section that does not say "enabled"
    silent.write_text("autoscaler:\n  interval_s: 5\n")
    assert not load_config(_args("--config", str(silent))).autoscaler.enabled


def test_a_cluster_config_autoscales_only_when_it_says_so():
    """Every entry point (serve, demo, start_server, the load generator) builds one."""
    assert not ClusterConfig().autoscaler.enabled
    assert not ClusterConfig.model_validate({"autoscaler": {"interval_s": 5}}).autoscaler.enabled
    on = ClusterConfig.model_validate({"autoscaler": {"enabled": True, "interval_s": 5}})
    assert on.autoscaler.enabled and on.autoscaler.interval_s == 5
    assert on.with_overrides(**{"prefill.replicas": 1}).autoscaler.enabled  # kept when copied


def test_autoscaler_bounds_that_differ_from_the_pools_are_refused_not_overwritten(tmp_path):
    """The pools' min/max_replicas bound the autoscaler; autoscaler.min_prefill & co. used
    to be overwritten by them without a word. Written equal (as the examples do), they are
    fine, and a --prefill that widens the pool widens them too."""
    pools = {"prefill": {"replicas": 1, "min_replicas": 1, "max_replicas": 8},
             "decode": {"replicas": 2, "min_replicas": 2, "max_replicas": 16}}
    with pytest.raises(ValueError, match=r"autoscaler.max_prefill=40 differs from "
                                         r"prefill.max_replicas=8"):
        ClusterConfig.model_validate({**pools, "autoscaler": {"enabled": True,
                                                              "max_prefill": 40}})
    same = {"enabled": True, "min_prefill": 1, "max_prefill": 8, "min_decode": 2,
            "max_decode": 16}
    config = ClusterConfig.model_validate({**pools, "autoscaler": same})
    assert config.autoscaler_config().max_prefill == 8
    written = tmp_path / "pool.yaml"
    written.write_text("prefill: {replicas: 1, min_replicas: 1, max_replicas: 8}\n"
                       "decode: {replicas: 2, min_replicas: 2, max_replicas: 16}\n"
                       "autoscaler: {enabled: true, max_prefill: 8, max_decode: 16}\n")
    wider = load_config(_args("--config", str(written), "--prefill", "12"))
    assert wider.autoscaler_config().max_prefill == wider.prefill.max_replicas == 12


def test_colocated_workers_refuse_what_only_separate_pools_use():
    with pytest.raises(ValueError, match="autoscaler.enabled with colocated"):
        ClusterConfig.model_validate({"colocated": True, "autoscaler": {"enabled": True}})
    with pytest.raises(ValueError, match="autoscaler.enabled with colocated"):
        load_config(_args("--colocated", "--autoscale"))
    with pytest.raises(ValueError, match="--prefill, --kv-backend would change nothing"):
        load_config(_args("--colocated", "--prefill", "2", "--kv-backend", "ray"))
    assert load_config(_args("--colocated", "--decode", "2")).decode.replicas == 2
    # the load generator's colocated side of an autoscaled config: fixed, not refused
    from app.loadgen.launch import colocated, side_config

    autoscaled = ClusterConfig.model_validate({"autoscaler": {"enabled": True}})
    side = side_config(autoscaled, colocated(2), "m", None)
    assert side.colocated and not side.autoscaler.enabled and side.decode.replicas == 2


# -- a cluster whose workers are fakes: creation can be held pending, like an unplaceable actor


class FakeTransport(Transport):
    def __init__(self, worker_id: str, role: str) -> None:
        self.worker_id, self.role = worker_id, role

    async def call(self, method: str, *args):
        if method == "stats":
            return WorkerStats(self.worker_id, self.role, 0, 0, 0, 100, 100, 16, 0.0, 0.0,
                               timestamp=time.time())
        return None  # endpoint, abort, shutdown

    async def stream(self, method: str):
        """A decode worker that never produces a token: the stream stays open (until the
        cluster cancels its pump)."""
        await asyncio.Event().wait()
        yield []


def FakeHandle(worker_id: str, role: str) -> WorkerHandle:  # noqa: N802 (reads as a class)
    return make_handle(worker_id, role, FakeTransport(worker_id, role))


class FakeFactory:
    """Creates FakeHandles; while ``hold`` is set, creations wait (a pending Ray actor)."""

    def __init__(self) -> None:
        self.n = 0
        self.hold: asyncio.Event | None = None
        self.created: list[str] = []
        self.cancelled: list[str] = []
        self.start_timeouts = {"prefill": 0, "decode": 0, "colocated": 0}
        self.failing = 0  # the next this many creations fail (no node takes the actor)

    async def create(self, role: str) -> WorkerHandle:
        worker_id = f"{role}-{self.n}"
        self.n += 1
        self.created.append(worker_id)
        if self.failing:
            self.failing -= 1
            raise RuntimeError(f"{worker_id} could not be placed (test)")
        try:
            if self.hold is not None:
                await self.hold.wait()
        except asyncio.CancelledError:
            self.cancelled.append(worker_id)  # the real factory kills the pending actor here
            raise
        return FakeHandle(worker_id, role)

    async def destroy(self, worker_id: str) -> None:
        return None

    async def destroy_all(self) -> None:
        return None


def _fake_cluster(**autoscaler) -> Cluster:
    config = ClusterConfig.model_validate({"model": {"path": "unused"},
                                           "autoscaler": autoscaler})
    cluster = Cluster(config, mode="local")
    cluster.factory = FakeFactory()
    return cluster


async def _until(predicate, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


def test_a_worker_loss_cancels_pending_growth_so_the_replacement_goes_first():
    async def main():
        cluster = _fake_cluster()
        await cluster.start()
        try:
            factory = cluster.factory
            factory.hold = asyncio.Event()  # from now on, new workers stay pending
            growth = asyncio.ensure_future(cluster.scale("prefill", +1))
            await _until(lambda: len(factory.created) == 3)
            decode = next(w for w, h in cluster.backend.workers.items() if h.role == "decode")
            cluster.backend.lose_worker(decode, "killed (test)")
            added = await asyncio.wait_for(growth, 5)  # ends at once, adding nothing
            assert added == [] and factory.cancelled == ["prefill-2"]
            assert cluster.replacement_pending("decode")
            assert cluster.replicas("decode", include_starting=True) == 1
            factory.hold.set()  # the freed resources go to the replacement
            await asyncio.wait_for(asyncio.gather(*cluster._replacements), 5)
            roles = sorted(h.role for h in cluster.backend.workers.values())
            assert roles == ["decode", "prefill"] and not cluster.replacement_pending("decode")
        finally:
            await cluster.shutdown()

    asyncio.run(main())


def test_the_autoscaler_does_not_grow_a_pool_while_its_replacement_is_pending():
    from cluster.autoscaling import AutoscalingLoop

    async def main():
        cluster = _fake_cluster(enabled=True)
        await cluster.start()
        try:
            loop = AutoscalingLoop(cluster, cluster.config.autoscaler_config(),
                                   cluster.config.slo)
            cluster.factory.hold = asyncio.Event()
            prefill = next(w for w, h in cluster.backend.workers.items() if h.role == "prefill")
            cluster.backend.lose_worker(prefill, "killed (test)")
            await _until(lambda: len(cluster.factory.created) == 3)  # replacement pending
            for _ in range(5):  # TTFT far over the SLO: prefill pressure
                loop.window.add_ttft(time.time(), 100.0)
            assert loop.sizes()["prefill"] == 1  # the pending replacement counts
            decisions = await asyncio.wait_for(loop.tick(), 5)
            assert decisions == [] and len(cluster.factory.created) == 3
            cluster.factory.hold.set()
            await asyncio.wait_for(asyncio.gather(*cluster._replacements), 5)
            assert cluster.replicas("prefill") == 1
        finally:
            await cluster.shutdown()

    asyncio.run(main())


def test_pool_replicas_counts_ready_and_starting_workers_and_start_timeouts_are_counted():

    from app.server import sync_metrics_once
    from router.metrics import ServingMetrics

    async def main():
        cluster = _fake_cluster()
        await cluster.start()
        try:
            cluster.factory.hold = asyncio.Event()
            decode = next(w for w, h in cluster.backend.workers.items() if h.role == "decode")
            cluster.backend.lose_worker(decode, "killed (test)")
            growth = asyncio.ensure_future(cluster.scale("prefill", +1))
            await _until(lambda: len(cluster.factory.created) == 4)
            metrics = ServingMetrics()
            cluster.factory.start_timeouts["prefill"] = 2
            seen: dict = {}
            sync_metrics_once(cluster, metrics, seen)
            sync_metrics_once(cluster, metrics, seen)  # totals are counted once
            value = {p: metrics.registry.get_sample_value("splitserve_pool_replicas",
                                                          {"pool": p})
                     for p in ("prefill", "decode")}
            timeouts = metrics.registry.get_sample_value(
                "splitserve_worker_start_timeouts_total", {"pool": "prefill"})
            growth.cancel()
            return value, timeouts
        finally:
            await cluster.shutdown()

    # decode: its replacement is starting; prefill: one ready, one starting
    assert asyncio.run(main()) == ({"prefill": 2.0, "decode": 1.0}, 2.0)


def test_lost_workers_and_failed_replacements_are_counted(monkeypatch):
    """A crash loop shows on /metrics (and in the alerts), not only in the log: each loss,
    each failed start of a replacement, a replacement given up, and those pending."""
    import cluster.runtime as runtime
    from app.server import sync_metrics_once
    from router.metrics import ServingMetrics

    monkeypatch.setattr(runtime, "REPLACE_ATTEMPTS", 2)
    monkeypatch.setattr(runtime, "REPLACE_MAX_BACKOFF_S", 0.01)

    def sample(metrics, name: str, pool: str) -> float:
        return metrics.registry.get_sample_value(name, {"pool": pool})

    async def main():
        cluster = _fake_cluster()
        await cluster.start()
        metrics, seen = ServingMetrics(), {}
        try:
            factory = cluster.factory
            factory.hold, factory.failing = asyncio.Event(), 1
            decode = next(w for w, h in cluster.backend.workers.items() if h.role == "decode")
            cluster.backend.lose_worker(decode, "killed (test)")
            await _until(lambda: len(factory.created) == 4)  # failed once, second pending
            sync_metrics_once(cluster, metrics, seen)
            assert sample(metrics, "splitserve_workers_lost_total", "decode") == 1
            assert sample(metrics, "splitserve_worker_replacement_failures_total",
                          "decode") == 1
            assert sample(metrics, "splitserve_worker_replacements_pending", "decode") == 1
            assert sample(metrics, "splitserve_workers_lost_total", "prefill") == 0
            factory.hold.set()
            await asyncio.wait_for(asyncio.gather(*cluster._replacements), 5)
            prefill = next(w for w, h in cluster.backend.workers.items() if h.role == "prefill")
            factory.failing = 2  # every retry fails: given up
            cluster.backend.lose_worker(prefill, "killed (test)")
            await asyncio.wait_for(asyncio.gather(*cluster._replacements), 10)
            sync_metrics_once(cluster, metrics, seen)
            sync_metrics_once(cluster, metrics, seen)  # totals are counted once
            return {name: (sample(metrics, name, "prefill"), sample(metrics, name, "decode"))
                    for name in ("splitserve_workers_lost_total",
                                 "splitserve_worker_replacement_failures_total",
                                 "splitserve_worker_replacements_given_up_total",
                                 "splitserve_worker_replacements_pending")}
        finally:
            await cluster.shutdown()

    assert asyncio.run(main()) == {
        "splitserve_workers_lost_total": (1.0, 1.0),
        "splitserve_worker_replacement_failures_total": (2.0, 1.0),
        "splitserve_worker_replacements_given_up_total": (1.0, 0.0),
        "splitserve_worker_replacements_pending": (0.0, 0.0)}


# -- on Ray: a worker no node can take


@pytest.mark.ray
def test_an_unplaceable_worker_is_given_up_after_the_start_timeout(caplog):
    """The actor asks for a resource no node has: after worker_start_timeout_s it is killed,
    logged (pool and resources named) and counted; a cancelled start is killed as well."""
    import ray

    from cluster.pools import WorkerFactory, WorkerStartTimeout
    from cluster.runtime import start_local_ray

    config = ClusterConfig.model_validate({
        "model": {"path": "unused", "device": "cpu"},
        "prefill": {"num_cpus": 0.1, "resources": {"splitserve_no_such_node": 1}},
        "ray": {"worker_start_timeout_s": 2, "namespace": "splitserve-test-timeout"},
    })
    start_local_ray(num_cpus=1, namespace="splitserve-test-timeout")
    try:
        factory = WorkerFactory(config, "ray")

        async def main():
            t0 = time.monotonic()
            with pytest.raises(WorkerStartTimeout, match="not placed and ready within 2 s"):
                await asyncio.wait_for(factory.create("prefill"), 20)
            waited = time.monotonic() - t0
            pending = asyncio.ensure_future(factory.create("prefill"))
            await asyncio.sleep(0.5)
            pending.cancel()
            with pytest.raises(asyncio.CancelledError):
                await pending
            return waited

        with caplog.at_level(logging.ERROR, logger="cluster.pools"):
            waited = asyncio.run(main())
        assert 2.0 <= waited < 10.0
        assert factory.start_timeouts["prefill"] == 1
        message = " ".join(r.getMessage() for r in caplog.records)
        assert "prefill worker prefill-0" in message and "splitserve_no_such_node" in message
        for name in ("prefill-0", "prefill-1"):  # both killed: nothing left pending
            deadline = time.monotonic() + 10
            while _named_actor_exists(ray, name, config.ray.namespace):
                assert time.monotonic() < deadline, f"{name} still exists"
                time.sleep(0.1)
    finally:
        ray.shutdown()


def _named_actor_exists(ray, name: str, namespace: str) -> bool:
    try:
        ray.get_actor(name, namespace=namespace)
    except ValueError:
        return False
    return True


@pytest.mark.ray
@pytest.mark.slow
def test_a_server_whose_pool_cannot_be_placed_fails_to_start_and_leaves_nothing(tmp_path):
    """start_server with a prefill pool the local node cannot hold: a clear error at once
    (a local Ray is one node, with no autoscaler: waiting out the start timeout would only
    delay it), no worker started, and the local Ray shut down."""
    import ray

    from app.server import start_server
    from cluster.pools import WorkerCannotBePlaced
    from engine.make_model import make_model

    model = make_model(tmp_path / "llama", "llama", "tiny", seed=0, progress=False)
    engine = {"block_size": 4, "max_num_batched_tokens": 64, "max_num_seqs": 4,
              "max_model_len": 128, "num_threads": 1}
    config = ClusterConfig.model_validate({
        "model": {"path": str(model), "device": "cpu"},
        "prefill": {"num_cpus": 0.5, "accelerator_type": "NoSuchAccelerator", "engine": engine},
        "decode": {"num_cpus": 0.5, "engine": engine},
        "scheduler": {"block_size": 4},
        "router": {"grpc_port": 0, "http_port": 0},
        "ray": {"num_cpus": 2, "worker_start_timeout_s": 3},
    })
    t0 = time.monotonic()
    with pytest.raises(WorkerCannotBePlaced, match="a prefill worker asks for "
                       "accelerator_type:NoSuchAccelerator 0.001 \\(this node has 0\\)"):
        asyncio.run(asyncio.wait_for(start_server(config), 90))
    assert time.monotonic() - t0 < 30
    assert not ray.is_initialized()  # the cluster owned its Ray and shut it down
