"""Optional compiled CPU kernels, built on first use with torch's C++ extension loader.

Decode attention on CPU is memory bound; the compiled kernel reads each sequence's K/V
once, straight through the block table, instead of gathering padded copies. Building needs
a C++ compiler and ninja; when either is missing or the build fails, ``load()`` returns
None (logged once) and the torch path runs. The build is cached under torch's extension
directory, so only the first process on a machine pays for it.
"""

from __future__ import annotations

import functools
from pathlib import Path

from engine.cpu_kernels_build import compile_or_none

SOURCE = Path(__file__).parent / "csrc" / "paged_decode.cpp"


@functools.cache
def load():
    """The compiled module (with ``paged_decode``), or None when it cannot be built."""
    return compile_or_none(
        "splitserve_paged_decode", SOURCE,
        ["-O3", "-march=native", "-mprefer-vector-width=256", "-ffast-math", "-fopenmp"],
        "decode attention kernel")
