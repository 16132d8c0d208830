"""The latency sections of report.md: the runs' decode latency and memory, and the benchmark CSVs.

Like :mod:`retrobench.report.sections`, each ``section(w, ...)`` appends one ``##`` section to a
:class:`~retrobench.report.markdown.Writer`; :func:`retrobench.report.write.write_report` calls them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from retrobench.report.load import is_latency_frame, runs_latency
from retrobench.report.markdown import Writer, cell
from retrobench.report.stats import latency_overhead, summary


def latency_runs(w: Writer, runs: Any) -> None:
    """``## Decode latency and memory (runs)``, and step time vs context when runs vary it."""
    from retrobench.report import plots

    w.text("## Decode latency and memory (runs)")
    if runs.empty or "tpot_p50_s" not in runs.columns:
        w.none()
    else:
        lat = runs.copy()
        lat["tpot_p50_ms"] = lat["tpot_p50_s"] * 1000
        lat["ttft_p50_ms"] = lat.get("ttft_p50_s", np.nan) * 1000
        lat["peak_memory_mb"] = lat.get("peak_memory_bytes", np.nan) / 2**20
        group = ["model", "task", "label", "budget_fraction", "budget_tokens", "backend", "env.device_name"]
        parts = None
        for metric in ("tpot_p50_ms", "ttft_p50_ms", "tokens_per_s", "peak_memory_mb"):
            if metric not in lat.columns:
                continue
            stats = summary(lat, group, metric)
            stats[metric] = [
                cell(m, lo, hi, digits=4)
                for m, lo, hi in zip(stats["mean"], stats["ci_low"], stats["ci_high"])
            ]
            part = stats[[*[c for c in group if c in stats.columns], "runs", metric]]
            keys = [c for c in group if c in part.columns]
            parts = part if parts is None else parts.merge(part.drop(columns="runs"), on=keys, how="outer")
        w.text("Per run medians, then mean [CI] over runs (seeds) of the same setting; CPU timings are "
               "indicative only.")  # fmt: skip
        w.table("latency_runs", parts)
        by_context = runs_latency(runs)
        if not by_context.empty and by_context["context"].nunique() > 1:
            w.text("### Decode step vs context length (runs with `task.context_tokens`)")
            w.figure(
                "latency_vs_context_runs",
                plots.latency_vs_context(by_context),
                "decode step vs context (runs)",
            )
            w.table("latency_vs_context_runs", by_context)
            overhead = latency_overhead(by_context)
            if overhead:
                import pandas as pd

                w.text("Retro − quest step time at equal context (paper: < 1 ms at w=2, ≈ 2 ms at w=8):")
                w.table("latency_overhead_runs", pd.DataFrame(overhead))


def benchmarks(w: Writer, bench: Mapping[str, Any]) -> None:
    """``## Benchmarks``: every ``bench/*.csv``, latency CSVs as a plot, a p50 table and overhead."""
    from retrobench.report import plots

    w.text("## Benchmarks (`bench/*.csv`)")
    if not bench:
        w.none("no CSV under the bench folder")
    for name, frame in bench.items():
        w.text(f"### {name}.csv")
        if is_latency_frame(frame):
            w.figure(
                f"latency_vs_context_{name}",
                plots.latency_vs_context(frame),
                f"{name}: decode step vs context",
            )
            labelled = plots.latency_series(frame)
            series = [c for c in ("model", "device", "batch", "budget") if c in labelled.columns]
            wide = labelled.pivot_table(
                index=[*series, "context"], columns="series", values="p50_ms", dropna=False
            )
            wide = wide.reset_index()
            wide.columns = [str(c) for c in wide.columns]
            w.text("p50 decode step time (ms):")
            w.table(f"bench_{name}", frame, wide, digits=4)
            overhead = latency_overhead(frame)
            if overhead:
                import pandas as pd

                ov = pd.DataFrame(overhead)
                paper = {2: "< 1", 8: "≈ 2"}
                ov["paper_ms"] = [paper.get(int(x), "") for x in ov["window"]]
                w.text("Retro − quest step time at equal context (paper: < 1 ms at w=2, ≈ 2 ms at w=8):")
                w.table(f"bench_{name}_overhead", ov)
        else:
            w.table(f"bench_{name}", frame)
