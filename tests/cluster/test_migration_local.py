"""Request migration in one process (loopback KV transfer, no Ray): a worker that dies under
a request does not fail it. A "death" here makes every call to the worker fail with
``WorkerGone`` (calls in flight included, as Ray fails a dead actor's pending calls) and
stops the worker object; the real kill -9 versions are in test_faults_ray.py."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time

import pytest

from cluster.backend import BackendRequest
from cluster.config import ClusterConfig
from cluster.handles import WorkerGone
from cluster.runtime import Cluster
from engine import Engine, SamplingParams
from kv_transfer.loopback import Fault

ENGINE = {"block_size": 4, "max_num_batched_tokens": 64, "max_num_seqs": 16,
          "max_model_len": 512}
PROMPTS = [[(7 * i + 3 * j) % 390 + 5 for j in range(20 + 3 * i)] for i in range(4)]
GREEDY = SamplingParams(max_tokens=64, temperature=0.0, ignore_eos=True)
SEEDED = SamplingParams(max_tokens=64, temperature=0.9, top_k=50, seed=1234, ignore_eos=True)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from engine.make_model import make_model

    return make_model(tmp_path_factory.mktemp("m") / "llama", "llama", "tiny", seed=0,
                      progress=False)


@pytest.fixture(scope="module")
def colocated(model_dir):
    """What one undisturbed engine gives, per sampling parameters."""
    engine = Engine.from_pretrained(model_dir, load_tokenizer=False, block_size=4)
    return {params: [o.token_ids for o in engine.generate(PROMPTS, params)]
            for params in (GREEDY, SEEDED)}


@pytest.fixture(scope="module")
def expected(colocated):
    return colocated[GREEDY]


def _config(model_dir, prefill=1, decode=1) -> ClusterConfig:
    return ClusterConfig.model_validate({
        "model": {"path": str(model_dir), "device": "cpu"},
        "prefill": {"replicas": prefill, "engine": ENGINE},
        "decode": {"replicas": decode, "engine": ENGINE},
        "transfer": {"backend": "loopback", "timeout_s": 5},
        "scheduler": {"block_size": 4},
        "autoscaler": {"enabled": False}})


def _make_killable(cluster: Cluster) -> None:
    """Wrap every current worker's transport so that ``_kill`` can end its calls as a death
    would."""
    for handle in cluster.backend.workers.values():
        handle.dead = asyncio.Event()
        handle.transport.call = _dying_call(handle.worker_id, handle.transport.call,
                                            handle.dead)


def _dying_call(worker_id, original, dead: asyncio.Event):
    async def call(method, *args):
        task = asyncio.ensure_future(original(method, *args))
        waiter = asyncio.ensure_future(dead.wait())
        await asyncio.wait([task, waiter], return_when=asyncio.FIRST_COMPLETED)
        waiter.cancel()
        if dead.is_set():
            task.cancel()
            raise WorkerGone(f"worker {worker_id} died (test)")
        return task.result()

    return call


def _kill(cluster: Cluster, worker_id: str) -> None:
    """The worker dies: its in-flight and later calls fail with WorkerGone, it stops."""
    handle = cluster.backend.workers[worker_id]
    handle.dead.set()
    handle.transport.worker.host.loop.stop(timeout=0)  # it computes nothing more


async def _stream(backend, rid, prompt, params, seen: list[int] | None = None):
    """Run one request; ``seen`` gets each token as it arrives (to time a kill)."""
    tokens, final = [] if seen is None else seen, None
    async for out in backend.submit(BackendRequest(rid, prompt, params, time.time())):
        tokens.extend(out.new_token_ids)
        final = out
    return list(tokens), final


async def _until(predicate, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.01)


@contextlib.asynccontextmanager
async def local_cluster(config: ClusterConfig):
    """A local-mode cluster, started; shut down on the way out."""
    cluster = Cluster(config, mode="local")
    await cluster.start()
    try:
        yield cluster
    finally:
        await cluster.shutdown()


class ByAttempt(dict):
    """Loopback faults keyed ``{request id}#{attempt}``: a worker-side id without its
    backend-unique tag (see ``cluster.flight.AttemptIds``)."""

    def get(self, worker_rid, default=None):
        return super().get(worker_rid.rpartition(".")[0], default)


def worker_object(cluster, role: str):
    """The first in-process worker of ``role`` (the object, not its handle)."""
    return next(w for wid, w in cluster.factory._objects.items() if wid.startswith(role))


class HeldCall:
    """A worker method whose calls wait for ``release`` before they run, like an RPC still
    in flight; ``entered`` is set when a call arrives, ``done`` once it has run."""

    def __init__(self, method) -> None:
        self.method = method
        self.entered, self.release, self.done = (threading.Event(), threading.Event(),
                                                 threading.Event())

    def __call__(self, *args, **kwargs):
        self.entered.set()
        self.release.wait(10)
        try:
            return self.method(*args, **kwargs)
        finally:
            self.done.set()


async def _set(event: threading.Event, timeout: float) -> None:
    assert await asyncio.to_thread(event.wait, timeout), "timed out"


async def _cancel_during(held: HeldCall, backend, rid, prompt, params) -> None:
    """Start request ``rid``, cancel it while ``held``'s call to a worker is in flight (so
    the abort sent at once reaches the worker before the call), then let the call run."""
    task = asyncio.create_task(_stream(backend, rid, prompt, params))
    await _set(held.entered, 10)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    held.release.set()
    await _set(held.done, 10)


def _free_blocks(cluster) -> dict[str, int]:
    return {wid: w.free_blocks() for wid, w in cluster.factory._objects.items()
            if wid in cluster.backend.workers}


def _totals(cluster) -> dict[str, int]:
    return {wid: w.host.engine.pool.num_blocks for wid, w in cluster.factory._objects.items()
            if wid in cluster.backend.workers}


@pytest.mark.parametrize("params", [GREEDY, SEEDED], ids=["greedy", "seeded"])
def test_decode_worker_death_mid_stream_resumes_with_an_identical_stream(model_dir, colocated,
                                                                         params):
    async def main():
        cluster = Cluster(_config(model_dir, decode=2), mode="local")
        await cluster.start()
        _make_killable(cluster)
        try:
            seen = [[] for _ in PROMPTS]
            tasks = [asyncio.create_task(_stream(cluster.backend, f"r{i}", p, params, seen[i]))
                     for i, p in enumerate(PROMPTS)]
            await _until(lambda: len(seen[0]) >= 3)
            flights = cluster.backend._flights
            victim = flights["r0"].attempt.decode_id
            moved = [rid for rid, f in flights.items() if f.attempt.decode_id == victim]
            _kill(cluster, victim)
            results = await asyncio.wait_for(asyncio.gather(*tasks), 60)
            await asyncio.wait_for(asyncio.gather(*cluster._replacements), 60)
            await _until(lambda: _free_blocks(cluster) == _totals(cluster), 5)
            return results, moved, dict(cluster.backend.migrations), cluster.replicas("decode")
        finally:
            await cluster.shutdown()

    results, moved, migrations, decode_replicas = asyncio.run(main())
    assert [tokens for tokens, _ in results] == colocated[params]
    assert all(final.finish_reason == "length" for _, final in results)
    assert migrations["decode"] == len(moved) >= 1
    for i in range(len(PROMPTS)):
        timing = results[i][1].timing
        assert (timing.get("migrations") == 1.0) == (f"r{i}" in moved)
    assert decode_replicas == 2  # the pool is back to its size


def test_a_workers_first_death_is_replaced_at_once_whatever_died_before(model_dir, caplog):
    """The replacement back-off is per worker line: a decode worker that keeps dying right
    after it starts waits longer each time, but the prefill worker's first death is
    replaced at once (a probe saw it wait 15 and 30 s because decode workers had died)."""
    import logging

    async def lose(cluster, worker_id: str) -> None:
        _kill(cluster, worker_id)
        await _until(lambda: cluster._replacements, 10)  # the loss is noticed
        await asyncio.wait_for(asyncio.gather(*cluster._replacements), 30)
        _make_killable(cluster)  # the replacement too

    async def main():
        async with local_cluster(_config(model_dir)) as cluster:
            _make_killable(cluster)
            for _ in range(3):  # each decode replacement dies at once
                decode = next(w for w, h in cluster.backend.workers.items() if h.role == "decode")
                await lose(cluster, decode)
            prefill = next(w for w, h in cluster.backend.workers.items() if h.role == "prefill")
            await lose(cluster, prefill)
            return prefill, await _stream(cluster.backend, "after", PROMPTS[0], GREEDY)

    with caplog.at_level(logging.INFO, logger="cluster.runtime"):
        prefill, (tokens, final) = asyncio.run(main())
    waits = [r.getMessage().split(":")[0] for r in caplog.records
             if r.getMessage().startswith("replacing lost")]
    assert waits == ["replacing lost decode worker decode-0 now",
                     "replacing lost decode worker decode-1 in 1 s",
                     "replacing lost decode worker decode-2 in 3 s",
                     f"replacing lost prefill worker {prefill} now"]
    assert final.finish_reason == "length"


def test_prefill_worker_death_retries_prefills_and_leaves_decodes_alone(model_dir, expected):
    """P dies while one request is mid-prefill and others decode: the first is re-prefilled
    (its decode reservation released first), the others are not touched."""
    async def main():
        cluster = Cluster(_config(model_dir, prefill=2), mode="local")
        await cluster.start()
        _make_killable(cluster)
        backend = cluster.backend
        try:
            seen = [[] for _ in PROMPTS]
            decoding = [asyncio.create_task(_stream(backend, f"r{i}", p, GREEDY, seen[i]))
                        for i, p in enumerate(PROMPTS[:3])]
            await _until(lambda: all(len(s) >= 2 for s in seen[:3]))
            # Hold both prefill engines, so the next request is surely mid-prefill when
            # its prefill worker dies.
            gate = threading.Event()
            for wid in cluster.factory._objects:
                if wid.startswith("prefill"):
                    cluster.factory._objects[wid].host.loop.call(lambda e: gate.wait(30))
            late = asyncio.create_task(_stream(backend, "late", PROMPTS[3], GREEDY))
            await _until(lambda: "late" in backend._flights
                         and backend._flights["late"].attempt.phase == "prefill")
            _kill(cluster, backend._flights["late"].attempt.prefill_id)
            gate.set()
            results = await asyncio.wait_for(asyncio.gather(*decoding, late), 60)
            await _until(lambda: _free_blocks(cluster) == _totals(cluster), 5)
            return results, dict(backend.migrations)
        finally:
            await cluster.shutdown()

    results, migrations = asyncio.run(main())
    assert [tokens for tokens, _ in results] == expected
    assert migrations == {"prefill": 1, "decode": 0, "transfer": 0}
    assert [final.timing.get("migrations") for _, final in results] == [None, None, None, 1.0]


def test_a_failed_kv_transfer_is_retried_once_then_fails_clearly(model_dir, expected):
    async def main():
        cluster = Cluster(_config(model_dir), mode="local")
        await cluster.start()
        try:
            hub = cluster.factory._hub
            hub.faults = ByAttempt({"once#0": Fault("fail"),  # the first attempt's link breaks
                                    "twice#0": Fault("fail"),
                                    "twice#1": Fault("fail")})  # and so does the retry's
            once = await _stream(cluster.backend, "once", PROMPTS[0], GREEDY)
            twice = await _stream(cluster.backend, "twice", PROMPTS[1], GREEDY)
            await _until(lambda: _free_blocks(cluster) == _totals(cluster), 5)
            return once, twice
        finally:
            await cluster.shutdown()

    (tokens, final), (_, failed) = asyncio.run(main())
    assert tokens == expected[0] and final.timing["migrations"] == 1.0
    assert failed.finish_reason == "error"
    assert "retry" in str(failed.error) and "Traceback" not in str(failed.error)


def test_a_request_cancelled_while_its_blocks_are_being_reserved_frees_them(model_dir):
    """The client goes away while the decode worker's reserve call is in flight: the
    reservation completes on the worker after the cancellation, and must still be freed
    (an abort sent meanwhile finds nothing to free; a reservation never started has no
    KV deadline, so its blocks would be held for good)."""

    async def main():
        async with local_cluster(_config(model_dir)) as cluster:
            decode = worker_object(cluster, "decode")
            decode.reserve = reserve = HeldCall(decode.reserve)
            # the reservation completes after the cancellation
            await _cancel_during(reserve, cluster.backend, "gone", PROMPTS[3], GREEDY)
            pool = decode.host.engine.pool
            await _until(lambda: pool.num_free == pool.num_blocks, 5)
            return cluster.backend.stats()["in_flight"]

    assert asyncio.run(main()) == 0


def test_a_prefill_call_its_abort_overtook_never_runs_and_the_id_serves_again(model_dir,
                                                                             expected):
    """The client goes away while the prefill call is in flight, and the abort sent then
    reaches the prefill worker first (as on a threaded Ray actor): the call, when it runs,
    is refused instead of prefilling the prompt and shipping KV nobody expects. Every block
    is free afterwards, and the client can use the same request id again, as it can after
    a cancel before the prefill call (the prefill worker is then told nothing)."""

    async def main():
        async with local_cluster(_config(model_dir)) as cluster:
            prefill, decode = worker_object(cluster, "prefill"), worker_object(cluster, "decode")

            async def all_free():  # the cancelled request is gone from both workers
                for worker in (prefill, decode):
                    pool = worker.host.engine.pool
                    await _until(lambda pool=pool: pool.num_free == pool.num_blocks, 5)
                    await _until(lambda w=worker: not w.host.engine.scheduler.requests, 5)

            ran: list[str] = []
            call = prefill.host.call
            prefill.host.call = lambda fn, *a: (ran.append(getattr(fn, "__name__", "")),
                                                call(fn, *a))[1]
            prefill.prefill = held = HeldCall(prefill.prefill)
            # the prefill call runs after the abort
            await _cancel_during(held, cluster.backend, "again", PROMPTS[1], GREEDY)
            assert "_add_prefill" not in ran  # refused: the engine never saw the prompt
            prefill.prefill = held.method
            await all_free()
            # Cancelled while its blocks are reserved (before any prefill call), then again.
            decode.reserve = reserve = HeldCall(decode.reserve)
            await _cancel_during(reserve, cluster.backend, "again", PROMPTS[1], GREEDY)
            decode.reserve = reserve.method
            await all_free()
            tokens, final = await _stream(cluster.backend, "again", PROMPTS[1], GREEDY)
            assert final.finish_reason == "length" and tokens == expected[1]
            await all_free()
            return cluster.backend.stats()["in_flight"]

    assert asyncio.run(main()) == 0


def test_a_late_abort_of_a_cancelled_request_spares_a_new_request_with_the_same_id(
        model_dir, expected):
    """A client may reuse a request id once its request has ended, while a call of the old
    request can still be on its way to a worker (an RPC in flight; on a threaded Ray actor
    calls overtake each other). Here the old request is cancelled during its reserve call,
    which lands afterwards and is aborted late, and that abort is slow: a new request with
    the same id, started meanwhile, must be served as if the old one never existed (no
    "already in use" from the worker, no migration, no abort of its own reservation)."""

    async def main():
        async with local_cluster(_config(model_dir)) as cluster:
            decode = worker_object(cluster, "decode")
            decode.reserve = reserve = HeldCall(decode.reserve)
            old = asyncio.create_task(_stream(cluster.backend, "same", PROMPTS[3], GREEDY))
            await _set(reserve.entered, 10)
            old.cancel()
            await asyncio.gather(old, return_exceptions=True)
            decode.abort = late_abort = HeldCall(decode.abort)
            reserve.release.set()  # the old reservation lands after its request ended...
            await _set(reserve.done, 10)
            await _set(late_abort.entered, 10)  # ...and its abort is on the way, slowly
            decode.reserve, decode.abort = reserve.method, late_abort.method
            new = await asyncio.wait_for(
                _stream(cluster.backend, "same", PROMPTS[1], GREEDY), 60)
            late_abort.release.set()
            await _set(late_abort.done, 10)
            pool = decode.host.engine.pool
            await _until(lambda: pool.num_free == pool.num_blocks, 5)
            await _until(lambda: not decode.host.engine.scheduler.requests, 5)
            return new, cluster.backend.stats()["in_flight"]

    (tokens, final), in_flight = asyncio.run(main())
    assert final.finish_reason == "length" and tokens == expected[1]
    assert "migrations" not in final.timing  # served by its first attempt
    assert in_flight == 0


def test_a_request_cancelled_while_its_generate_call_is_in_flight_is_ended(model_dir):
    """Colocated: the client goes away while the worker's generate call is in flight. The
    abort sent at once finds nothing (the call has not run yet, as when an abort overtakes
    it on a threaded Ray actor); once the call has run, the request must still be ended,
    not decoded to max_tokens for nobody (here 400 steps of at least 20 ms: 8 s)."""
    config = _config(model_dir).model_copy(update={"colocated": True})
    long = SamplingParams(max_tokens=400, temperature=0.0, ignore_eos=True)

    async def main():
        async with local_cluster(config) as cluster:
            worker = worker_object(cluster, "colocated")
            engine, step = worker.host.engine, worker.host.engine.step

            def slow_step():  # the injected slowness that makes a run to max_tokens long
                time.sleep(0.02)
                return step()

            worker.generate = generate = HeldCall(worker.generate)
            engine.step = slow_step
            # the generate call runs after the abort
            await _cancel_during(generate, cluster.backend, "gone", PROMPTS[0], long)
            await _until(lambda: not engine.scheduler.requests, 3)
            pool = engine.pool
            await _until(lambda: pool.num_free == pool.num_blocks, 3)
            return cluster.backend.stats()["in_flight"]

    assert asyncio.run(main()) == 0
