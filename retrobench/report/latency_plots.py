"""Latency plots: decode step time against context length (benchmark CSVs and runs) and per-step
decode time over the generated position. Re-exported by :mod:`retrobench.report.plots`."""

from __future__ import annotations

import math
from typing import Any

from matplotlib.figure import Figure

from retrobench.report.common import short
from retrobench.report.figures import empty, facet_groups, figure, legend


def latency_series(frame: Any) -> Any:
    """The benchmark frame with a ``series`` column: method, ``w=`` for retro, ``b=`` when budgets vary.

    A ``make bench`` table (``decode.csv``: an ``op`` column) keeps its ``decode_step`` rows only.
    """
    frame = frame[frame["op"] == "decode_step"] if "op" in frame.columns else frame
    frame = frame.copy()
    budgets = frame["budget"].nunique(dropna=False) if "budget" in frame.columns else 1
    names = []
    for _, row in frame.iterrows():
        name = str(row["method"])
        window = row.get("window")
        has_window = window is not None and not (isinstance(window, float) and math.isnan(window))
        if has_window and (name == "retro" or float(window) > 1):
            name += f" w={short(float(window))}"
        if budgets > 1 and row.get("budget") is not None:
            name += f" b={short(row['budget'])}"
        names.append(name)
    frame["series"] = names
    return frame


def latency_vs_context(frame: Any, metric: str = "p50_ms", facet: str | None = None) -> Figure:
    """Decode step time (``p50_ms``; band p10–p90 when present) against context length, one line
    per method (and window / budget); one panel per ``facet`` (default: batch when it varies).

    ``frame`` is a benchmark CSV in long format: columns method, context, p50_ms and optionally
    budget, window, batch, p10_ms, p90_ms.
    """
    if frame.empty or not {"method", "context", metric} <= set(frame.columns):
        return empty(f"no method/context/{metric} columns")
    frame = latency_series(frame)
    if facet is None and "batch" in frame.columns and frame["batch"].nunique() > 1:
        facet = "batch"
    panels = facet_groups(frame, facet)
    fig, axes = figure(len(panels))
    for ax, (value, part) in zip(axes, panels):
        for name, group in part.groupby("series", sort=True):
            group = group.groupby("context", as_index=False).mean(numeric_only=True).sort_values("context")
            ax.plot(group["context"], group[metric], marker="o", label=str(name))
            if {"p10_ms", "p90_ms"} <= set(group.columns) and metric == "p50_ms":
                ax.fill_between(group["context"], group["p10_ms"], group["p90_ms"], alpha=0.2)
        ax.set_xscale("log", base=2)
        contexts = sorted(part["context"].dropna().unique())
        ax.set_xticks(
            contexts, [f"{int(c) // 1024}K" if c % 1024 == 0 else short(float(c)) for c in contexts]
        )
        ax.minorticks_off()
        ax.set_xlabel("context (tokens)")
        ax.set_ylabel("decode step (ms)" if metric.endswith("_ms") else metric)
        ax.set_title(f"{facet}={value}" if value is not None else "decode step vs context")
        ax.grid(alpha=0.3)
        legend(ax)
    return fig


def decode_time_over_position(df: Any) -> Figure:
    """Per-step decode time (``ms``) against the generated position (``step``), one line per ``sample``."""
    if df.empty or not {"step", "ms"} <= set(df.columns):
        return empty("no decode steps")
    fig, (ax,) = figure()
    groups = df.groupby("sample", sort=True) if "sample" in df.columns else [("", df)]
    for name, group in groups:
        ax.plot(group["step"], group["ms"], lw=0.8, label=str(name))
    ax.set_xlabel("generated token")
    ax.set_ylabel("decode step (ms)")
    ax.set_title("decode time over position")
    ax.grid(alpha=0.3)
    if "sample" in df.columns and df["sample"].nunique() <= 8:
        legend(ax)
    return fig
