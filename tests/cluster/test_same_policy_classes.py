"""The simulator and the live cluster run the very same policy classes (no copies)."""

from __future__ import annotations

import ast
from pathlib import Path

import cluster.autoscaler as autoscaler_mod
import cluster.global_scheduler as scheduler_mod
from cluster.autoscaling import AutoscalingLoop
from cluster.config import ClusterConfig
from cluster.runtime import Cluster
from cluster.simulator.config import SimConfig
from cluster.simulator.loop import Simulation

REPO = Path(__file__).resolve().parents[2]


def test_live_cluster_and_simulator_share_scheduler_and_autoscaler_classes():
    live = Cluster(ClusterConfig.model_validate({"model": {"path": "unused"}}), mode="local")
    loop = AutoscalingLoop(live, live.config.autoscaler_config(), live.config.slo)
    from cluster.policy_config import AutoscalerConfig

    sim = Simulation(SimConfig(autoscaler=AutoscalerConfig()), [])
    assert type(live.scheduler) is type(sim.sched) is scheduler_mod.GlobalScheduler
    assert sim.autoscaler is not None
    assert type(loop.autoscaler) is type(sim.autoscaler) is autoscaler_mod.Autoscaler
    assert type(loop.window) is type(sim.window) is autoscaler_mod.RollingWindow


def test_no_other_module_defines_the_policy_classes():
    names = {"GlobalScheduler", "Autoscaler", "RollingWindow", "PrefixIndex"}
    owners = {}
    for path in (REPO / "cluster").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef) and node.name in names:
                owners.setdefault(node.name, []).append(path.relative_to(REPO).as_posix())
    assert owners == {
        "GlobalScheduler": ["cluster/global_scheduler.py"],
        "Autoscaler": ["cluster/autoscaler.py"],
        "RollingWindow": ["cluster/autoscaler.py"],
        "PrefixIndex": ["cluster/placement_index.py"],
    }
