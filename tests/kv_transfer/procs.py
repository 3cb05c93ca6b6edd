"""Child-process bodies for the two-process torch_dist tests (importable by spawn)."""

from __future__ import annotations

import os

import torch

from kv_transfer import TransferConfig
from kv_transfer.header import DATA, DATA_TAG, TransferHeader
from kv_transfer.torch_dist import PairGroup, TorchDistReceiver, TorchDistSender

from .helpers import LAYERS, make_cache


def sender_main(endpoint, config: TransferConfig, seed: int, sends, results) -> None:
    """Send ``sends`` [(request id, src block ids)] back to back; report each outcome."""
    sender = TorchDistSender(config, make_cache(seed), name="child-prefill")
    handles = [sender.send(rid, endpoint, ids) for rid, ids in sends]
    outcomes = []
    for h in handles:
        finished = h.wait(timeout=30)
        outcomes.append((h.request_id, finished, None if h.error is None else str(h.error)))
    sender.close()
    results.put(outcomes)


def dying_sender_main(endpoint, config: TransferConfig, request_id: str, num_blocks: int) -> None:
    """Send a header and the first of ``num_blocks`` block messages, then die without closing."""
    group = PairGroup.connect(endpoint, config, "dying-prefill", "gloo", torch.device("cpu"))
    kv = make_cache(None)
    header = TransferHeader(
        DATA, request_id, num_blocks, 0, LAYERS, kv.dtype, tuple(kv.shape[3:])
    )
    group.wait(group.send_ctrl(header.encode()), 10, "header")
    block = torch.zeros(header.block_nbytes(), dtype=torch.uint8)
    group.wait(group.send(block, DATA_TAG), 10, "block 0")
    os._exit(3)  # like a crash or SIGKILL: the OS closes the sockets mid-stream


def receiver_main(config: TransferConfig, shape: tuple[int, ...], conn) -> None:
    """A receiver whose cache is zeros of ``shape``; ``("expect", request id, block ids)``
    over ``conn`` expects a request, each outcome comes back as ``("done", id, error)``;
    ``("blocks", ids)`` returns those blocks."""
    receiver = TorchDistReceiver(config, torch.zeros(shape), name="child-decode")

    def done(request_id: str, error) -> None:
        conn.send(("done", request_id, None if error is None else str(error)))

    conn.send(("endpoint", receiver.endpoint(), os.getpid()))
    while (msg := conn.recv())[0] != "stop":
        if msg[0] == "expect":
            receiver.expect(msg[1], msg[2], done)
            conn.send(("expected", msg[1]))
        else:  # ("blocks", ids)
            conn.send(("blocks", receiver.kv_cache[msg[1]].clone()))
    receiver.close()
