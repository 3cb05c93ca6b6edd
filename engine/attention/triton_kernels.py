"""Triton paged-attention kernels: KV write, split-K decode (+ reduction), varlen prefill.

Imported only by ``triton_backend`` (``triton`` is an optional dependency). With
``TRITON_INTERPRET=1`` in the environment *before this module is imported* (``@triton.jit``
reads it when it decorates), the same kernels run on CPU tensors in Triton's interpreter:
that is how the CPU test suite checks their logic.

Layouts (one layer's view of the block-major cache; the last dim is contiguous)::

    key_cache / value_cache  [num_blocks, block_size, KVH, D]   strides (sb, ss, sh, 1)
    token at position p of sequence i  ->  block_tables[i, p // block_size], row p % block_size

Key tiles are BLOCK_N consecutive positions; each row looks up its own physical block, so a
tile may span several blocks (block_size < BLOCK_N) or part of one (block_size > BLOCK_N):
any block size works. GQA: one program holds the G = H / KVH query heads of one KV head, so
each K/V row is loaded once for all of them. Softmax runs online in base 2 (``exp2``) with
fp32 accumulators; fp32 inputs use IEEE dots (no TF32), so fp32 results match the torch
reference to rounding.

An fp8 cache stores ``x / scale`` (per-tensor scales, see ``kv_quant``), saturated and
rounded to nearest-even exactly as ``kv_quant.quantize`` does; loads multiply back.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634
# fp8 formats: mantissa bits, smallest normal exponent, largest finite value
FP8_GRID = {torch.float8_e4m3fn: {"MANT": 3, "EMIN": -6, "LIMIT": 448.0},
            torch.float8_e5m2: {"MANT": 2, "EMIN": -14, "LIMIT": 57344.0}}


@triton.jit
def _round_to_fp8_grid(x, MANT: tl.constexpr, EMIN: tl.constexpr, LIMIT: tl.constexpr):
    """fp32 x saturated to +-LIMIT and rounded to nearest-even on the grid of an fp8 format
    with MANT mantissa bits and smallest normal exponent EMIN, still in fp32: the cast to fp8
    after it is exact. (Triton's interpreter rounds fp8 casts wrongly when rounding carries
    into the exponent; this way every platform stores the same bytes as torch.)"""
    negative = x.to(tl.int32, bitcast=True) < 0  # the sign bit (-0.0 included)
    x = tl.minimum(tl.abs(x), LIMIT)
    exponent = tl.maximum(((x.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127, EMIN)
    ulp = ((exponent - MANT + 127) << 23).to(tl.float32, bitcast=True)  # a power of two
    steps = x / ulp  # exact; steps < 2^(MANT + 1)
    x = ((steps + 12582912.0) - 12582912.0) * ulp  # + 1.5 * 2^23: rint, ties to even
    return tl.where(negative, -x, x)


@triton.jit
def _write_kv_kernel(
    key_ptr, value_ptr,  # [T, KVH, D]
    kc_ptr, vc_ptr,  # [num_blocks, block_size, KVH, D] strided views
    slot_ptr,  # [T] int64 flat slots (block * block_size + offset); < 0: skip
    k_scale, v_scale,  # fp8 caches store x / scale
    stride_kt, stride_kh, stride_vt, stride_vh,
    stride_cb, stride_cs, stride_ch, stride_vcb, stride_vcs, stride_vch,
    KVH, D,
    BLOCK_SIZE: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
    QUANT: tl.constexpr, MANT: tl.constexpr, EMIN: tl.constexpr, LIMIT: tl.constexpr,
):
    t = tl.program_id(0)  # one new token, all its KV heads
    slot = tl.load(slot_ptr + t)
    blk = slot // BLOCK_SIZE
    off = slot % BLOCK_SIZE
    h = tl.arange(0, BLOCK_H)[:, None]
    d = tl.arange(0, BLOCK_D)[None, :]
    # (a scalar condition folded into a bound: the interpreter rejects scalar & block masks)
    mask = (h < tl.where(slot >= 0, KVH, 0)) & (d < D)
    k = tl.load(key_ptr + t * stride_kt + h * stride_kh + d, mask=mask, other=0.0)
    v = tl.load(value_ptr + t * stride_vt + h * stride_vh + d, mask=mask, other=0.0)
    if QUANT:
        k = _round_to_fp8_grid(k.to(tl.float32) / k_scale, MANT, EMIN, LIMIT)
        v = _round_to_fp8_grid(v.to(tl.float32) / v_scale, MANT, EMIN, LIMIT)
    tl.store(kc_ptr + blk * stride_cb + off * stride_cs + h * stride_ch + d,
             k.to(kc_ptr.dtype.element_ty), mask=mask)
    tl.store(vc_ptr + blk * stride_vcb + off * stride_vcs + h * stride_vch + d,
             v.to(vc_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _dot(a, b, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """a @ b accumulated in fp32. UPCAST: in fp32 (Triton's interpreter multiplies bf16
    operands wrongly, so interpreted bf16 runs its dots on the same values in fp32)."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b, input_precision=DOT_PRECISION)


@triton.jit
def _load_kv_tile(cache_ptr, bt_row_ptr, pos, valid, kvh, d, dmask, scale,
                  stride_b, stride_s, stride_h, BLOCK_SIZE: tl.constexpr,
                  QUANT: tl.constexpr, OUT_DTYPE: tl.constexpr):
    """Rows ``pos`` ([BLOCK_N] positions) of one KV head through the block table:
    [BLOCK_N, BLOCK_D] in OUT_DTYPE (dequantised when the cache is fp8)."""
    blk = tl.load(bt_row_ptr + pos // BLOCK_SIZE, mask=valid, other=0).to(tl.int64)
    ptrs = (cache_ptr + blk[:, None] * stride_b + (pos % BLOCK_SIZE)[:, None] * stride_s
            + kvh * stride_h + d[None, :])
    x = tl.load(ptrs, mask=valid[:, None] & dmask[None, :], other=0.0)
    if QUANT:
        x = (x.to(tl.float32) * scale).to(OUT_DTYPE)
    return x


@triton.jit
def _decode_kernel(
    q_ptr, kc_ptr, vc_ptr, bt_ptr, seq_lens_ptr,
    out_ptr, part_out_ptr, part_lse_ptr,  # out [nd, H, D]; partials [nd, H, S, D], [nd, H, S]
    qk_scale, k_scale, v_scale,  # qk_scale = softmax scale * log2(e)
    stride_qt, stride_qh, stride_ot, stride_oh,
    stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh, stride_bt,
    G, D,
    BLOCK_SIZE: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr, TILES_PER_SPLIT: tl.constexpr, NUM_SPLITS: tl.constexpr,
    QUANT: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    """grid (num_decodes, KVH, NUM_SPLITS): one query token's G heads against the context
    positions [split * TILES_PER_SPLIT * BLOCK_N, ...) of its sequence."""
    seq = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + seq)
    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, BLOCK_D)
    gmask, dmask = g < G, d < D
    heads = kvh * G + g
    q = tl.load(q_ptr + seq * stride_qt + heads[:, None] * stride_qh + d[None, :],
                mask=gmask[:, None] & dmask[None, :], other=0.0)  # [BLOCK_G, BLOCK_D]
    bt_row = bt_ptr + seq.to(tl.int64) * stride_bt
    start = split * (TILES_PER_SPLIT * BLOCK_N)
    end = tl.minimum(start + TILES_PER_SPLIT * BLOCK_N, seq_len)
    m = tl.full([BLOCK_G], -1e30, tl.float32)  # finite: a split past the end stays NaN-free
    den = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    for n0 in range(start, end, BLOCK_N):
        pos = n0 + tl.arange(0, BLOCK_N)
        valid = pos < end
        k = _load_kv_tile(kc_ptr, bt_row, pos, valid, kvh, d, dmask, k_scale, stride_kb,
                          stride_ks, stride_kh, BLOCK_SIZE, QUANT, q_ptr.dtype.element_ty)
        s = _dot(q, tl.trans(k), DOT_PRECISION, UPCAST) * qk_scale  # [G, N]
        s = tl.where(valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))
        alpha = tl.exp2(m - m_new)
        p = tl.exp2(s - m_new[:, None])
        den = den * alpha + tl.sum(p, 1)
        v = _load_kv_tile(vc_ptr, bt_row, pos, valid, kvh, d, dmask, v_scale, stride_vb,
                          stride_vs, stride_vh, BLOCK_SIZE, QUANT, q_ptr.dtype.element_ty)
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, DOT_PRECISION, UPCAST)
        m = m_new
    safe_den = tl.where(den > 0, den, 1.0)
    out = acc / safe_den[:, None]
    omask = gmask[:, None] & dmask[None, :]
    if NUM_SPLITS == 1:
        tl.store(out_ptr + seq * stride_ot + heads[:, None] * stride_oh + d[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=omask)
    else:
        row = (seq * (G * tl.num_programs(1)) + heads) * NUM_SPLITS + split  # [BLOCK_G]
        tl.store(part_out_ptr + row[:, None] * BLOCK_D + d[None, :], out, mask=omask)
        lse = tl.where(den > 0, m + tl.log2(safe_den), float("-inf"))
        tl.store(part_lse_ptr + row, lse, mask=gmask)


@triton.jit
def _reduce_splits_kernel(
    part_out_ptr, part_lse_ptr, out_ptr, stride_ot, stride_oh, H, D,
    NUM_SPLITS: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """grid (num_decodes, H): the splits' partial outputs weighted by their softmax mass."""
    seq = tl.program_id(0)
    head = tl.program_id(1)
    s = tl.arange(0, BLOCK_S)
    d = tl.arange(0, BLOCK_D)
    row = (seq * H + head) * NUM_SPLITS
    lse = tl.load(part_lse_ptr + row + s, mask=s < NUM_SPLITS, other=float("-inf"))
    w = tl.exp2(lse - tl.max(lse, 0))  # split 0 always holds tokens: the max is finite
    parts = tl.load(part_out_ptr + (row + s)[:, None] * BLOCK_D + d[None, :],
                    mask=(s < NUM_SPLITS)[:, None] & (d < D)[None, :], other=0.0)
    out = tl.sum(parts * w[:, None], 0) / tl.sum(w, 0)
    tl.store(out_ptr + seq * stride_ot + head * stride_oh + d, out.to(out_ptr.dtype.element_ty),
             mask=d < D)


@triton.jit
def _prefill_kernel(
    q_ptr, kc_ptr, vc_ptr, bt_ptr, seq_lens_ptr, cu_q_ptr, tiles_ptr, out_ptr,
    qk_scale, k_scale, v_scale,
    stride_qt, stride_qh, stride_ot, stride_oh,
    stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh, stride_bt,
    G, D,
    BLOCK_SIZE: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_G: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
    QUANT: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    """grid (num_tiles, KVH): BLOCK_Q query tokens of one chunk x the G heads of one KV
    head (rows r = token * BLOCK_G + head), causal against the chunk's paged context. The
    chunk's own K/V are already in the cache. Keys past the tile's last query position are
    never visited: no work above the diagonal beyond the diagonal tile itself."""
    tile = tl.program_id(0)
    kvh = tl.program_id(1)
    seq = tl.load(tiles_ptr + 2 * tile)
    q_start = tl.load(tiles_ptr + 2 * tile + 1)  # first query of the tile, within the chunk
    row0 = tl.load(cu_q_ptr + seq)
    q_len = tl.load(cu_q_ptr + seq + 1) - row0
    seq_len = tl.load(seq_lens_ptr + seq)
    prefix = seq_len - q_len  # cached tokens before this chunk
    r = tl.arange(0, BLOCK_Q * BLOCK_G)
    qi = q_start + r // BLOCK_G
    gi = r % BLOCK_G
    d = tl.arange(0, BLOCK_D)
    dmask = d < D
    rmask = (qi < q_len) & (gi < G)
    heads = kvh * G + gi
    q_pos = prefix + qi  # absolute position of each row's query
    q = tl.load(q_ptr + (row0 + qi)[:, None] * stride_qt + heads[:, None] * stride_qh
                + d[None, :], mask=rmask[:, None] & dmask[None, :], other=0.0)
    bt_row = bt_ptr + seq.to(tl.int64) * stride_bt
    kv_end = tl.minimum(seq_len, prefix + q_start + BLOCK_Q)  # past the tile's diagonal
    m = tl.full([BLOCK_Q * BLOCK_G], -1e30, tl.float32)
    den = tl.zeros([BLOCK_Q * BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_Q * BLOCK_G, BLOCK_D], tl.float32)
    for n0 in range(0, kv_end, BLOCK_N):
        pos = n0 + tl.arange(0, BLOCK_N)
        valid = pos < kv_end
        k = _load_kv_tile(kc_ptr, bt_row, pos, valid, kvh, d, dmask, k_scale, stride_kb,
                          stride_ks, stride_kh, BLOCK_SIZE, QUANT, q_ptr.dtype.element_ty)
        s = _dot(q, tl.trans(k), DOT_PRECISION, UPCAST) * qk_scale
        s = tl.where(valid[None, :] & (pos[None, :] <= q_pos[:, None]), s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))
        alpha = tl.exp2(m - m_new)
        p = tl.exp2(s - m_new[:, None])
        den = den * alpha + tl.sum(p, 1)
        v = _load_kv_tile(vc_ptr, bt_row, pos, valid, kvh, d, dmask, v_scale, stride_vb,
                          stride_vs, stride_vh, BLOCK_SIZE, QUANT, q_ptr.dtype.element_ty)
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, DOT_PRECISION, UPCAST)
        m = m_new
    out = acc / tl.where(den > 0, den, 1.0)[:, None]
    tl.store(out_ptr + (row0 + qi)[:, None] * stride_ot + heads[:, None] * stride_oh
             + d[None, :], out.to(out_ptr.dtype.element_ty),
             mask=rmask[:, None] & dmask[None, :])


# -- launchers --------------------------------------------------------------------------------
def _pow2(n: int) -> int:
    return triton.next_power_of_2(max(int(n), 1))


def _scales(k_scale: float | None, v_scale: float | None) -> tuple[bool, float, float]:
    quant = k_scale is not None
    return quant, float(k_scale or 1.0), float(v_scale or 1.0)


def _dot_args(dtype: torch.dtype) -> dict:
    # fp32 must not round its operands to TF32: the engine is token-exact in fp32.
    interpreted = not isinstance(_decode_kernel, triton.runtime.JITFunction)
    return {"DOT_PRECISION": "ieee" if dtype == torch.float32 else "tf32",
            "UPCAST": interpreted and dtype == torch.bfloat16}


def write_kv(key: torch.Tensor, value: torch.Tensor, key_cache: torch.Tensor,
             value_cache: torch.Tensor, slot_mapping: torch.Tensor,
             k_scale: float | None = None, v_scale: float | None = None) -> None:
    """Store the new tokens' K/V ([T, KVH, D] each) at their flat slots: one launch."""
    T, KVH, D = key.shape
    if T == 0:
        return
    quant, ks, vs = _scales(k_scale, v_scale)
    _write_kv_kernel[(T,)](
        key, value, key_cache, value_cache, slot_mapping, ks, vs,
        key.stride(0), key.stride(1), value.stride(0), value.stride(1),
        *key_cache.stride()[:3], *value_cache.stride()[:3], KVH, D,
        BLOCK_SIZE=key_cache.shape[1], BLOCK_H=_pow2(KVH), BLOCK_D=_pow2(D), QUANT=quant,
        **FP8_GRID.get(key_cache.dtype, FP8_GRID[torch.float8_e4m3fn]))


def decode_num_splits(num_decodes: int, kv_heads: int, max_seq_len: int, split_tokens: int,
                      num_sms: int) -> int:
    """Split-K only when the (sequence, KV head) programs alone leave the GPU under-filled,
    and never into splits shorter than ``split_tokens``."""
    if num_decodes * kv_heads >= num_sms:
        return 1
    want = -(-num_sms // max(num_decodes * kv_heads, 1))
    return max(1, min(want, -(-max_seq_len // split_tokens)))


def paged_decode(query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                 block_tables: torch.Tensor, seq_lens: torch.Tensor, scale: float,
                 out: torch.Tensor, max_seq_len: int, *, num_splits: int = 1,
                 block_n: int = 64, k_scale: float | None = None,
                 v_scale: float | None = None) -> None:
    """out[:nd] = attention of each decode query ([nd, H, D], one token per sequence)
    over its paged context. ``num_splits > 1``: flash-decoding, the context cut into that
    many position ranges attended in parallel, then merged by their log-sum-exp."""
    nd, H, D = query.shape
    KVH = key_cache.shape[2]
    G = H // KVH
    tiles = -(-max_seq_len // block_n)
    num_splits = max(1, min(num_splits, tiles))
    tiles_per_split = -(-tiles // num_splits)
    num_splits = -(-tiles // tiles_per_split)  # no split left without a tile
    quant, ks, vs = _scales(k_scale, v_scale)
    BLOCK_D = _pow2(D)
    part_out = part_lse = out  # unused placeholders when not split
    if num_splits > 1:
        part_out = torch.empty(nd, H, num_splits, BLOCK_D, dtype=torch.float32,
                               device=query.device)
        part_lse = torch.empty(nd, H, num_splits, dtype=torch.float32, device=query.device)
    _decode_kernel[(nd, KVH, num_splits)](
        query, key_cache, value_cache, block_tables, seq_lens, out, part_out, part_lse,
        scale * LOG2E, ks, vs, query.stride(0), query.stride(1), out.stride(0), out.stride(1),
        *key_cache.stride()[:3], *value_cache.stride()[:3], block_tables.stride(0), G, D,
        BLOCK_SIZE=key_cache.shape[1], BLOCK_G=max(16, _pow2(G)), BLOCK_D=BLOCK_D,
        BLOCK_N=block_n, TILES_PER_SPLIT=tiles_per_split, NUM_SPLITS=num_splits,
        QUANT=quant, **_dot_args(query.dtype))
    if num_splits > 1:
        _reduce_splits_kernel[(nd, H)](
            part_out, part_lse, out, out.stride(0), out.stride(1), H, D,
            NUM_SPLITS=num_splits, BLOCK_S=_pow2(num_splits), BLOCK_D=BLOCK_D)


def prefill_tiles(query_lens: list[int], first_seq: int, block_q: int,
                  device: torch.device) -> torch.Tensor:
    """[num_tiles * 2] int32: (sequence, first query in the chunk) of every query tile of
    the prefill chunks (sequences ``first_seq ..``), from host-side lengths."""
    flat: list[int] = []
    for seq in range(first_seq, len(query_lens)):
        for q0 in range(0, query_lens[seq], block_q):
            flat += (seq, q0)
    return torch.tensor(flat, dtype=torch.int32).to(device)


def prefill_block_q(heads_per_kv: int, rows: int = 64) -> int:
    """Query tokens per prefill tile: ``rows`` rows of (token, head) in all."""
    return max(1, rows // _pow2(heads_per_kv))


def paged_prefill(query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                  block_tables: torch.Tensor, seq_lens: torch.Tensor,
                  cu_seqlens_q: torch.Tensor, tiles: torch.Tensor, block_q: int,
                  scale: float, out: torch.Tensor, *, block_n: int = 64,
                  k_scale: float | None = None, v_scale: float | None = None) -> None:
    """out rows of the prefill chunks = causal attention of each chunk's queries over its
    paged context (cached prefix + the chunk itself, already written)."""
    H, D = query.shape[1:]
    KVH = key_cache.shape[2]
    num_tiles = tiles.numel() // 2
    if num_tiles == 0:
        return
    quant, ks, vs = _scales(k_scale, v_scale)
    _prefill_kernel[(num_tiles, KVH)](
        query, key_cache, value_cache, block_tables, seq_lens, cu_seqlens_q, tiles, out,
        scale * LOG2E, ks, vs, query.stride(0), query.stride(1), out.stride(0), out.stride(1),
        *key_cache.stride()[:3], *value_cache.stride()[:3], block_tables.stride(0),
        H // KVH, D,
        BLOCK_SIZE=key_cache.shape[1], BLOCK_Q=block_q, BLOCK_G=_pow2(H // KVH),
        BLOCK_D=_pow2(D), BLOCK_N=block_n, QUANT=quant, **_dot_args(query.dtype))
