"""Issue #12's outage, on a real local Ray: a scale-up waiting for room must not take the
resources a lost worker's replacement needs.

Ray has room for exactly two workers. A prefill scale-up is pending (no CPU left) when the
decode worker is killed with SIGKILL. Before: the freed CPU went to the pending prefill actor,
the decode replacement stayed pending for good and /health answered 503 forever. Now the loss
cancels the pending scale-up (its actor is killed) and the replacement takes the CPU.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time

import pytest
from test_ray_cluster import ENGINE, ServerThread, _config

pytestmark = [pytest.mark.ray, pytest.mark.slow]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from engine.make_model import make_model

    return make_model(tmp_path_factory.mktemp("m") / "llama", "llama", "tiny", seed=0,
                      progress=False)


def _wait(predicate, what: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_a_pending_scale_up_does_not_starve_a_lost_workers_replacement(model_dir):
    import ray

    config = _config(model_dir, "torch_dist",
                     prefill={"num_cpus": 1, "engine": ENGINE},
                     decode={"num_cpus": 1, "engine": ENGINE},
                     ray={"num_cpus": 2, "namespace": "starve", "worker_start_timeout_s": 120})
    server = ServerThread(config)
    cluster = server.server.cluster
    try:
        growth = asyncio.run_coroutine_threadsafe(cluster.scale("prefill", +1), server.loop)
        _wait(lambda: len(cluster._placing) == 1, "the scale-up to be pending", 30)
        time.sleep(1.0)  # it stays pending: no CPU is left for it
        assert not growth.done() and cluster.replicas("prefill") == 1

        decode = next(w for w, h in cluster.backend.workers.items() if h.role == "decode")
        actor = cluster.factory._objects[decode]
        pid = ray.get(actor.__ray_call__.remote(lambda self: os.getpid()), timeout=30)
        os.kill(pid, signal.SIGKILL)

        assert growth.result(timeout=60) == []  # cancelled: the replacement goes first
        # Registered in the backend a moment before the replacement task itself ends.
        _wait(lambda: cluster.replicas("decode") == 1 and cluster.backend.is_ready()
              and not cluster.replacement_pending("decode"),
              "the decode replacement to be ready", 90)
        assert cluster.replicas("prefill") == 1

        from router.client import SplitServeClient

        with SplitServeClient(server.server.endpoints()["grpc"], timeout=60) as client:
            result = client.generate([5, 6, 7, 8], max_tokens=3, temperature=0.0,
                                     ignore_eos=True)
        assert len(result.token_ids) == 3
    finally:
        server.stop()
        ray.shutdown()
