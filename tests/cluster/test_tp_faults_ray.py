"""A rank of a disaggregated tensor-parallel worker dies (``kill -9``) on a real local Ray
cluster, prefill TP=2 -> decode TP=2: every stream finishes with the undisturbed tokens
(its requests move to the replacement), the lost worker group is replaced as a whole, and
every block is free again afterwards."""

from __future__ import annotations

import os
import signal
import time

import pytest
from grpc_streams import GrpcStreams
from test_ray_cluster import ENGINE, ServerThread, _config
from test_tp_ray import _alive, _rank_pids, _Streams, tp1_tokens

pytestmark = [pytest.mark.ray, pytest.mark.slow]


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir):
    return tiny_model_dir("llama")


@pytest.fixture(scope="module")
def expected(model_dir):
    return tp1_tokens(model_dir)


@pytest.fixture(scope="module")
def server(model_dir):
    import ray

    tp2 = {**ENGINE, "tensor_parallel_size": 2}
    config = _config(model_dir, "torch_dist", prefill={"num_cpus": 0.5, "engine": tp2},
                     decode={"num_cpus": 0.5, "engine": tp2})
    server = ServerThread(config)
    yield server
    server.stop()
    ray.shutdown()


def _worker_of(server: ServerThread, role: str) -> str:
    (worker_id,) = [w for w, h in server.server.cluster.backend.workers.items()
                    if h.role == role]
    return worker_id


def _check_outcomes(streams: GrpcStreams, expected) -> None:
    """Every stream finished with the undisturbed tokens: moved to the replacement group,
    whichever noticed the dead rank first (the rank watch, or a step that found the group
    broken: both end the worker before its requests could fail)."""
    assert streams.outcome == ["length"] * len(expected), streams.outcome
    assert streams.tokens == expected


def _replaced(server: ServerThread, role: str, victim: str, old_rank: int) -> None:
    cluster = server.server.cluster
    deadline = time.monotonic() + 120
    while True:
        ids = [w for w, h in cluster.backend.workers.items() if h.role == role]
        if ids and victim not in ids:
            break
        assert time.monotonic() < deadline, f"the lost {role} group was not replaced"
        time.sleep(0.1)
    (new,) = ids
    assert victim not in cluster.factory._groups
    (rank1,) = _rank_pids(server, new)
    assert _alive(rank1) and rank1 != old_rank
    while (free := server.free_blocks()) != server.total_blocks():
        assert time.monotonic() < deadline, f"blocks not freed: {free}"
        time.sleep(0.1)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("role", ["decode", "prefill"])
def test_kill_9_of_a_rank_mid_stream_ends_every_stream_and_replaces_the_group(server,
                                                                           expected, role):
    victim = _worker_of(server, role)
    (rank1,) = _rank_pids(server, victim)
    streams = _Streams(server)
    streams.wait_until(lambda: all(len(t) >= 3 for t in streams.tokens))
    os.kill(rank1, signal.SIGKILL)
    streams.join(allow_errors=True)  # _check_outcomes says what each stream ended with
    _check_outcomes(streams, expected)
    _replaced(server, role, victim, rank1)
    again = _Streams(server)  # and the cluster serves exactly as before
    again.join()
    assert again.tokens == expected
