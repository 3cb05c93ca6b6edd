"""Decode attention on a GPU vs the HBM roofline of the KV bytes it must read.

One decode step of attention for ``--batch`` sequences of ``--context`` tokens each, over a
paged cache laid out as the engine's (block-major, one layer's strided view, random block
tables). A decode step must read every context token's K and V once, so its floor is
``kv_bytes / HBM bandwidth``; the script reports each backend's time and the fraction of that
roofline it reaches (the issue's goal: >= 70 % at batch 64, 2k context, head_dim 128, bf16),
against both the card's spec bandwidth (when the card is known) and a measured device copy.

    python benchmarks/gpu_attention.py --batch 64 --context 2048 --out gpu_attention.json

Backends: ``triton`` (always), ``torch`` (the reference: gathers padded blocks), and
``flash_attn`` when installed (at its block size, 256). Needs CUDA: without it the script
says so and exits with status 2.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

import torch

# Spec HBM bandwidth (GB/s) by device name fragment; the measured copy is reported as well.
SPEC_GBPS = {"H200": 4800.0, "H100 SXM": 3350.0, "H100 PCIe": 2000.0, "H100": 3350.0,
             "A100-SXM4-80GB": 2039.0, "A100": 1555.0, "L40S": 864.0, "MI300X": 5300.0}
NUM_LAYERS_IN_CACHE = 4  # a layer's view strides over the others, as in the engine


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--context", type=int, default=2048)
    p.add_argument("--heads", type=int, default=32, help="query heads")
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--backends", default="triton,torch,flash_attn")
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    return p.parse_args(argv)


def measured_copy_gbps(device: torch.device) -> float:
    """Device-to-device copy of 1 GiB: bytes read + written per second."""
    src = torch.empty(1 << 30, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), iters=10)
    return 2 * src.numel() / (ms * 1e-3) / 1e9


def time_ms(fn, iters: int) -> float:
    """Median of ``iters`` timed calls (CUDA events), after three warm-up calls."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def decode_case(args, block_size: int, device: torch.device):
    """(query, key_cache, value_cache, metadata) of one decode step of the whole batch."""
    from engine.attention.metadata import AttentionMetadata

    dtype = getattr(torch, args.dtype)
    blocks_per_seq = -(-args.context // block_size)
    num_blocks = args.batch * blocks_per_seq + 1
    ids = list(range(1, num_blocks))
    random.Random(0).shuffle(ids)  # scattered blocks, as after a while of serving
    tables = torch.tensor(ids, dtype=torch.int32, device=device).view(args.batch, -1)
    kv = torch.randn(num_blocks, NUM_LAYERS_IN_CACHE, 2, block_size, args.kv_heads,
                     args.head_dim, dtype=dtype, device=device)
    seq_lens = [args.context] * args.batch
    as_i32 = lambda xs: torch.tensor(xs, dtype=torch.int32, device=device)  # noqa: E731
    cu = list(range(0, args.batch + 1))
    md = AttentionMetadata(
        slot_mapping=(tables[:, -1].long() * block_size + (args.context - 1) % block_size),
        cu_seqlens_q=as_i32(cu), cu_seqlens_k=as_i32([i * args.context for i in cu]),
        seq_lens=as_i32(seq_lens), block_tables=tables, query_lens_cpu=[1] * args.batch,
        seq_lens_cpu=seq_lens, num_decodes=args.batch, max_query_len=1,
        max_seq_len=args.context)
    q = torch.randn(args.batch, args.heads, args.head_dim, dtype=dtype, device=device)
    new_kv = torch.randn(args.batch, args.kv_heads, args.head_dim, dtype=dtype, device=device)
    return q, new_kv, kv[:, 1, 0], kv[:, 1, 1], md


def bench_backend(name: str, args, device: torch.device) -> dict:
    from engine.attention.registry import backend_class

    cls = backend_class(name)
    block_size = args.block_size if cls.supports_block_size(args.block_size) else 256
    if not cls.is_available(device):
        return {"backend": name, "skipped": f"not available ({getattr(cls, 'requirements', '')})"}
    backend = cls()
    q, new_kv, k_cache, v_cache, md = decode_case(args, block_size, device)
    scale = args.head_dim**-0.5
    with torch.inference_mode():
        ms = time_ms(lambda: backend.forward(q, new_kv, new_kv, k_cache, v_cache, md, scale),
                     args.iters)
    return {"backend": name, "block_size": block_size, "ms": ms}


def main(argv=None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_attention: no CUDA device here; this benchmark measures GPU HBM bandwidth "
              "use and needs a GPU (run it on a CUDA machine)", file=sys.stderr)
        return 2
    device = torch.device("cuda")
    name = torch.cuda.get_device_name(device)
    elem = torch.empty((), dtype=getattr(torch, args.dtype)).element_size()
    kv_bytes = 2 * args.batch * args.context * args.kv_heads * args.head_dim * elem
    spec = next((gbps for frag, gbps in SPEC_GBPS.items() if frag in name), None)
    copy_gbps = measured_copy_gbps(device)
    results = [bench_backend(b, args, device) for b in args.backends.split(",")]
    print(f"{name}: batch {args.batch} x context {args.context}, heads {args.heads}/"
          f"{args.kv_heads}, head_dim {args.head_dim}, {args.dtype}; KV read "
          f"{kv_bytes / 1e6:.1f} MB; spec {spec or '?'} GB/s, measured copy {copy_gbps:.0f} GB/s")
    for r in results:
        if "ms" not in r:
            print(f"  {r['backend']:>10}: {r['skipped']}")
            continue
        r["achieved_gbps"] = kv_bytes / (r["ms"] * 1e-3) / 1e9
        r["roofline_fraction_measured"] = r["achieved_gbps"] / copy_gbps
        if spec:
            r["roofline_fraction_spec"] = r["achieved_gbps"] / spec
        print(f"  {r['backend']:>10} (block {r['block_size']}): {r['ms']:.3f} ms, "
              f"{r['achieved_gbps']:.0f} GB/s = {100 * r['roofline_fraction_measured']:.0f} % of "
              f"the measured copy" + (f", {100 * r['roofline_fraction_spec']:.0f} % of spec"
                                       if spec else ""))
    if args.out:
        args.out.write_text(json.dumps({"device": name, "args": {k: str(v) for k, v in
                                                                 vars(args).items()},
                                        "kv_bytes": kv_bytes, "spec_gbps": spec,
                                        "copy_gbps": copy_gbps, "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
