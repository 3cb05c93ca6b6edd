"""The torch.distributed backend: one stateless two-rank process group per (sender, receiver).

The only module of splitserve that touches torch.distributed (and NCCL). torch.distributed
cannot add ranks to a running world and pools grow and shrink, so no global
``init_process_group`` is used: every pair builds its own group from the receiver's TCPStore.

Handshake (keys in the receiver's TCPStore; the receiver hosts it on a free port and
advertises ``host:port`` in its ``Endpoint``)::

    sender                                   receiver (accept thread, in pair order)
    n = add("kv/pairs", 1)
    set("kv/pair/<n>", {sender, wire})  ──▶  wait(["kv/pair/<n>"]) → start channel thread n
    wait(["kv/pair/<n>/ack"])           ◀──  set("kv/pair/<n>/ack")
    group(PrefixStore("kv/pair/<n>/"), rank 0)  group(PrefixStore("kv/pair/<n>/"), rank 1)

Groups: ``ctrl`` is always gloo (headers: a CPU wait, no GPU kernel spinning while a channel
is idle); ``data`` carries payloads and is the same gloo group, or an NCCL group when both
caches are CUDA tensors. The receiver closes its store by writing a close marker as the next
pair, which ends its accept thread without polling.

Timeouts: every header/payload wait after the first header byte is bounded by
``config.timeout_s``; an idle receiver waits for the next header up to the group's default
timeout (``idle_timeout_s + timeout_s``), longer than a sender keeps an idle channel open.

Modules: ``wire`` (the pair group and the handshake), ``store`` (the receiver's TCPStore and
accept thread), ``send_channel`` / ``recv_channel`` (one thread per pair and direction),
``announcements`` (receives posted before the KV exists), ``sender`` / ``receiver`` (the
KVSender / KVReceiver of this backend).
"""

from kv_transfer.torch_dist.receiver import TorchDistReceiver
from kv_transfer.torch_dist.sender import TorchDistSender
from kv_transfer.torch_dist.store import StoreServer
from kv_transfer.torch_dist.wire import PairGroup, choose_wire, tcp_store

__all__ = ["PairGroup", "StoreServer", "TorchDistReceiver", "TorchDistSender", "choose_wire",
           "tcp_store"]
