"""Worker deaths on a real local Ray cluster (KV over gloo): ``kill -9`` of a worker's
process while clients stream over gRPC. Every stream completes, identical to an undisturbed
run; afterwards the pool is back to its size and every block is free on every worker.

One cluster for the module (starting Ray is slow on 2 cores); each test bounded in time.
"""

from __future__ import annotations

import os
import signal
import time

import pytest
from grpc_streams import GrpcStreams
from test_ray_cluster import ServerThread, _config

from engine import Engine, SamplingParams

pytestmark = [pytest.mark.ray, pytest.mark.slow]

MAX_TOKENS = 40
PROMPTS = [[(11 * i + 5 * j) % 390 + 5 for j in range(8 + 9 * i)] for i in range(6)]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from engine.make_model import make_model

    return make_model(tmp_path_factory.mktemp("m") / "llama", "llama", "tiny", seed=0,
                      progress=False)


SEEDED = {"temperature": 0.9, "top_k": 50, "seed": 77}  # a seeded stream, sampled


@pytest.fixture(scope="module")
def expected(model_dir):
    engine = Engine.from_pretrained(model_dir, block_size=4)
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)
    return [o.token_ids for o in engine.generate(PROMPTS, params)]


@pytest.fixture(scope="module")
def expected_seeded(model_dir):
    engine = Engine.from_pretrained(model_dir, block_size=4)
    params = SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True, **SEEDED)
    return [o.token_ids for o in engine.generate(PROMPTS, params)]


@pytest.fixture(scope="module")
def server(model_dir):
    import ray

    server = ServerThread(_config(model_dir, "torch_dist"))
    yield server
    server.stop()
    ray.shutdown()


def _pid(server: ServerThread, worker_id: str) -> int:
    import ray

    actor = server.server.cluster.factory._objects[worker_id]
    return ray.get(actor.__ray_call__.remote(lambda self: os.getpid()), timeout=30)


def _worker_of(server: ServerThread, role: str) -> str:
    return next(w for w, h in server.server.cluster.backend.workers.items() if h.role == role)


def _Streams(server: ServerThread, prompts, sampling: dict | None = None,
             changed=None) -> GrpcStreams:
    return GrpcStreams(server.server.endpoints()["grpc"], prompts, MAX_TOKENS, sampling,
                       changed)


def _back_to_baseline(server: ServerThread, timeout: float = 90.0) -> None:
    """The pools are back to one worker each and every block is free on every worker."""
    cluster = server.server.cluster
    deadline = time.monotonic() + timeout
    while True:
        sizes = (cluster.replicas("prefill"), cluster.replicas("decode"))
        free, total = server.free_blocks(), server.total_blocks()
        if sizes == (1, 1) and free == total and set(free) == set(total):
            return
        assert time.monotonic() < deadline, f"pools {sizes}, free {free} of {total}"
        time.sleep(0.2)


def test_kill_9_of_the_decode_worker_mid_stream_resumes_every_stream(server, expected,
                                                                     expected_seeded):
    """Greedy and seeded streams: each continues on the replacement exactly as an
    undisturbed colocated engine gives it."""
    backend = server.server.cluster.backend
    before = dict(backend.migrations)
    victim = _worker_of(server, "decode")
    greedy = _Streams(server, PROMPTS)
    seeded = _Streams(server, PROMPTS, SEEDED, changed=greedy.changed)
    greedy.wait_until(lambda: all(len(t) >= 3 for t in greedy.tokens + seeded.tokens))
    os.kill(_pid(server, victim), signal.SIGKILL)
    greedy.join()
    seeded.join()
    assert greedy.tokens == expected
    assert seeded.tokens == expected_seeded
    assert greedy.finish == seeded.finish == ["length"] * len(PROMPTS)
    resumed = backend.migrations["decode"] - before["decode"]
    assert 1 <= resumed <= 2 * len(PROMPTS)  # those not yet finished when it died
    _back_to_baseline(server)
    assert victim not in backend.workers


def test_kill_9_of_the_prefill_worker_retries_prefills_and_spares_decodes(server, expected):
    """Half the requests are decoding when the prefill worker dies, the other half are held
    mid-prefill on it (its engine loop is blocked): the first half go on untouched, the
    second half are re-prefilled on the replacement."""
    backend = server.server.cluster.backend
    before = dict(backend.migrations)
    victim = _worker_of(server, "prefill")
    half = len(PROMPTS) // 2
    decoding = _Streams(server, PROMPTS[:half])
    decoding.wait_until(lambda: all(len(t) >= 2 for t in decoding.tokens))
    actor = server.server.cluster.factory._objects[victim]
    # Hold the prefill engine: the next prompts stay mid-prefill until it dies.
    actor.__ray_call__.remote(lambda self: self.host.loop.call(lambda e: time.sleep(120))
                              and None)
    prefilling = _Streams(server, PROMPTS[half:])
    deadline = time.monotonic() + 30
    while sum(f.attempt.phase == "prefill" for f in list(backend._flights.values())) < half:
        assert time.monotonic() < deadline, "requests never reached the prefill worker"
        time.sleep(0.01)
    os.kill(_pid(server, victim), signal.SIGKILL)
    decoding.join()
    prefilling.join()
    assert decoding.tokens + prefilling.tokens == expected
    assert backend.migrations["decode"] == before["decode"]  # decodes untouched
    assert backend.migrations["prefill"] - before["prefill"] == half
    _back_to_baseline(server)


def test_a_broken_pair_channel_is_rebuilt_and_its_requests_complete(server, expected):
    """Really shut down the sockets of the prefill→decode channel while prompts are in
    flight: the requests whose transfer broke are retried, every stream completes."""
    import ray

    def _break_pair_sockets(d_pid: int, store_port: int) -> int:
        """In the prefill worker: shut down its TCP connections to the decode worker's process
        (the gloo pair channels; the TCPStore connection is left alone). Returns how many."""
        import socket

        import psutil

        theirs = {c.laddr.port for c in psutil.Process(d_pid).net_connections("tcp")
                  if c.status == psutil.CONN_ESTABLISHED}
        broken = 0
        for conn in psutil.Process().net_connections("tcp"):
            if conn.raddr and conn.raddr.port in theirs and conn.raddr.port != store_port:
                sock = socket.socket(fileno=os.dup(conn.fd))
                sock.shutdown(socket.SHUT_RDWR)
                sock.close()
                broken += 1
        return broken

    cluster = server.server.cluster
    backend = cluster.backend
    before = dict(backend.migrations)
    p, d = _worker_of(server, "prefill"), _worker_of(server, "decode")
    warm = _Streams(server, PROMPTS[:1])  # the channel exists
    warm.join()
    store_port = backend._endpoints[d].port
    d_pid = _pid(server, d)
    streams = _Streams(server, PROMPTS)
    actor = cluster.factory._objects[p]
    broken = ray.get(actor.__ray_call__.remote(
        lambda self: _break_pair_sockets(d_pid, store_port)), timeout=30)
    t0 = time.monotonic()
    streams.join()
    assert broken >= 1
    # Under the KV deadline (20 s): a broken link is noticed, not waited out.
    assert time.monotonic() - t0 < 15
    assert streams.tokens == expected
    after = backend.migrations
    print(f"broke {broken} sockets; transfer retries {after['transfer'] - before['transfer']}")
    _back_to_baseline(server)


def test_short_soak_accounts_for_every_request_and_leaks_nothing(server, model_dir):
    """A short soak (the long one is benchmarks/soak.py): gRPC and HTTP streams, cancels
    and disconnects, hostile requests, and a kill -9 of each worker midway."""
    from app.loadgen.soak import SoakPlan, run_soak

    engine = Engine.from_pretrained(model_dir, block_size=4)

    def expected_tokens(items):
        longest = max(n for _, n in items)
        params = SamplingParams(max_tokens=longest, temperature=0.0, ignore_eos=True)
        outs = engine.generate([p for p, _ in items], params)
        return [o.token_ids[:n] for o, (_, n) in zip(outs, items, strict=True)]

    plan = SoakPlan(num_requests=120, concurrency=12, seed=1, max_tokens=(4, 32),
                    prompt_len=(4, 60), hostile_fraction=0.05, request_timeout_s=90,
                    settle_timeout_s=90)
    summary = server.run(run_soak(server.server, plan, expected_tokens), timeout=400)
    print(summary)
    assert sum(summary.outcomes.values()) == plan.num_requests
    assert summary.outcomes["missing"] == 0
    assert summary.outcomes["errored"] == 0, summary.errors
    assert summary.outcomes["rejected"] >= 1 and summary.outcomes["cancelled"] >= 1
    assert summary.mismatched == 0
    assert len(summary.killed) == 2
    assert not any(summary.leaked_blocks.values()), summary.leaked_blocks
    assert summary.router_entries == 0 and summary.backend_entries == 0
    assert summary.pool_sizes == {"prefill": 1, "decode": 1}
