"""Printing and saving benchmark results: one configuration's table, a side-by-side comparison
with ratios, and the JSON file."""

from __future__ import annotations

import json
import platform
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from app.loadgen.stats import PERCENTILES, RequestResult
from cluster.backend import MIGRATION_COUNT

_DISTS = (("TTFT", "ttft_ms"), ("ITL", "itl_ms"), ("TPOT", "tpot_ms"), ("E2E", "e2e_ms"))
_PHASES = ("router_queue", "prefill_queue", "prefill_compute", "kv_transfer", "decode_queue",
           "decode")


def _fmt(value, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def table(summary: dict, label: str = "") -> str:
    """One configuration's results as text."""
    s = summary
    slo = s["slo"]
    lines = [
        f"== {label or 'serving benchmark'} ==",
        f"requests {s['num_requests']}: completed {s['completed']}, failed {s['failed']}"
        + (f" {s['errors']}" if s["errors"] else "")
        + f"; duration {s['duration_s']:.1f} s",
        f"throughput {s['request_throughput']:.2f} req/s, {s['output_throughput']:.1f} output "
        f"tok/s, {s['input_throughput']:.0f} prompt tok/s",
        f"goodput {s['goodput']:.2f} req/s (TTFT <= {slo['ttft_ms']:g} ms and {slo['itl_stat']} "
        f"ITL <= {slo['itl_ms']:g} ms: {s['slo_attainment'] * 100:.1f}% of requests)",
        f"{'ms':<6}" + "".join(f"{h:>10}" for h in ("mean", *(f"p{q}" for q in PERCENTILES)))
        + f"{'samples':>9}",
    ]
    for name, key in _DISTS:
        d = s[key]
        lines.append(f"{name:<6}" + "".join(f"{_fmt(d[k]):>10}" for k in
                                            ("mean", *(f"p{q}" for q in PERCENTILES)))
                     + f"{d['count']:>9}")
    timing = s["server_timing_ms"]
    if timing:
        parts = [f"{p} {timing[p]:.1f}" for p in _PHASES if p in timing]
        lines.append("server timing, mean ms: " + ", ".join(parts))
    return "\n".join(lines)


def comparison_rows(summaries: Sequence[dict]) -> list[tuple[str, list, int]]:
    """(metric name, value per side, decimals to print) for the side-by-side table."""
    rows: list[tuple[str, list, int]] = []
    for name, key in _DISTS:
        for q in PERCENTILES:
            rows.append((f"{name} p{q} ms", [s[key][f"p{q}"] for s in summaries], 1))
    for name, key, scale, digits in (("throughput req/s", "request_throughput", 1.0, 2),
                                     ("output tok/s", "output_throughput", 1.0, 1),
                                     ("goodput req/s", "goodput", 1.0, 2),
                                     ("SLO attainment %", "slo_attainment", 100.0, 1),
                                     ("failed", "failed", 1.0, 0)):
        rows.append((name, [s[key] * scale for s in summaries], digits))
    for phase in _PHASES:
        rows.append((f"server {phase} ms", [s["server_timing_ms"].get(phase)
                                             for s in summaries], 1))
    return rows


def ratio(a, b) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return a / b


def comparison(labels: Sequence[str], summaries: Sequence[dict]) -> tuple[str, dict]:
    """Side-by-side text table and its JSON form; ratios are side 0 / side i (i >= 1)."""
    heads = list(labels) + [f"{labels[0]}/{lab}" for lab in labels[1:]]
    width = max(12, *(len(h) + 2 for h in heads))
    out = [f"{'metric':<24}" + "".join(f"{h:>{width}}" for h in heads)]
    data: dict[str, dict] = {}
    for name, values, digits in comparison_rows(summaries):
        ratios = [ratio(values[0], v) for v in values[1:]]
        cells = [_fmt(v, digits) for v in values] + [_fmt(r, 2) for r in ratios]
        out.append(f"{name:<24}" + "".join(f"{c:>{width}}" for c in cells))
        data[name] = {"values": dict(zip(labels, values, strict=True)),
                      "ratios": dict(zip(heads[len(labels):], ratios, strict=True))}
    return "\n".join(out), data


def rounds_table(labels: Sequence[str], rounds: Sequence[Sequence[dict]]) -> str:
    """A line per (side, round) from each round's record: the headline numbers, to show the
    run-to-run spread, and the machine's 1-minute load average after the round."""
    out = [f"{'side':<12}{'round':>6}{'TTFT p50':>10}{'TTFT p90':>10}{'TPOT p50':>10}"
           f"{'TPOT p90':>10}{'E2E p50':>10}{'goodput':>9}{'load':>6}"]
    for label, records in zip(labels, rounds, strict=True):
        for r, rec in enumerate(records):
            s = rec["summary"]
            out.append(f"{label:<12}{r:>6}{_fmt(s['ttft_ms']['p50']):>10}"
                       f"{_fmt(s['ttft_ms']['p90']):>10}{_fmt(s['tpot_ms']['p50']):>10}"
                       f"{_fmt(s['tpot_ms']['p90']):>10}{_fmt(s['e2e_ms']['p50']):>10}"
                       f"{s['goodput']:>9.2f}{_fmt(rec.get('loadavg_1m', {}).get('after')):>6}")
    return "\n".join(out)


def request_records(results: Sequence[RequestResult]) -> list[dict]:
    """Compact per-request rows for the JSON file (no per-token gaps; server phases in ms)."""
    def ms(x):
        return None if x is None else round(x * 1e3, 3)

    return [{"index": r.index, "prompt_len": r.prompt_len, "output_len": r.output_len,
             "sent_s": round(r.sent_s, 4), "ok": r.ok, "error": r.error,
             "ttft_ms": ms(r.ttft_s), "tpot_ms": ms(r.tpot_s), "e2e_ms": ms(r.e2e_s),
             "output_tokens": r.output_tokens, "itl_samples": len(r.itl_s),
             "server_timing_ms": {k: ms(v) for k, v in (r.timing or {}).items()
                                  if k != MIGRATION_COUNT},
             "migrations": int((r.timing or {}).get(MIGRATION_COUNT, 0))}
            for r in results]


def environment() -> dict:
    return {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "python": platform.python_version(),
            "platform": platform.platform(), "argv": sys.argv}


def write_json(path: str | Path, payload: dict) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, allow_nan=False) + "\n")
    return path
