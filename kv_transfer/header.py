"""The message header that precedes each payload on a pair channel.

Wire format: a fixed-size ``uint8`` tensor of ``HEADER_BYTES`` bytes, so the receiver always
posts the same receive. Little-endian::

    offset  size  field
    0       4     magic b"KVH6"
    4       1     kind (1 = DATA, 2 = CLOSE, 3 = ANNOUNCE, 4 = RETRACT, 5 = REFUSE)
    5       1     dtype code (index into DTYPES)
    6       2     layer_start
    8       2     layer_end (exclusive)
    10      2     num_runs (0: one message per block)
    12      4     num_blocks
    16      4     block_size
    20      4     num_kv_heads of the payload (the width of its head range)
    24      4     head_dim
    28      4     tag of the payload messages (1 = DATA_TAG: unannounced)
    32      1     flags (1 = STAGED, 2 = GATHERED, 4 = SLICED, 8 = HEADS_OUTER)
    33      1     zero
    34      2     head_start: the payload's first KV head, a global index
    36      8     k_scale (float64; fp8 caches store x / scale)
    44      8     v_scale (float64)
    52      2     len(request_id utf-8)
    54      ...   request_id utf-8 bytes
    ...     2*r   num_runs uint16 run lengths, then zero padding to HEADER_BYTES

A run is a span of the request's blocks that is contiguous in both caches, so it moves as
one message (``blocks.contiguous_runs``); without runs every block is its own message.

Head ranges (KV resharding between TP sizes, see ``reshard``): a payload carries the heads
``[head_start, head_start + num_kv_heads)`` of each block, laid out as a cache of that many
heads (``[n, L, 2, block_size, heads, D]``). When they are all the heads of both caches the
messages move straight between the caches as above. Otherwise the sender gathers them into
contiguous buffers, a few blocks a message; when they are all the receiver holds, it still
receives straight into its blocks (runs contiguous in its reserved blocks), else the payload
is STAGED: the receiver takes each message into a staging buffer and scatters it into its
blocks' head slice, and a run need not be contiguous anywhere. Staged and gathered messages
are in the logical order above, whatever the caches' memory layout.

Between two head-major caches (``blocks.heads_outer``: the engine's), any head range of a
block is contiguous in memory, so a head slice is SLICED instead: one message per block,
the route's heads of every layer in the caches' memory order (``[heads, L, 2, block_size,
D]``), sent straight from the sender's cache into the receiver's, no copy on either side.
HEADS_OUTER says a payload's bytes are head-major (straight from a head-major cache): the
receiver's cache must then be head-major too; staged payloads never are (a sender whose
cache differs from the receiver's gathers and stages in logical order instead).

Announced payloads (see ``channels``): ANNOUNCE tells the receiver, before the KV exists,
which messages will come on a tag of their own, so it posts their receives into the reserved
blocks ahead; the DATA header of that payload carries the same tag and runs. RETRACT
withdraws an announcement: one 1-byte message per announced message follows on its tag,
completing the receives posted for it (gloo cannot cancel a posted receive).
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass

import torch

from kv_transfer.errors import LayoutMismatch, TransferError

HEADER_BYTES = 512
_MAGIC = b"KVH6"  # 6: head-major caches; 5: head ranges, kv scales; 4: announced payloads
_FIXED = struct.Struct("<4sBBHHHIIIIIBxHddH")
MAX_REQUEST_ID_BYTES = HEADER_BYTES - _FIXED.size
MAX_RUN_BLOCKS = 2**16 - 1  # a run length is a uint16
# A run message's bytes are capped: a payload nobody expects any more (aborted) is drained
# into staging slots as large as its largest message, so an uncapped run of a long prompt
# would need a staging buffer of its whole size. Runs this large already move at the raw
# rate (2 MiB messages did on the 2-core VM).
MAX_RUN_BYTES = 16 << 20


class RequestIdTooLong(TransferError):
    """The request id does not fit in a header (``MAX_REQUEST_ID_BYTES`` of UTF-8). Raised
    before the send is queued, so only that request fails: the channel and the other requests
    on it are untouched. The router bounds client ids far below this; the check keeps
    unbounded client data off the wire whoever calls."""

    def __init__(self, request_id: str | None, peer: str, what: str = "") -> None:
        size = len((request_id or "").encode())
        what = what or (f"a request id of {size} bytes does not fit in a transfer header "
                        f"(at most {MAX_REQUEST_ID_BYTES}); use a shorter request id")
        super().__init__(request_id, peer, what)
        shown = (request_id or "")[:40] + ("…" if size > 40 else "")
        self.args = (f"request {shown}: KV transfer with {peer} failed: {what}",)


def check_request_id(request_id: str, peer: str) -> None:
    """Raise ``RequestIdTooLong`` unless ``request_id`` fits in a header."""
    if len(request_id.encode()) > MAX_REQUEST_ID_BYTES:
        raise RequestIdTooLong(request_id, peer)


def run_window(inflight_messages: int, runs: tuple[int, ...]) -> int:
    """Messages to keep in flight for a payload of ``runs``: ``inflight_messages`` blocks'
    worth (at least one message), so that staging for a drained or host-staged payload stays
    ``inflight_messages`` blocks (or one run) large, whatever the runs."""
    return max(1, inflight_messages // max(runs, default=1))


def max_runs(request_id: str) -> int:
    """How many run lengths fit in a header beside ``request_id``."""
    return (HEADER_BYTES - _FIXED.size - len(request_id.encode())) // 2

DATA = 1  # a request's KV payload follows
CLOSE = 2  # the sender closes the channel; no payload follows
ANNOUNCE = 3  # a payload will follow on ``tag`` (receives may be posted now); nothing follows
RETRACT = 4  # an announcement is withdrawn: one 1-byte message per announced message follows
# The sender refused to send a request (its cache does not match the receiver's): the
# header describes the sender's side (dtype, scales, heads) so that the receiver fails the
# request at once with what differs, instead of waiting for KV that never comes. Nothing
# follows.
REFUSE = 5
KINDS = (DATA, CLOSE, ANNOUNCE, RETRACT, REFUSE)
DATA_TAG = 1  # tag of unannounced payload messages (announced ones: their own tag, above it)
STAGED = 1  # flag: the receiver takes each message into staging and scatters it (see above)
GATHERED = 2  # flag: the sender gathers each message into staging (its runs, not the cache's)
SLICED = 4  # flag: one message per block, a head slice between head-major caches (see above)
HEADS_OUTER = 8  # flag: the payload's bytes are in head-major memory order (see above)

DTYPES: tuple[torch.dtype, ...] = (
    torch.float32,
    torch.float16,
    torch.bfloat16,
    torch.float64,
    torch.uint8,
    torch.int8,
    torch.float8_e4m3fn,
    torch.float8_e5m2,
)


@dataclass(frozen=True)
class TransferHeader:
    """What the receiver needs to receive, check and scatter one payload."""

    kind: int  # DATA or CLOSE
    request_id: str = ""  # the request whose KV follows ("" for CLOSE)
    num_blocks: int = 0  # n: number of blocks in the payload (same count on both sides)
    layer_start: int = 0  # first layer carried
    layer_end: int = 0  # one past the last layer carried
    dtype: torch.dtype = torch.float32  # element type of the payload
    block_shape: tuple[int, int, int] = (0, 0, 0)  # (block_size, num_kv_heads, head_dim)
    runs: tuple[int, ...] = ()  # blocks per message, summing to num_blocks; () = 1 each
    tag: int = DATA_TAG  # tag of the payload's messages: DATA_TAG, or an announcement's
    head_start: int = 0  # global index of the payload's first KV head
    kv_scales: tuple[float, float] = (1.0, 1.0)  # (k_scale, v_scale) of the sender's cache
    flags: int = 0  # STAGED | GATHERED, SLICED, and HEADS_OUTER, or 0

    @classmethod
    def for_blocks(cls, request_id: str, kv_cache: torch.Tensor, num_blocks: int,
                   layers: tuple[int, int] | None, peer: str, runs: tuple[int, ...] = (),
                   heads: tuple[int, int] | None = None,
                   kv_scales: tuple[float, float] = (1.0, 1.0), flags: int = 0,
                   ) -> TransferHeader:
        """The DATA header of a send of ``num_blocks`` blocks, layers ``[l0, l1)`` (default
        all) of the block-major ``kv_cache``, KV heads ``heads`` (global indices; default
        all the cache's, from 0), as messages of ``runs`` blocks each (default one per
        block). Raises ``LayoutMismatch`` for a layer range outside the cache and
        ``RequestIdTooLong`` for an id that does not fit."""
        check_request_id(request_id, peer)
        num_layers = kv_cache.shape[1]
        l0, l1 = layers if layers is not None else (0, num_layers)
        if not 0 <= l0 < l1 <= num_layers:
            raise LayoutMismatch(request_id, peer, f"bad layer range [{l0}, {l1})")
        h0, h1 = heads if heads is not None else (0, kv_cache.shape[4])
        block_size, head_dim = kv_cache.shape[3], kv_cache.shape[5]
        return cls(DATA, request_id, num_blocks, l0, l1, kv_cache.dtype,
                   (block_size, h1 - h0, head_dim), runs, head_start=h0,
                   kv_scales=(float(kv_scales[0]), float(kv_scales[1])), flags=flags)

    @property
    def heads(self) -> tuple[int, int]:
        """The payload's KV heads ``[first, last + 1)``, global indices."""
        return self.head_start, self.head_start + self.block_shape[1]

    @property
    def staged(self) -> bool:
        return bool(self.flags & STAGED)

    @property
    def gathered(self) -> bool:
        return bool(self.flags & GATHERED)

    @property
    def sliced(self) -> bool:
        return bool(self.flags & SLICED)

    @property
    def heads_outer(self) -> bool:
        return bool(self.flags & HEADS_OUTER)

    def largest_message_nbytes(self) -> int:
        """Bytes of the payload's largest message (what a staging slot must hold)."""
        return max(self.runs, default=1) * self.block_nbytes()

    def messages(self) -> list[tuple[int, int]]:
        """The payload's messages in wire order: ``(first block index, block count)``."""
        if not self.runs:
            return [(i, 1) for i in range(self.num_blocks)]
        out, start = [], 0
        for count in self.runs:
            out.append((start, count))
            start += count
        return out

    @property
    def num_layers(self) -> int:
        return self.layer_end - self.layer_start

    def block_payload_shape(self) -> tuple[int, ...]:
        """Shape of one block's message: ``[num_layers, 2, block_size, num_kv_heads, D]``."""
        return (self.num_layers, 2, *self.block_shape)

    def block_nbytes(self) -> int:
        return math.prod(self.block_payload_shape()) * self.dtype.itemsize

    def payload_shape(self) -> tuple[int, ...]:
        """Shape of the whole payload: ``[num_blocks, num_layers, 2, block_size, kvh, D]``."""
        return (self.num_blocks, *self.block_payload_shape())

    def encode(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """The header as a ``uint8`` tensor ``[HEADER_BYTES]`` on ``device``."""
        rid = self.request_id.encode()
        if len(rid) > MAX_REQUEST_ID_BYTES:  # for_blocks refuses these per request first
            raise ValueError(f"request id longer than {MAX_REQUEST_ID_BYTES} bytes: {rid[:40]!r}…")
        if len(self.runs) > max_runs(self.request_id):
            raise ValueError(f"{len(self.runs)} runs do not fit in a header")
        if self.runs and sum(self.runs) != self.num_blocks:
            raise ValueError(f"runs {self.runs} do not add up to {self.num_blocks} blocks")
        fixed = _FIXED.pack(
            _MAGIC,
            self.kind,
            DTYPES.index(self.dtype),
            self.layer_start,
            self.layer_end,
            len(self.runs),
            self.num_blocks,
            *self.block_shape,
            self.tag,
            self.flags,
            self.head_start,
            *self.kv_scales,
            len(rid),
        )
        body = fixed + rid + struct.pack(f"<{len(self.runs)}H", *self.runs)
        raw = bytearray(HEADER_BYTES)
        raw[: len(body)] = body
        return torch.frombuffer(raw, dtype=torch.uint8).to(device)

    @classmethod
    def decode(cls, buf: torch.Tensor) -> TransferHeader:
        """Parse a ``uint8`` tensor ``[HEADER_BYTES]``; raises ``ValueError`` if it is not one."""
        raw = buf.cpu().numpy().tobytes()
        (magic, kind, dt, l0, l1, num_runs, n, bs, kvh, hd, tag, flags, h0, k_scale, v_scale,
         rid_len) = _FIXED.unpack_from(raw)
        runs_at = _FIXED.size + rid_len
        if (magic != _MAGIC or kind not in KINDS or dt >= len(DTYPES)
                or runs_at + 2 * num_runs > HEADER_BYTES):
            raise ValueError(f"not a KV transfer header (starts {raw[:8]!r})")
        rid = raw[_FIXED.size : runs_at].decode()
        runs = struct.unpack_from(f"<{num_runs}H", raw, runs_at)
        if runs and (sum(runs) != n or min(runs) == 0):
            raise ValueError(f"KV transfer header with bad runs for {n} blocks: {runs}")
        return cls(kind, rid, n, l0, l1, DTYPES[dt], (bs, kvh, hd), runs, tag, h0,
                   (k_scale, v_scale), flags)


def empty_header(device: torch.device | str = "cpu") -> torch.Tensor:
    """A receive buffer for one header: ``uint8 [HEADER_BYTES]``."""
    return torch.empty(HEADER_BYTES, dtype=torch.uint8, device=device)
