"""Tensor-parallel workers on a real local Ray cluster: a colocated pool whose worker is a
group of two actors (``decode.engine.tensor_parallel_size: 2``) in one STRICT_PACK
placement group.

- Greedy streams over gRPC equal a plain TP=1 ``Engine`` token for token; the group is two
  bundles on one node, rank 1 an actor of its own.
- ``kill -9`` of rank 1's process mid-stream: every stream ends (finished, or failed with a
  clear error — none hangs), the worker group is replaced as a whole (a new worker id, its
  rank alive, the old placement group removed) and every block is free again.

One cluster for the module (a TP=2 worker is two processes loading the model: slow on 2
cores); every wait is bounded.
"""

from __future__ import annotations

import os
import signal
import time

import pytest
from grpc_streams import GrpcStreams
from test_ray_cluster import ENGINE, ServerThread, _config

from engine import Engine, SamplingParams

pytestmark = [pytest.mark.ray, pytest.mark.slow]

MAX_TOKENS = 40
PROMPTS = [[(13 * i + 7 * j) % 390 + 5 for j in range(6 + 11 * i)] for i in range(4)]


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir):
    return tiny_model_dir("llama")


def tp1_tokens(model_dir) -> list[list[int]]:
    """What a plain TP=1 ``Engine`` gives for ``PROMPTS`` (greedy)."""
    engine = Engine.from_pretrained(model_dir, block_size=4)
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)
    return [o.token_ids for o in engine.generate(PROMPTS, params)]


@pytest.fixture(scope="module")
def expected(model_dir):
    return tp1_tokens(model_dir)


@pytest.fixture(scope="module")
def server(model_dir):
    import ray

    engine = {**ENGINE, "tensor_parallel_size": 2}
    config = _config(model_dir, "torch_dist", colocated=True,
                     decode={"num_cpus": 0.5, "engine": engine})
    server = ServerThread(config)
    yield server
    server.stop()
    ray.shutdown()


def _the_worker(server: ServerThread) -> str:
    (worker_id,) = server.server.cluster.backend.workers
    return worker_id


def _rank_pids(server: ServerThread, worker_id: str) -> list[int]:
    """Process ids of ranks 1.. of a worker (asked of the worker actor, rank 0)."""
    import ray

    actor = server.server.cluster.factory._objects[worker_id]
    return ray.get(actor.__ray_call__.remote(
        lambda self: [h.pid for h in self.host.engine.runner.handles]), timeout=30)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _Streams(server: ServerThread) -> GrpcStreams:
    return GrpcStreams(server.server.endpoints()["grpc"], PROMPTS, MAX_TOKENS)


def test_a_tp2_worker_is_one_placed_group_and_streams_what_tp1_gives(server, expected):
    from ray.util.placement_group import placement_group_table

    worker_id = _the_worker(server)
    table = placement_group_table(server.server.cluster.factory._groups[worker_id])
    assert table["strategy"] == "STRICT_PACK" and table["state"] == "CREATED"
    assert len(table["bundles"]) == 2 and len(set(table["bundles_to_node_id"].values())) == 1
    (pid,) = _rank_pids(server, worker_id)
    assert _alive(pid) and pid != os.getpid()
    streams = _Streams(server)
    streams.join()
    assert streams.outcome == ["length"] * len(PROMPTS)
    assert streams.tokens == expected


def test_kill_9_of_rank_1_mid_stream_ends_every_stream_and_replaces_the_group(server,
                                                                           expected):
    from ray.util.placement_group import placement_group_table

    cluster = server.server.cluster
    victim = _the_worker(server)
    old_group = cluster.factory._groups[victim]
    (rank1,) = _rank_pids(server, victim)
    streams = _Streams(server)
    streams.wait_until(lambda: all(len(t) >= 3 for t in streams.tokens))
    os.kill(rank1, signal.SIGKILL)
    streams.join(allow_errors=True)
    for tokens, outcome, want in zip(streams.tokens, streams.outcome, expected, strict=True):
        if outcome == "length":  # migrated (or done before the kill): the undisturbed tokens
            assert tokens == want
        else:  # failed: a clear error, after a prefix of the right tokens
            assert isinstance(outcome, Exception), outcome
            assert "tensor-parallel" in str(outcome), outcome
            assert tokens == want[:len(tokens)]
    # The group is replaced as a whole: a new worker, its own rank alive, the old group gone.
    deadline = time.monotonic() + 120
    while set(cluster.backend.workers) in (set(), {victim}):
        assert time.monotonic() < deadline, "the lost worker group was not replaced"
        time.sleep(0.1)
    new = _the_worker(server)
    assert new != victim and victim not in cluster.factory._groups
    assert placement_group_table(old_group)["state"] == "REMOVED"
    (new_rank1,) = _rank_pids(server, new)
    assert _alive(new_rank1) and new_rank1 != rank1
    while (free := server.free_blocks()) != (total := server.total_blocks()):
        assert time.monotonic() < deadline, f"blocks free {free} of {total}"
        time.sleep(0.1)
    assert set(free) == {new}
    again = _Streams(server)  # and it serves
    again.join()
    assert again.tokens == expected


def test_a_group_that_cannot_be_placed_is_given_up_and_leaves_nothing_pending(server,
                                                                             model_dir):
    """Eight ranks of one CPU each on a 4-CPU node: never placed; given up at the start
    timeout like a single worker, its placement group removed, not left pending."""
    from ray.util.placement_group import placement_group_table

    from cluster.pools import WorkerFactory, WorkerStartTimeout

    config = _config(model_dir, "torch_dist", colocated=True,
                     decode={"num_cpus": 1, "engine": {**ENGINE, "tensor_parallel_size": 8}},
                     ray={"num_cpus": 4, "worker_start_timeout_s": 1.5})
    factory = WorkerFactory(config, "ray")
    factory._ids["colocated"] = iter(["unplaceable"])  # worker id colocated-unplaceable
    with pytest.raises(WorkerStartTimeout, match="tensor_parallel_size"):
        server.run(factory.create("colocated"), timeout=30)
    assert factory.start_timeouts["colocated"] == 1
    groups = [g for g in placement_group_table().values()
              if g["name"] == "colocated-unplaceable"]
    assert [g["state"] for g in groups] == ["REMOVED"]


def test_removing_a_tp_worker_stops_its_ranks_and_removes_its_group(server):
    """An orderly removal (drain, shutdown) is not a lost rank: the shutdown returns, the
    rank ends, the group is removed. (Last: it leaves the pool empty.)"""
    from ray.util.placement_group import placement_group_table

    cluster = server.server.cluster
    worker_id = _the_worker(server)
    group = cluster.factory._groups[worker_id]
    (rank1,) = _rank_pids(server, worker_id)
    server.run(cluster.remove_worker(worker_id), timeout=60)  # raises if shutdown failed
    assert placement_group_table(group)["state"] == "REMOVED"
    deadline = time.monotonic() + 30
    while _alive(rank1):
        assert time.monotonic() < deadline, "rank 1 outlived its worker"
        time.sleep(0.05)
    assert cluster.backend.workers == {} and cluster.factory._groups == {}
