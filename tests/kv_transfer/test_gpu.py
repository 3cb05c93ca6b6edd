"""CUDA paths: gather/scatter on GPU, a CUDA cache over the gloo wire, NCCL between GPUs."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.multiprocessing as mp

from kv_transfer import TransferConfig, blocks
from kv_transfer.torch_dist import TorchDistReceiver, TorchDistSender

from .helpers import Completions, make_cache

pytestmark = pytest.mark.gpu
CONFIG = TransferConfig(host="127.0.0.1", timeout_s=30.0, connect_timeout_s=30.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float8_e4m3fn])
def test_cuda_gather_scatter_match_cpu(dtype):
    src, dst = make_cache(1, dtype), make_cache(2, dtype)
    ids, dst_ids = [5, 0, 9, 13], [2, 7, 3, 1]
    gpu_dst = dst.cuda()
    buf = blocks.gather(src.cuda(), ids, slice(1, 3))
    blocks.scatter(gpu_dst, dst_ids, buf, slice(1, 3))
    blocks.scatter(dst, dst_ids, blocks.gather(src, ids, slice(1, 3)), slice(1, 3))
    assert torch.equal(gpu_dst.cpu().view(torch.uint8), dst.view(torch.uint8))


def test_cuda_caches_over_the_gloo_wire():
    config = dataclasses.replace(CONFIG, wire="gloo")
    sender = TorchDistSender(config, make_cache(3, torch.bfloat16, device="cuda"), name="p-cuda")
    receiver = TorchDistReceiver(
        config, make_cache(None, torch.bfloat16, device="cuda"), name="d-cuda"
    )
    try:
        done = Completions()
        receiver.expect("r1", [4, 8, 15], done)
        sender.send("r1", receiver.endpoint(), [16, 23, 0]).result(timeout=30)
        done.wait_for("r1")
        assert done.errors["r1"] is None
        got = blocks.gather(receiver.kv_cache, [4, 8, 15])
        assert torch.equal(got, blocks.gather(sender.kv_cache, [16, 23, 0]))
    finally:
        sender.close()
        receiver.close()


def _nccl_sender(endpoint, results) -> None:
    torch.cuda.set_device(0)
    sender = TorchDistSender(CONFIG, make_cache(4, torch.bfloat16, device="cuda:0"), name="p-nccl")
    handle = sender.send("r1", endpoint, [16, 23, 0])
    handle.wait(60)
    results.put(None if handle.error is None else str(handle.error))
    sender.close()


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="NCCL needs one GPU per rank")
def test_nccl_between_two_gpus():
    torch.cuda.set_device(1)
    receiver = TorchDistReceiver(
        CONFIG, make_cache(None, torch.bfloat16, device="cuda:1"), name="d-nccl"
    )
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    try:
        done = Completions()
        receiver.expect("r1", [4, 8, 15], done)
        child = ctx.Process(target=_nccl_sender, args=(receiver.endpoint(), results))
        child.start()
        assert results.get(timeout=120) is None
        child.join(60)
        done.wait_for("r1", timeout=60)
        assert done.errors["r1"] is None
        src = make_cache(4, torch.bfloat16)
        got = blocks.gather(receiver.kv_cache, [4, 8, 15]).cpu()
        assert torch.equal(got, blocks.gather(src, [16, 23, 0]))
    finally:
        receiver.close()
