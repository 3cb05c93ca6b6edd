"""A request's KV blocks in the cache: per-block views, and gather/scatter for whole payloads.

Cache layout (one tensor per engine, block-major)::

    kv_cache: [num_blocks, num_layers, 2, block_size, num_kv_heads, head_dim]   (2 = K, V)

indexed so, and laid out in memory either so (contiguous, "token-major": a token's heads
side by side) or, as the engine allocates it (``engine.kv_layout``), head-major: storage
``[num_blocks, num_kv_heads, num_layers, 2, block_size, head_dim]`` (``heads_outer``).
A block holds every layer's K and V in one contiguous run of memory either way, so a block
is one contiguous tensor (``BlockViews``), and so are, token-major, the layers ``[l0, l1)``
of one block, head-major, the heads ``[h0, h1)`` of one block (every layer): the torch_dist
backend sends and receives each straight from and into the caches, with no copy. The object
store backends (ray, loopback) move a whole payload as one buffer: ``gather`` copies a
request's blocks into ``[n, L, 2, block_size, num_kv_heads, head_dim]`` (block ``i`` of the
buffer is physical block ``block_ids[i]``) and ``scatter`` writes such a buffer into (other)
block ids of another cache. One index op each, never a Python loop over blocks. Both take
a slice of the cache's KV heads too (resharding between TP sizes: a payload is the heads one
route carries, ``[n, L, 2, block_size, heads, head_dim]``), which the torch_dist backend uses
to stage a head slice through contiguous buffers.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

BlockIds = Sequence[int] | torch.Tensor

# Index ops run on a same-width integer view: bytes are bytes, and every dtype (fp8 included,
# which some index kernels lack) takes the same kernel.
_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(_BITS[t.element_size()])


# logical [N, L, 2, bs, KVH, D] -> a head-major cache's memory order [N, KVH, L, 2, bs, D]
_HEADS_OUTER = (0, 4, 1, 2, 3, 5)


def heads_outer(kv_cache: torch.Tensor) -> bool:
    """Whether a cache is head-major in memory (see the module docstring)."""
    return kv_cache.dim() == 6 and kv_cache.permute(_HEADS_OUTER).is_contiguous()


def block_index(block_ids: BlockIds, device: torch.device) -> torch.Tensor:
    """Block ids as an ``int64`` tensor ``[n]`` on ``device`` (no copy if already one)."""
    return torch.as_tensor(block_ids, dtype=torch.long, device=device)


def check_ids(kv_cache: torch.Tensor, block_ids: BlockIds) -> torch.Tensor:
    """``block_ids`` as an index on the cache's device; ``ValueError`` unless they are distinct
    and within ``[0, num_blocks)``."""
    idx = block_index(block_ids, kv_cache.device)
    num_blocks = kv_cache.shape[0]
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= num_blocks):
        raise ValueError(f"block ids outside [0, {num_blocks}): {idx.tolist()}")
    if idx.numel() != torch.unique(idx).numel():
        raise ValueError(f"duplicate block ids: {idx.tolist()}")
    return idx


def check_id_list(kv_cache: torch.Tensor, block_ids: BlockIds) -> list[int]:
    """``check_ids`` for the per-block paths, which want Python ints: same checks, no tensor
    round trip (it costs tens of microseconds per request)."""
    ids = block_ids.tolist() if isinstance(block_ids, torch.Tensor) else [int(i) for i in block_ids]
    num_blocks = kv_cache.shape[0]
    if ids and (min(ids) < 0 or max(ids) >= num_blocks):
        raise ValueError(f"block ids outside [0, {num_blocks}): {ids}")
    if len(set(ids)) != len(ids):
        raise ValueError(f"duplicate block ids: {ids}")
    return ids


def contiguous_runs(src_ids: list[int], dst_ids: list[int], max_run: int) -> list[int]:
    """Lengths of the maximal spans (at most ``max_run`` long) over which both id lists
    count up by one: each such span is one contiguous range of memory in both block-major
    caches, so it can move as one message. Sums to ``len(src_ids)``."""
    runs, count = [], 0
    for i in range(len(src_ids)):
        if count and count < max_run and src_ids[i] == src_ids[i - 1] + 1 \
                and dst_ids[i] == dst_ids[i - 1] + 1:
            count += 1
        else:
            if count:
                runs.append(count)
            count = 1
    if count:
        runs.append(count)
    return runs


class BlockViews:
    """One block (token-major: its layers ``[l0, l1)``; head-major: its KV heads
    ``[h0, h1)``, every layer) as a flat ``uint8`` view into the cache, contiguous: what the
    torch_dist wire sends and receives into. One index op per call on a flat byte view made
    once (a view per message is on the transfer's critical path, once per block)."""

    def __init__(self, kv_cache: torch.Tensor) -> None:
        self.num_layers, self.num_heads = kv_cache.shape[1], kv_cache.shape[4]
        self.heads_outer = heads_outer(kv_cache)
        memory = kv_cache.permute(_HEADS_OUTER) if self.heads_outer else kv_cache
        self._flat = memory.view(torch.uint8).view(kv_cache.shape[0], -1)
        self._layer_nbytes = self._flat.shape[1] // self.num_layers
        self._head_nbytes = self._flat.shape[1] // self.num_heads
        self._bytes = self._flat.view(-1)  # a 1-D slice is the cheapest view to make

    def __call__(self, block_id: int, layers: tuple[int, int], count: int = 1,
                 heads: tuple[int, int] | None = None) -> torch.Tensor:
        """Blocks ``[block_id, block_id + count)`` (more than one only for every layer and
        head: only then are they one contiguous range); ``heads``: a range of this cache's
        heads (indices into it), every layer, of a head-major cache."""
        l0, l1 = layers
        every_layer = l0 == 0 and l1 == self.num_layers
        if heads is not None and tuple(heads) != (0, self.num_heads):
            if not (self.heads_outer and every_layer and count == 1):
                raise ValueError("a head slice is contiguous only in one block of a head-major "
                                 "cache, every layer")
            start = block_id * self._flat.shape[1] + heads[0] * self._head_nbytes
            return self._bytes[start : start + (heads[1] - heads[0]) * self._head_nbytes]
        if every_layer:
            if count == 1:
                return self._flat[block_id]
            return self._flat[block_id : block_id + count].view(-1)
        if count != 1 or self.heads_outer:
            raise ValueError("a layer range is contiguous only in one block of a token-major "
                             "cache")
        return self._flat[block_id, l0 * self._layer_nbytes : l1 * self._layer_nbytes]


def gather_shape(kv_cache: torch.Tensor, num_blocks: int, layers: slice,
                 heads: slice = slice(None)) -> tuple[int, ...]:
    """Shape of ``gather``'s result: ``[n, L, 2, block_size, heads, head_dim]``."""
    num_layers = len(range(*layers.indices(kv_cache.shape[1])))
    num_heads = len(range(*heads.indices(kv_cache.shape[4])))
    return (num_blocks, num_layers, 2, kv_cache.shape[3], num_heads, kv_cache.shape[5])


def gather(
    kv_cache: torch.Tensor,
    block_ids: BlockIds,
    layers: slice = slice(None),
    out: torch.Tensor | None = None,
    heads: slice = slice(None),
) -> torch.Tensor:
    """Copy blocks ``block_ids`` of layers ``layers`` and KV heads ``heads`` (indices into
    this cache) into one contiguous buffer.

    Returns ``[n, L, 2, block_size, heads, head_dim]`` (``out`` if given: it must have that
    shape, the cache's dtype and device, and be contiguous).
    """
    idx = block_index(block_ids, kv_cache.device)
    if out is None:
        out = torch.empty(
            gather_shape(kv_cache, idx.numel(), layers, heads),
            dtype=kv_cache.dtype,
            device=kv_cache.device,
        )
    torch.index_select(_bits(kv_cache[:, layers, :, :, heads]), 0, idx, out=_bits(out))
    return out


def scatter(
    kv_cache: torch.Tensor,
    block_ids: BlockIds,
    buffer: torch.Tensor,
    layers: slice = slice(None),
    heads: slice = slice(None),
) -> None:
    """Write ``buffer`` ``[n, L, 2, block_size, heads, head_dim]`` into blocks ``block_ids``
    of layers ``layers`` and KV heads ``heads`` (indices into this cache).

    ``buffer`` may live on another device (a CPU staging buffer for a GPU cache); it is moved
    first. ``block_ids`` must be distinct (a request never holds a block twice).
    """
    idx = block_index(block_ids, kv_cache.device)
    expected = gather_shape(kv_cache, idx.numel(), layers, heads)
    if tuple(buffer.shape) != expected:
        raise ValueError(f"scatter: buffer shape {tuple(buffer.shape)} != expected {expected}")
    if buffer.device != kv_cache.device:
        buffer = buffer.to(kv_cache.device)  # blocking: the caller may reuse buffer at once
    if kv_cache.device.type == "cpu" and heads_outer(kv_cache):
        _scatter_cpu_heads_outer(kv_cache, idx, buffer, layers, heads)
    elif kv_cache.device.type == "cpu" and kv_cache.is_contiguous():
        _scatter_cpu(kv_cache, idx, buffer, layers, heads)
    else:
        _bits(kv_cache[:, layers, :, :, heads]).index_copy_(0, idx, _bits(buffer))


def _scatter_cpu_heads_outer(kv_cache: torch.Tensor, idx: torch.Tensor, buffer: torch.Tensor,
                             layers: slice, heads: slice) -> None:
    """``_scatter_cpu`` for a head-major cache: numpy writes the buffer, read through a
    transposed view (no copy), into the (block, head) rows of the cache's memory. 16 MiB of
    whole bf16 blocks: 1.4 ms, against 1.2 ms token-major and 7.8 ms for ``index_copy_`` on
    the strided view (dev VM)."""
    memory = _bits(kv_cache.permute(_HEADS_OUTER)).numpy()  # [N, KVH, L, 2, bs, D]
    src = np.transpose(_bits(buffer).numpy(), _HEADS_OUTER)  # [n, heads, L', 2, bs, D]
    head_ids = np.arange(memory.shape[1])[heads]
    memory[idx.numpy()[:, None], head_ids[None, :], layers] = src


def _scatter_cpu(kv_cache: torch.Tensor, idx: torch.Tensor, buffer: torch.Tensor,
                 layers: slice, heads: slice) -> None:
    """``kv_cache[idx, layers, :, :, heads] = buffer`` through numpy byte views: numpy
    copies each block (each head slice of a token) as contiguous rows (memcpy speed);
    torch's CPU ``index_copy_`` goes element by element and took about twice as long on a
    32 MiB bf16 layer (torch 2.13, dev VM). The cache is contiguous, so the reshape below
    is a view and the write lands in the cache."""
    n, num_layers, _, block_size, num_heads, head_dim = kv_cache.shape
    if heads == slice(None):  # whole blocks' layers: the longest contiguous rows
        rows = kv_cache.view(torch.uint8).numpy().reshape(n, num_layers, -1)  # [N, L, bytes]
        src = buffer.contiguous().view(torch.uint8).numpy().reshape(*buffer.shape[:2], -1)
        rows[idx.numpy(), layers] = src
        return
    # [N, L, 2 * block_size, heads, head bytes]: a token's head slice is one row
    rows = kv_cache.view(torch.uint8).numpy().reshape(n, num_layers, 2 * block_size,
                                                      num_heads, -1)
    src = buffer.contiguous().view(torch.uint8).numpy().reshape(
        *buffer.shape[:2], 2 * block_size, buffer.shape[4], -1)
    rows[idx.numpy(), layers, :, heads] = src
