"""Benchmarks that start the server themselves: one configuration (``--launch``) or the same
workload against several, one after the other (``--compare``).

Each configuration is a fresh in-process server (``app.server.start_server``: a local Ray
cluster, the router, gRPC and HTTP on free ports of 127.0.0.1), warmed up, measured, stopped.
The workload is built once, from the first server's limits, and replayed unchanged against
every configuration. Without ``--config``, the engines are small CPU-friendly ones (as in
``splitserve demo``): block 16, 512-token steps, 32 sequences, 2048-token context, and
``num_threads`` torch threads per worker.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass

from app.loadgen.delivery import StepProbe
from cluster.config import ClusterConfig

STEP_SAMPLES = "_step_samples"  # record key of the StepSamples (not JSON: the caller pops it)


@dataclass(frozen=True)
class Side:
    """One cluster shape under test."""

    label: str  # e.g. "1P+1D", "colo x1"
    prefill: int  # prefill workers (ignored when colocated)
    decode: int  # decode workers, or colocated workers
    colocated: bool

    @property
    def workers(self) -> int:
        return self.decode if self.colocated else self.prefill + self.decode


def disaggregated(prefill: int, decode: int) -> Side:
    return Side(f"{prefill}P+{decode}D", prefill, decode, False)


def colocated(workers: int) -> Side:
    return Side(f"colo x{workers}", 0, workers, True)


def default_config(num_threads: int) -> ClusterConfig:
    engine = {"block_size": 16, "max_num_batched_tokens": 512, "max_num_seqs": 32,
              "max_model_len": 2048, "num_threads": num_threads}
    return ClusterConfig.model_validate({
        "prefill": {"replicas": 1, "num_cpus": 1, "engine": engine},
        "decode": {"replicas": 1, "num_cpus": 1, "engine": engine},
    })


def side_config(base: ClusterConfig, side: Side, model: str | None,
                kv_backend: str | None) -> ClusterConfig:
    """``base`` shaped to ``side``, on free local ports, with a local Ray big enough."""
    over = {"model.path": model, "colocated": side.colocated, "transfer.backend": kv_backend,
            "router.host": "127.0.0.1", "router.grpc_port": 0, "router.http_port": 0}
    counts = {"decode": side.decode} if side.colocated else {"prefill": side.prefill,
                                                             "decode": side.decode}
    for role, n in counts.items():
        over.update(base.pool_size_overrides(role, n))
    if side.colocated:  # one pool the autoscaler does not size (ClusterConfig refuses both)
        over["autoscaler.enabled"] = False
    if base.ray.address is None:
        over["ray.num_cpus"] = max(base.ray.num_cpus or 0, 4, side.workers)
    return base.with_overrides(**over)


def side_record(side: Side, config: ClusterConfig, startup_s: float) -> dict:
    return {"label": side.label, "prefill": 0 if side.colocated else side.prefill,
            "decode": side.decode, "colocated": side.colocated,
            "kv_backend": None if side.colocated else config.transfer.backend,
            "startup_s": startup_s, "engine": config.decode.engine.model_dump(),
            "model": config.model.path}


# bench(sender, specs or None) -> (specs, record): the measurement against one running server
BenchFn = Callable[..., Awaitable[tuple[list, dict]]]


async def bench_launched(side: Side, config: ClusterConfig, api: str, make_sender,
                         bench: BenchFn, specs=None, log=print):
    """Start ``config``, run ``bench`` against it through ``make_sender(endpoint)``, stop it.
    Returns (specs, record) with the side's config in ``record["config"]`` and the decode
    workers' step times, sampled all along, in ``record[STEP_SAMPLES]`` (``delivery``)."""
    from app.server import start_server

    log(f"[{side.label}] starting: {side.workers} worker(s)"
        + ("" if side.colocated else f", KV over {config.transfer.backend}") + " ...")
    t0 = time.perf_counter()
    server = await start_server(config)
    startup = time.perf_counter() - t0
    endpoint = server.endpoints()[api]
    log(f"[{side.label}] up in {startup:.1f} s at {endpoint}")
    probe = StepProbe(server.cluster.backend)
    probe.start()
    try:
        sender = make_sender(endpoint)
        try:
            specs, record = await bench(sender, specs)
        finally:
            await sender.close()
    finally:
        samples = await probe.stop()
        await server.stop()
    record["config"] = side_record(side, config, startup)
    record[STEP_SAMPLES] = samples
    return specs, record


def run_order(num_sides: int, rounds: int) -> list[tuple[int, int]]:
    """(round, side index) in the order they run: forward, then backward, alternately
    (A B, B A, ...), so a drift in the machine's load does not always favour one side."""
    order: list[tuple[int, int]] = []
    for r in range(rounds):
        sides = range(num_sides) if r % 2 == 0 else reversed(range(num_sides))
        order.extend((r, i) for i in sides)
    return order


async def compare(sides: Sequence[Side], configs: Sequence[ClusterConfig], api: str,
                  make_sender, bench: BenchFn, rounds: int = 1,
                  log=print) -> tuple[list, list[list[dict]]]:
    """The same workload against each side, ``rounds`` times in ``run_order``; returns
    (specs, records[side][round]). Every run gets a fresh cluster in a Ray namespace of its
    own, so worker names freed by one run's shutdown never collide with the next run's."""
    specs = None
    records: list[list[dict]] = [[{} for _ in range(rounds)] for _ in sides]
    order = run_order(len(sides), rounds)
    with shared_ray(configs, len(order)):
        for r, i in order:
            config = configs[i]
            if len(order) > 1:
                config = config.with_overrides(**{"ray.namespace":
                                                  f"{config.ray.namespace}-bench-{r}-{i}"})
            specs, record = await bench_launched(sides[i], config, api, make_sender, bench,
                                                 specs, log)
            record["config"]["round"] = r
            records[i][r] = record
    return specs, records


@contextlib.contextmanager
def shared_ray(configs: Sequence[ClusterConfig], runs: int) -> Iterator[None]:
    """With several runs on a local Ray: start Ray once here, stop it at the end, so each
    run pays only for its own workers (a cluster leaves a Ray it did not start running)."""
    if runs < 2 or any(c.ray.address is not None for c in configs):
        yield
        return
    import ray

    from cluster.runtime import start_local_ray

    if ray.is_initialized():
        yield
        return
    start_local_ray(num_cpus=max(c.ray.num_cpus or 1 for c in configs),
                    namespace=configs[0].ray.namespace)
    try:
        yield
    finally:
        ray.shutdown()
