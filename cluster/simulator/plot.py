"""One PNG per simulation: latency CDFs, replicas over time, SLO attainment over time.
matplotlib is imported here only (the simulator runs without it)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cluster.simulator.loop import Simulation


def plot_simulation(sim: Simulation, result: dict, path: str | Path, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rec, slo = sim.rec, sim.cfg.slo
    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5))
    ttft = np.sort((rec.first_token - rec.arrival)[~np.isnan(rec.first_token)])
    tpot = (rec.finish - rec.first_token) / np.maximum(rec.output - 1, 1)
    tpot = np.sort(tpot[(rec.output > 1) & ~np.isnan(tpot)])
    for ax, values, target, name in (
        (axes[0, 0], ttft, slo.ttft_s, "TTFT (s)"),
        (axes[0, 1], tpot, slo.itl_s, "time per output token (s)"),
    ):
        if values.size:
            ax.plot(values, np.arange(1, values.size + 1) / values.size)
        ax.axvline(target, color="red", linestyle="--", label=f"SLO {target:g} s")
        ax.set_xscale("log")
        ax.set_xlabel(name)
        ax.set_ylabel("fraction of requests")
        ax.legend()
    reps = result["replicas"]
    ax = axes[1, 0]
    for role in ("prefill", "decode", "colocated"):
        if any(r[role] for r in reps):
            ax.step([r["t"] for r in reps], [r[role] for r in reps], where="post", label=role)
    ax.set_xlabel("time (s)")
    ax.set_ylabel("replicas")
    ax.legend()
    ax = axes[1, 1]
    tl = [w for w in result["timeline"] if w["slo_attainment"] is not None]
    ax.plot([w["start_s"] for w in tl], [w["slo_attainment"] for w in tl], marker=".")
    ax.set_ylim(0, 1.05)
    ax.set_xlabel("arrival time (s)")
    ax.set_ylabel("SLO attainment")
    fig.suptitle(title or f"{result['config']['mode']} / {result['config']['profile']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
