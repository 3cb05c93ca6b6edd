"""The ray backend: a sender in the driver, a receiver inside a tiny decode-worker actor."""

from __future__ import annotations

from pathlib import Path

import pytest
import ray  # a core dependency: a broken install fails here, never skips
import torch

from cluster.runtime import start_local_ray
from kv_transfer import PeerClosed, TransferConfig, TransferTimeout, blocks, make_sender

from .helpers import make_cache

pytestmark = pytest.mark.ray

CONFIG = TransferConfig(backend="ray", timeout_s=20.0)
ROOT = Path(__file__).resolve().parents[2]


class DecodeActor:
    """What the decode worker actor does for the ray backend: own a receiver, expose a method."""

    def __init__(self, config: TransferConfig) -> None:
        from kv_transfer import make_receiver

        self.kv = make_cache(None)
        me = ray.get_runtime_context().current_actor
        self.rx = make_receiver(config, self.kv, name="decode-ray", actor=me, method="receive_kv")

    def receive_kv(self, header: bytes, payload) -> bool:
        return self.rx.deliver(header, payload)

    def endpoint(self):
        return self.rx.endpoint()

    def expect(self, request_id: str, dst_block_ids: list[int]) -> None:
        self.rx.expect(request_id, dst_block_ids)

    def abort(self, request_id: str) -> bool:
        return self.rx.abort(request_id)

    def poll(self) -> list[tuple[str, str | None]]:
        return [(rid, None if e is None else str(e)) for rid, e in self.rx.poll()]

    def blocks(self, ids: list[int]) -> torch.Tensor:
        return blocks.gather(self.kv, ids)


@pytest.fixture(scope="module")
def actor():
    start_local_ray(num_cpus=2, runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}})
    handle = ray.remote(DecodeActor).remote(CONFIG)
    yield handle
    ray.shutdown()


def test_ray_round_trip_and_abort(actor):
    src = make_cache(21)
    sender = make_sender(CONFIG, src, name="prefill-driver")
    try:
        endpoint = ray.get(actor.endpoint.remote())
        ray.get(actor.expect.remote("r1", [3, 9, 1]))
        stats = sender.send("r1", endpoint, [0, 17, 5]).result(timeout=60)
        assert stats.nbytes == blocks.gather(src, [0, 17, 5]).numel() * 4
        assert ray.get(actor.poll.remote()) == [("r1", None)]
        assert torch.equal(ray.get(actor.blocks.remote([3, 9, 1])), blocks.gather(src, [0, 17, 5]))
        # Aborted on the receiver: delivered, discarded, the blocks stay untouched.
        ray.get(actor.expect.remote("r2", [4]))
        assert ray.get(actor.abort.remote("r2")) is True
        sender.send("r2", endpoint, [2]).result(timeout=60)
        assert ray.get(actor.poll.remote()) == []
        assert ray.get(actor.blocks.remote([4])).count_nonzero() == 0
    finally:
        sender.close()


def test_ray_dead_receiver_fails_the_send(actor):
    endpoint = ray.get(actor.endpoint.remote())
    ray.kill(actor)
    sender = make_sender(CONFIG, make_cache(22), name="prefill-driver")
    try:
        handle = sender.send("r1", endpoint, [0])
        with pytest.raises((PeerClosed, TransferTimeout), match="request r1: .*decode-ray"):
            handle.result(timeout=60)
    finally:
        sender.close()
