"""The message header that precedes each payload on a pair channel.

Wire format: a fixed-size ``uint8`` tensor of ``HEADER_BYTES`` bytes, so the receiver always
posts the same receive. Little-endian::

    offset  size  field
    0       4     magic b"KVH1"
    4       1     kind (1 = DATA, 2 = CLOSE)
    5       1     dtype code (index into DTYPES)
    6       2     layer_start
    8       2     layer_end (exclusive)
    10      2     reserved (0)
    12      4     num_blocks
    16      4     block_size
    20      4     num_kv_heads
    24      4     head_dim
    28      2     len(request_id utf-8)
    30      ...   request_id utf-8 bytes, zero padded to HEADER_BYTES
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass

import torch

from kv_transfer.errors import LayoutMismatch

HEADER_BYTES = 512
_MAGIC = b"KVH2"  # 2: block-major payload, one message per block
_FIXED = struct.Struct("<4sBBHHHIIIIH")
MAX_REQUEST_ID_BYTES = HEADER_BYTES - _FIXED.size

DATA = 1  # a request's KV payload follows
CLOSE = 2  # the sender closes the channel; no payload follows

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

    @classmethod
    def for_blocks(cls, request_id: str, kv_cache: torch.Tensor, num_blocks: int,
                   layers: tuple[int, int] | None, peer: str) -> TransferHeader:
        """The DATA header of a send of ``num_blocks`` blocks, layers ``[l0, l1)`` (default
        all) of the block-major ``kv_cache``. Raises ``LayoutMismatch`` for a layer range
        outside the cache."""
        num_layers = kv_cache.shape[1]
        l0, l1 = layers if layers is not None else (0, num_layers)
        if not 0 <= l0 < l1 <= num_layers:
            raise LayoutMismatch(request_id, peer, f"bad layer range [{l0}, {l1})")
        return cls(DATA, request_id, num_blocks, l0, l1, kv_cache.dtype,
                   tuple(kv_cache.shape[3:]))

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
        if len(rid) > MAX_REQUEST_ID_BYTES:
            raise ValueError(f"request id longer than {MAX_REQUEST_ID_BYTES} bytes: {rid[:40]!r}…")
        fixed = _FIXED.pack(
            _MAGIC,
            self.kind,
            DTYPES.index(self.dtype),
            self.layer_start,
            self.layer_end,
            0,
            self.num_blocks,
            *self.block_shape,
            len(rid),
        )
        raw = bytearray(HEADER_BYTES)
        raw[: _FIXED.size + len(rid)] = fixed + rid
        return torch.frombuffer(raw, dtype=torch.uint8).to(device)

    @classmethod
    def decode(cls, buf: torch.Tensor) -> TransferHeader:
        """Parse a ``uint8`` tensor ``[HEADER_BYTES]``; raises ``ValueError`` if it is not one."""
        raw = buf.cpu().numpy().tobytes()
        magic, kind, dt, l0, l1, _reserved, n, bs, kvh, hd, rid_len = _FIXED.unpack_from(raw)
        if magic != _MAGIC or kind not in (DATA, CLOSE) or dt >= len(DTYPES):
            raise ValueError(f"not a KV transfer header (starts {raw[:8]!r})")
        rid = raw[_FIXED.size : _FIXED.size + rid_len].decode()
        return cls(kind, rid, n, l0, l1, DTYPES[dt], (bs, kvh, hd))


def empty_header(device: torch.device | str = "cpu") -> torch.Tensor:
    """A receive buffer for one header: ``uint8 [HEADER_BYTES]``."""
    return torch.empty(HEADER_BYTES, dtype=torch.uint8, device=device)
