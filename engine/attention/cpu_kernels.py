"""Optional compiled CPU attention kernels, built on first use with torch's C++ extension loader.

Both read K/V straight through the block table instead of gathering padded copies:
``paged_decode`` (decode attention is memory bound: each sequence's K/V is read once) and
``paged_prefill`` (prefill chunks, flash style, skipping the keys above the diagonal, which
``scaled_dot_product_attention`` computes and masks; AVX2 and head_dim 32/64/128 only:
``prefill_supported`` says when). Building needs
a C++ compiler and ninja; when either is missing or the build fails, ``load()`` returns
None (logged once) and the torch path runs. The build is cached under torch's extension
directory, so only the first process on a machine pays for it.
"""

from __future__ import annotations

import functools
from pathlib import Path

from engine.cpu_kernels_build import compile_or_none

SOURCE = Path(__file__).parent / "csrc" / "paged_attention.cpp"


@functools.cache
def load():
    """The compiled module (``paged_decode``, ``paged_prefill``, ``prefill_supported``), or
    None when it cannot be built."""
    return compile_or_none(
        "splitserve_paged_attention", SOURCE,
        # no FMA contraction: the fused ops that decode_step includes round as torch does
        # (the kernels' FMAs are explicit intrinsics)
        ["-O3", "-march=native", "-mprefer-vector-width=256", "-ffast-math", "-ffp-contract=off",
         "-fopenmp"],
        "paged attention kernels")
