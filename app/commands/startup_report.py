"""What `splitserve serve` prints while the cluster starts and once it is up.

Workers run in Ray actors whose own logs do not reach this process (``log_to_driver`` is
off), so what each worker did at start-up (weights loaded, KV cache sized, warm-up) is
asked of it once it is registered (``HostedWorker.startup_report``) and printed here, one
line per worker:

  decode-0  KV cache: 4096 blocks = 65536 tokens (128.0 MiB); engine loaded in 1.2 s, warm-up 0.6 s
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

log = logging.getLogger(__name__)
TICK_S = 1.0


def weights_bytes(model_dir: str) -> int:
    return sum(p.stat().st_size for p in Path(model_dir).glob("*.safetensors"))


@contextlib.asynccontextmanager
async def wait_ticker(config, stream=None) -> AsyncIterator[None]:
    """Say what is starting; on a terminal, count the seconds until it is up (the workers
    load their weights in their own processes, out of sight)."""
    stream = stream or sys.stderr
    pools = ("colocated",) if config.colocated else ("prefill", "decode")
    sizes = " + ".join(f"{getattr(config, 'decode' if r == 'colocated' else r).replicas} {r}"
                       for r in pools)
    mib = weights_bytes(config.model.path) / 2**20
    print(f"starting {sizes} worker(s): each loads {Path(config.model.path).name} "
          f"({mib:.1f} MiB of weights, {config.model.dtype}) and warms up", file=stream,
          flush=True)
    task = None
    if stream.isatty():
        task = asyncio.create_task(_tick(stream))
    try:
        yield
    finally:
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            stream.write("\r\033[K")
            stream.flush()


async def _tick(stream) -> None:
    t0 = time.perf_counter()
    while True:
        stream.write(f"\r  loading and warming up... {time.perf_counter() - t0:4.0f} s")
        stream.flush()
        await asyncio.sleep(TICK_S)


def worker_line(worker_id: str, report: dict) -> str:
    """One worker's start-up, e.g. ``KV cache: 2048 blocks = 32768 tokens``."""
    blocks, size = report["num_blocks"], report["block_size"]
    line = (f"  {worker_id:10s} KV cache: {blocks} blocks = {blocks * size} tokens "
            f"({report['kv_cache_bytes'] / 2**20:.1f} MiB)")
    if report.get("load_s") is not None:
        line += f"; engine loaded in {report['load_s']:.1f} s"  # weights, KV cache, kernels
    if report.get("warmup_s") is not None:
        line += f", warm-up {report['warmup_s']:.2f} s"
    return line


async def report_workers(cluster, elapsed_s: float, stream=None) -> None:
    """Print one line per registered worker, then the start-up time."""
    stream = stream or sys.stdout
    for worker_id, handle in sorted(cluster.backend.workers.items()):
        try:
            report = await handle.startup_report()
        except Exception as exc:  # a worker lost meanwhile: the cluster replaces it
            log.warning("worker %s did not report its start-up: %s", worker_id, exc)
            continue
        print(worker_line(worker_id, report), file=stream, flush=True)
    print(f"cluster up in {elapsed_s:.1f} s", file=stream, flush=True)
