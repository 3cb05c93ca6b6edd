"""``--plot``: one PNG per run with the latency CDFs (TTFT, ITL, E2E) and the output
throughput over time, one line per configuration (side).

matplotlib is optional (the ``dev`` extra): ``require_matplotlib`` says how to get it, and is
called before the benchmark starts, not after a long run. Drawn on an Agg canvas (no
display, no pyplot global state).
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from pathlib import Path

from app.loadgen.stats import RequestResult

DPI = 100
SIZE_IN = (12, 8)  # 1200 x 800 pixels


def require_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError as exc:
        raise ValueError("--plot needs matplotlib, which is not installed: pip install "
                         "matplotlib (or the dev extra), or leave --plot out") from exc


def png_path(target: str, label: str) -> Path:
    """``target`` itself when it names a .png file, else ``target/serving_<label>.png``."""
    path = Path(target)
    return path if path.suffix.lower() == ".png" else path / f"serving_{label}.png"


def token_times(r: RequestResult) -> list[float]:
    """When each of a request's tokens arrived, seconds after the benchmark started."""
    if r.ttft_s is None:
        return []
    return list(itertools.accumulate(r.arrival_gaps_s, initial=r.sent_s + r.ttft_s))


def throughput_series(results: Sequence[RequestResult],
                      bin_s: float) -> tuple[list[float], list[float]]:
    """(bin start times, output tokens per second in each bin), over every token received."""
    times = [t for r in results for t in token_times(r)]
    if not times:
        return [], []
    counts = [0] * (int(max(times) / bin_s) + 1)
    for t in times:
        counts[int(t / bin_s)] += 1
    return [i * bin_s for i in range(len(counts))], [c / bin_s for c in counts]


def _cdf(ax, values_ms: Sequence[float], label: str, color) -> None:
    xs = sorted(values_ms)
    if xs:
        ax.step(xs, [(i + 1) / len(xs) for i in range(len(xs))], where="post", label=label,
                color=color)


def _latency_panels(axes, sides: Mapping[str, Sequence[RequestResult]], colors) -> None:
    panels = (("TTFT", lambda ok: [r.ttft_s for r in ok if r.ttft_s is not None]),
              ("ITL (per-token gaps)", lambda ok: [g for r in ok for g in r.itl_s]),
              ("E2E", lambda ok: [r.e2e_s for r in ok if r.e2e_s is not None]))
    for ax, (name, pick) in zip(axes, panels, strict=True):
        values = []
        for (label, results), color in zip(sides.items(), colors, strict=False):
            ms = [v * 1e3 for v in pick([r for r in results if r.ok])]
            values += ms
            _cdf(ax, ms, f"{label} (n={len(ms)})", color)
        positive = [v for v in values if v > 0]
        if positive and max(positive) / min(positive) > 50:  # sub-ms to seconds: log x
            ax.set_xscale("log")
        ax.set(title=f"{name} CDF", xlabel="ms", ylabel="fraction", ylim=(0, 1.02))
        ax.grid(True, alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(loc="lower right", fontsize=8)


def _throughput_panel(ax, sides: Mapping[str, Sequence[RequestResult]], colors) -> None:
    span = max((t for rs in sides.values() for r in rs for t in token_times(r)[-1:]),
               default=1.0)
    bin_s = max(0.25, span / 60)
    for (label, results), color in zip(sides.items(), colors, strict=False):
        xs, ys = throughput_series(results, bin_s)
        ax.step(xs, ys, where="post", label=label, color=color)
    ax.set(title=f"output throughput over time ({bin_s:.2g} s bins)",
           xlabel="seconds since the first request", ylabel="tokens/s")
    ax.grid(True, alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="upper right", fontsize=8)


def write(path: str | Path, sides: Mapping[str, Sequence[RequestResult]],
          title: str) -> Path:
    """Draw ``sides`` ({label: results}) into the PNG at ``path``; returns the path."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=SIZE_IN, dpi=DPI)
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, 2).ravel()
    colors = list(itertools.islice(itertools.cycle(
        ["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple"]), len(sides)))
    _latency_panels(axes[:3], sides, colors)
    _throughput_panel(axes[3], sides, colors)
    fig.suptitle(f"splitserve bench: {title}")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI)
    return path
