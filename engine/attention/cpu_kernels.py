"""Optional compiled CPU kernels, built on first use with torch's C++ extension loader.

Decode attention on CPU is memory bound; the compiled kernel reads each sequence's K/V
once, straight through the block table, instead of gathering padded copies. Building needs
a C++ compiler and ninja; when either is missing or the build fails, ``load()`` returns
None (logged once) and the torch path runs. The build is cached under torch's extension
directory, so only the first process on a machine pays for it.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path

log = logging.getLogger(__name__)
SOURCE = Path(__file__).parent / "csrc" / "paged_decode.cpp"


@functools.cache
def load():
    """The compiled module (with ``paged_decode``), or None when it cannot be built."""
    try:
        from torch.utils.cpp_extension import load as load_extension

        log.info("loading the compiled CPU decode kernel (built once per machine, ~1 min)")
        return load_extension(
            name="splitserve_paged_decode",
            sources=[str(SOURCE)],
            extra_cflags=["-O3", "-march=native", "-mprefer-vector-width=256", "-ffast-math",
                          "-fopenmp"],
            extra_ldflags=["-fopenmp"],
            verbose=False,
        )
    except Exception as exc:  # no compiler / ninja, or a build error: torch path instead
        log.warning("compiled CPU decode attention unavailable (%s); using the torch path",
                    str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        return None
