"""Build (first use on a machine) and load every compiled CPU kernel, up front.

The kernels are compiled lazily by torch's extension loader and cached per machine and
checkout. Loading them eagerly where it is cheap to wait — a CLI before it starts workers,
an engine while it starts — keeps a first build (about a minute per extension on 2 cores)
out of a request's time to first token, and builds once instead of in every worker at once.
"""

from __future__ import annotations


def load_cpu_kernels() -> dict[str, bool]:
    """Load (building if needed) each compiled CPU kernel; ``{name: available}``."""
    from engine import fused_ops
    from engine.attention import cpu_kernels

    return {"paged decode attention": cpu_kernels.load() is not None,
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
    print("loading compiled CPU kernels (built on the first run on a machine, ~1-2 min)...",
          flush=True)
    missing = [name for name, ok in load_cpu_kernels().items() if not ok]
    note = f"; torch fallback for: {', '.join(missing)}" if missing else ""
    print(f"CPU kernels ready in {time.perf_counter() - t0:.1f} s{note}", flush=True)
