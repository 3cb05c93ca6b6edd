"""Discrete-event simulator of a disaggregated (or colocated) serving cluster.

It runs the real ``cluster.global_scheduler.GlobalScheduler`` and
``cluster.autoscaler.Autoscaler`` against cost models of prefill, decode and KV transfer
(``profiles``), replaying a trace (``trace``). Entry points: ``simulate(cfg, trace)`` and
``sweep.sweep_ratios``; the CLI is ``splitserve simulate``.

The names below are imported on first use: importing a submodule (``parallel``, in a
sweep's process) must not import the loop before that process has chosen its compiled
or interpreted build (``cluster.compiled``).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from cluster.simulator.config import SimConfig
    from cluster.simulator.loop import Simulation, simulate
    from cluster.simulator.profiles import CostProfile, resolve_profile
    from cluster.simulator.trace import TraceRequest, load_csv, synthetic

_HOMES = {
    "CostProfile": "profiles", "SimConfig": "config", "Simulation": "loop",
    "TraceRequest": "trace", "load_csv": "trace", "resolve_profile": "profiles",
    "simulate": "loop", "synthetic": "trace",
}
__all__ = [
    "CostProfile", "SimConfig", "Simulation", "TraceRequest", "load_csv", "resolve_profile",
    "simulate", "synthetic",
]


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{home}"), name)
