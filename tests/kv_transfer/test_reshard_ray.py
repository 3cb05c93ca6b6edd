"""KV resharding on the ray backend: prefill ranks' senders in the driver, each decode rank's
receiver in an actor of its own holding its heads."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import ray  # a core dependency: a broken install fails here, never skips
import torch

from cluster.runtime import start_local_ray
from kv_transfer import LayoutMismatch, TransferConfig, blocks, make_sender
from kv_transfer.reshard import parts_for

from .reshard_cases import DST_IDS, SRC_IDS, Setup

pytestmark = pytest.mark.ray

CONFIG = TransferConfig(backend="ray", timeout_s=20.0)
ROOT = Path(__file__).resolve().parents[2]


class DecodeRank:
    """One decode TP rank: a cache of its heads and a ray receiver reached through it."""

    def __init__(self, config: TransferConfig, like: torch.Tensor, heads) -> None:
        from kv_transfer import make_receiver

        self.kv = torch.zeros_like(like)
        me = ray.get_runtime_context().current_actor
        self.rx = make_receiver(config, self.kv, name=f"decode-{heads}", actor=me,
                                method="receive_kv", heads=heads)

    def receive_kv(self, header: bytes, payload) -> bool:
        return self.rx.deliver(header, payload)

    def endpoint(self):
        return self.rx.endpoint()

    def expect(self, request_id: str, dst_block_ids: list[int], parts) -> None:
        self.rx.expect(request_id, dst_block_ids, parts=parts)

    def poll(self) -> list[tuple[str, str | None]]:
        return [(rid, None if e is None else str(e)) for rid, e in self.rx.poll()]

    def cache(self) -> torch.Tensor:
        return self.kv


@pytest.fixture(scope="module")
def cluster():
    start_local_ray(num_cpus=2, runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}})
    yield
    ray.shutdown()


@pytest.mark.parametrize("case", [(8, 8, 2, 1), (8, 8, 1, 2)], ids=["2to1", "1to2"])
def test_ray_decode_ranks_get_exactly_their_heads(cluster, case):
    setup = Setup(case, seed=11)
    actor = ray.remote(DecodeRank).options(num_cpus=0)
    ranks = [actor.remote(CONFIG, cache, heads)
             for cache, heads in zip(setup.dst_caches, setup.dst_heads, strict=True)]
    senders = [make_sender(CONFIG, cache, name=f"p{r}", heads=heads)
               for r, (cache, heads) in enumerate(zip(setup.src_caches, setup.src_heads,
                                                      strict=True))]
    try:
        endpoints = ray.get([r.endpoint.remote() for r in ranks])
        ray.get([r.expect.remote("r1", DST_IDS, parts_for(setup.routes, i))
                 for i, r in enumerate(ranks)])
        for route in setup.routes:
            senders[route.src_rank].send("r1", endpoints[route.dst_rank], SRC_IDS,
                                         heads=route.heads).result(timeout=60)
        assert all(ray.get(r.poll.remote()) == [("r1", None)] for r in ranks)
        setup.dst_caches[:] = ray.get([r.cache.remote() for r in ranks])
        setup.check_landed()
        # Heads the receiver does not expect as a part: that request fails, with both sides'.
        ray.get(ranks[0].expect.remote("bad", DST_IDS, None))
        lo, hi = setup.dst_heads[0]
        half = (lo, lo + (hi - lo) // 2)
        senders[0].send("bad", endpoints[0], SRC_IDS, heads=half).result(timeout=60)
        [(rid, error)] = ray.get(ranks[0].poll.remote())
        assert rid == "bad" and f"payload KV heads [{half[0]}, {half[1]}) are not a part" in error
        with pytest.raises(LayoutMismatch, match="not held by both"):
            senders[0].send("x", endpoints[0], SRC_IDS, heads=(0, 9)).result(timeout=60)
        # Refused at send (other fp8 scales): the receiver fails the request at once too.
        ray.get(ranks[0].expect.remote("scaled", DST_IDS, None))
        scaled = make_sender(CONFIG, setup.src_caches[0], name="scaled",
                             heads=setup.src_heads[0], kv_scales=(0.5, 1.0))
        senders.append(scaled)
        with pytest.raises(LayoutMismatch, match="must use the same k_scale and v_scale"):
            scaled.send("scaled", endpoints[0], SRC_IDS,
                        heads=setup.routes[0].heads).result(timeout=60)
        deadline = time.monotonic() + 30
        while not (polled := ray.get(ranks[0].poll.remote())) and time.monotonic() < deadline:
            time.sleep(0.05)  # the refusal is a fire-and-forget actor call
        [(rid, error)] = polled
        assert rid == "scaled" and "payload kv scales (k, v) (0.5, 1.0)" in error
        assert torch.equal(blocks.gather(ray.get(ranks[0].cache.remote()), DST_IDS),
                           blocks.gather(setup.dst_caches[0], DST_IDS))  # nothing rewritten
    finally:
        for s in senders:
            s.close()
        for r in ranks:
            ray.kill(r)
