"""Discrete-event simulator of a disaggregated (or colocated) serving cluster.

It runs the real ``cluster.global_scheduler.GlobalScheduler`` and
``cluster.autoscaler.Autoscaler`` against cost models of prefill, decode and KV transfer
(``profiles``), replaying a trace (``trace``). Entry points: ``simulate(cfg, trace)`` and
``sweep.sweep_ratios``; the CLI is ``splitserve simulate``.
"""

from cluster.simulator.config import SimConfig
from cluster.simulator.loop import Simulation, simulate
from cluster.simulator.profiles import CostProfile, resolve_profile
from cluster.simulator.trace import TraceRequest, load_csv, synthetic

__all__ = [
    "CostProfile",
    "SimConfig",
    "Simulation",
    "TraceRequest",
    "load_csv",
    "resolve_profile",
    "simulate",
    "synthetic",
]
