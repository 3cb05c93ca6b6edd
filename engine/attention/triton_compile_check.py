"""Compile the Triton attention kernels for a GPU target on a machine without one.

Triton's compiler runs without a device: this takes every kernel through Triton IR, LLVM,
PTX and ``ptxas`` (bundled with the triton wheel) for the given CUDA architecture, for each
dtype the backend launches them with (fp32, fp16, bf16; fp8 caches). It catches what the
interpreter cannot (the interpreter runs the kernels as Python: a construct the compiler
rejects, or an fp8 type an architecture lacks, passes there).

    python -m engine.attention.triton_compile_check --arch 90      # H100
    python -m engine.attention.triton_compile_check --arch 80 --quick

Must run with ``TRITON_INTERPRET`` unset (compiled mode). Prints one line per kernel and
exits 1 if any failed to compile. fp8 e4m3 is skipped below sm_89: Triton has no e4m3 type
there, and the backend refuses such a cache with a clear error instead.
"""

from __future__ import annotations

import argparse
import os
import sys

# (query dtype, cache dtype) pairs the backend launches
DTYPES = [("bf16", "bf16"), ("fp16", "fp16"), ("fp32", "fp32"), ("bf16", "fp8e4nv"),
          ("bf16", "fp8e5")]
QUICK = [("bf16", "bf16"), ("bf16", "fp8e5")]


def _signature(fn, types: dict[str, str], consts: dict) -> dict[str, str]:
    return {n: "constexpr" if n in consts else types.get(n, "i32") for n in fn.arg_names}


def _cases(q: str, c: str):
    """(label, kernel name, pointer/scalar types, constexprs) of every launch of one pair."""
    quant = c.startswith("fp8")
    dot = {"DOT_PRECISION": "ieee" if q == "fp32" else "tf32", "UPCAST": False}
    types = dict(q_ptr=f"*{q}", kc_ptr=f"*{c}", vc_ptr=f"*{c}", bt_ptr="*i32",
                 seq_lens_ptr="*i32", out_ptr=f"*{q}", part_out_ptr="*fp32",
                 part_lse_ptr="*fp32", qk_scale="fp32", k_scale="fp32", v_scale="fp32",
                 cu_q_ptr="*i32", tiles_ptr="*i32", key_ptr=f"*{q}", value_ptr=f"*{q}",
                 slot_ptr="*i64")
    for splits in (1, 4):
        yield (f"decode {q}/{c} splits={splits}", "_decode_kernel", types,
               dict(BLOCK_SIZE=16, BLOCK_G=16, BLOCK_D=128, BLOCK_N=64, TILES_PER_SPLIT=8,
                    NUM_SPLITS=splits, QUANT=quant, **dot))
    yield (f"prefill {q}/{c}", "_prefill_kernel", types,
           dict(BLOCK_SIZE=16, BLOCK_Q=16, BLOCK_G=4, BLOCK_D=128, BLOCK_N=64, QUANT=quant,
                **dot))
    yield (f"write_kv {q}/{c}", "_write_kv_kernel", types,
           dict(BLOCK_SIZE=16, BLOCK_H=8, BLOCK_D=128, QUANT=quant, MANT=3, EMIN=-6,
                LIMIT=448.0))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", type=int, default=90, help="CUDA compute capability, e.g. 80, 90")
    p.add_argument("--quick", action="store_true", help="bf16 and fp8_e5m2 only")
    args = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("unset TRITON_INTERPRET: the interpreter compiles nothing", file=sys.stderr)
        return 2
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from engine.attention import triton_kernels as tk

    target = GPUTarget("cuda", args.arch, 32)
    cases = [c for pair in (QUICK if args.quick else DTYPES) for c in _cases(*pair)]
    cases.append(("reduce", "_reduce_splits_kernel",
                  dict(part_out_ptr="*fp32", part_lse_ptr="*fp32", out_ptr="*bf16"),
                  dict(NUM_SPLITS=4, BLOCK_S=4, BLOCK_D=128)))
    failed = 0
    for label, name, types, consts in cases:
        if "fp8e4nv" in label and args.arch < 89:  # refused by the backend there
            print(f"skip  sm_{args.arch} {label}: no e4m3 in Triton before sm_89")
            continue
        fn = getattr(tk, name)
        try:
            triton.compile(ASTSource(fn, _signature(fn, types, consts), consts), target=target)
            print(f"ok    sm_{args.arch} {label}")
        except Exception as exc:  # report every kernel, then fail
            failed += 1
            lines = [ln for ln in str(exc).splitlines() if ln.strip()]
            print(f"FAIL  sm_{args.arch} {label}: {lines[-1] if lines else type(exc).__name__}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
