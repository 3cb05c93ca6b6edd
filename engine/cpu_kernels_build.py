"""Build (first use in a checkout) and load every compiled CPU kernel, up front.

The kernels are compiled lazily by torch's extension loader and cached per machine and
checkout. Loading them eagerly where it is cheap to wait — a CLI before it starts workers,
an engine while it starts — keeps a first build (about a minute per extension on 2 cores)
out of a request's time to first token, and builds once instead of in every worker at once.
"""

from __future__ import annotations

import hashlib
import logging
import sys
from pathlib import Path
from types import ModuleType

log = logging.getLogger(__name__)


def compile_or_none(name: str, source: Path, cflags: list[str], what: str) -> ModuleType | None:
    """``source`` built as the torch extension ``name`` (OpenMP linked), or None — logged
    once — when there is no compiler/ninja or the build fails: callers use torch ops then."""
    try:
        import torch
        from torch.utils.cpp_extension import load as load_extension

        # One build per checkout and environment: under a shared name, two checkouts (or
        # venvs) on one machine would each rebuild it (~1-2 min) whenever the other had.
        where = f"{source.resolve()}|{sys.prefix}|{torch.__version__}"
        name = f"{name}_{hashlib.sha1(where.encode()).hexdigest()[:10]}"
        log.info("loading the compiled %s (built once per checkout, ~1 min)", what)
        return load_extension(name=name, sources=[str(source)], extra_cflags=cflags,
                              extra_ldflags=["-fopenmp"], verbose=False)
    except Exception as exc:  # no compiler / ninja, or a build error: torch path instead
        log.warning("compiled CPU %s unavailable (%s); using torch ops", what,
                    str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        return None


def load_cpu_kernels() -> dict[str, bool]:
    """Load (building if needed) each compiled CPU kernel; ``{name: available}``."""
    from engine import fused_ops
    from engine.attention import cpu_kernels

    return {"paged attention": cpu_kernels.load() is not None,
            "fused ops": fused_ops.load() is not None}


def prebuild_for_cli(device: str) -> None:
    """For commands that start workers on ``device``: build the CPU kernels here first,
    saying so, so that the workers (same machine and checkout) find them cached."""
    import time

    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device != "cpu":
        return

    t0 = time.perf_counter()
    print("loading compiled CPU kernels (built on the first run in a checkout, ~1-2 min)...",
          flush=True)
    missing = [name for name, ok in load_cpu_kernels().items() if not ok]
    note = f"; torch fallback for: {', '.join(missing)}" if missing else ""
    print(f"CPU kernels ready in {time.perf_counter() - t0:.1f} s{note}", flush=True)
