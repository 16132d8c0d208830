"""Plots over the result tables: each function takes a DataFrame and returns a matplotlib Figure.

The frames are :func:`retrobench.store.load_samples` / :func:`retrobench.store.load_runs`
(or a benchmark CSV for :func:`latency_vs_context`); the functions aggregate themselves (mean and
95% bootstrap CI per point, :func:`retrobench.report.summary`), so a notebook can pass a filtered
table straight in. Figures are created without pyplot on the Agg canvas: no global state, no
display needed, safe in scripts and tests; ``fig.savefig("x.png")`` writes a PNG, and a notebook
shows a returned figure as usual.

Accuracy-like metrics (:data:`retrobench.report.PERCENT`) are drawn in percent.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from retrobench.store.metrics import bootstrap_ci
from retrobench.report.common import PERCENT, metric_scale, short
from retrobench.report.figures import SHORT_NAMES, SPLIT, empty, errorbar, facet_groups, figure, legend, series_column, ylabel
from retrobench.report.latency_plots import decode_time_over_position, latency_series, latency_vs_context
from retrobench.report.stats import select, summary

_BUCKET = re.compile(r"^nll_ratio_bucket_(\d+)$")
#: Settings every method records: what a base run must match when the frame lacks ``attrs["settings"]``.
BUDGETS = ("budget_fraction", "budget_tokens")


# ---- accuracy vs budget / window ---------------------------------------------------------------------


_XLABELS = {
    "budget_fraction": "budget (fraction of context)",
    "budget_tokens": "budget (tokens)",
    "num_questions": "questions per prompt (n)",
    "window": "retrospective window w",
}


def metric_vs(
    df: Any, x: str, metric: str = "accuracy", hue: str = "label", facet: str | None = None
) -> Figure:
    """``metric`` (mean, 95% CI over rows) against column ``x``, one line per ``hue`` value (split
    further by any :data:`SPLIT` column that varies, so different settings are never pooled), one
    panel per ``facet`` value."""
    if df.empty or x not in df.columns or metric not in df.columns:
        return empty(f"no rows with {x} and {metric}")
    df = df[df[x].notna() & df[metric].notna()]
    if df.empty:
        return empty(f"no rows with {x} and {metric}")
    skip = [facet, x]
    if x.startswith("budget_"):  # the other budget column is null whenever this one is set
        skip.append("budget_tokens" if x == "budget_fraction" else "budget_fraction")
    panels = facet_groups(df, facet)
    fig, axes = figure(len(panels))
    for ax, (value, part) in zip(axes, panels):
        part = series_column(part, hue, skip=skip)
        for name, group in part.groupby("_series", dropna=False, sort=True):
            errorbar(ax, summary(group, [x], metric), x, metric, str(name))
        ax.set_xlabel(_XLABELS.get(x, x))
        ax.set_ylabel(ylabel(metric))
        ax.set_title(f"{facet}={value}" if value is not None else f"{metric} vs {x}")
        ax.grid(alpha=0.3)
        legend(ax)
    return fig


def accuracy_vs_budget(
    df: Any,
    metric: str = "accuracy",
    hue: str = "label",
    facet: str | None = None,
    x: str = "budget_fraction",
) -> Figure:
    """``metric`` (mean, 95% CI) against the budget (``budget_fraction``, or ``x="budget_tokens"``),
    one line per ``hue`` value, one panel per ``facet`` value (e.g. ``"dataset"``)."""
    return metric_vs(df, x, metric, hue, facet)


def accuracy_vs_questions(
    df: Any, metric: str = "accuracy", hue: str = "label", facet: str | None = None
) -> Figure:
    """``metric`` (mean, 95% CI) against LongGenBench's questions per prompt n."""
    return metric_vs(df, "num_questions", metric, hue, facet)


def _strip_window(label: str) -> str:
    label = str(label)
    if "(" not in label:
        return label
    method, inside = label.split("(", 1)
    parts = [p for p in inside.rstrip(")").split(", ") if p and not p.startswith("w=")]
    return f"{method}({', '.join(parts)})" if parts else method


def _shared_settings(df: Any, method: str, base: str) -> list[str]:
    """The setting columns both ``method`` and its ``base`` recorded (``df.attrs["settings"]``, set by
    the store's reader): what a base run must agree on to stand in for w = 1."""
    recorded = df.attrs.get("settings") or {}
    if not recorded:
        return [c for c in BUDGETS if c in df.columns]
    return [c for c in recorded.get(method, ()) if c in recorded.get(base, ()) and c in df.columns]


def window_frame(df: Any) -> Any:
    """Rows for window plots: the rows of runs that recorded a base method and a window (retro), plus
    each variant's base runs (same shared settings and budget) as ``window = 1``; ``series`` names the
    variant (its label without ``w=``), e.g. ``retro`` or ``retro(past_query=cached)``."""
    import pandas as pd

    if df.empty or not {"method", "base", "window"} <= set(df.columns):
        return df.assign(series=pd.Series(dtype=object)).iloc[0:0]
    wrapped = df[df["base"].notna() & df["window"].notna()].copy()
    if wrapped.empty:
        return wrapped.assign(series=pd.Series(dtype=object))
    wrapped["series"] = [_strip_window(v) for v in wrapped["label"]]
    frames = [wrapped]
    same = [c for c in ("model", "task", "dataset", "num_questions") if c in df.columns]  # same experiment
    for (method, base), pair in wrapped.groupby(["method", "base"], sort=True):
        shared = _shared_settings(df, str(method), str(base))
        for (series, *values), _ in pair.groupby(["series", *shared, *same], dropna=False, sort=True):
            _add_base_rows(df, frames, str(base), series, [*shared, *same], values, same)
    out = pd.concat(frames, ignore_index=True)
    return out


def _add_base_rows(df: Any, frames: list[Any], base: str, series: Any, columns: list[str], values: list[Any],
                   same: list[str]) -> None:
    """Append the ``base`` runs that agree with one variant's ``values`` of ``columns`` as w = 1."""
    base_rows = df[df["method"] == base]
    for col, value in zip(columns, values):
        if value is None or (isinstance(value, float) and math.isnan(value)):
            if col.startswith("budget") or col in same:
                base_rows = base_rows[base_rows[col].isna()]
            continue  # a setting left to the base's default (null) accepts any base value
        base_rows = select(base_rows, {col: value})
    if not base_rows.empty:
        frames.append(base_rows.assign(window=1.0, series=series))


def _window_plot(
    df: Any, metric: str, facet: str | None, ylabel: str, split: Sequence[str] = SPLIT
) -> tuple[Figure, list[Any]] | Figure:
    frame = window_frame(df)
    if frame.empty or metric not in frame.columns or frame[metric].notna().sum() == 0:
        return empty(f"no retro rows with {metric}")
    frame = frame[frame[metric].notna()]
    panels = facet_groups(frame, facet)
    fig, axes = figure(len(panels))
    for ax, (value, part) in zip(axes, panels):
        part = series_column(part, "series", skip=(facet,), split=split)
        for name, group in part.groupby("_series", sort=True):
            errorbar(ax, summary(group, ["window"], metric), "window", metric, str(name))
        windows = sorted(part["window"].dropna().unique())
        ax.set_xscale("log", base=2)
        ax.set_xticks(windows, [short(float(w)) for w in windows])
        ax.set_xlabel("retrospective window w (1 = base method)")
        ax.set_ylabel(ylabel)
        ax.set_title(f"{facet}={value}" if value is not None else f"{metric} vs window")
        ax.grid(alpha=0.3)
    return fig, axes


def accuracy_vs_window(df: Any, metric: str = "accuracy", facet: str | None = None) -> Figure:
    """``metric`` (mean, 95% CI) against retro's window w, the base method drawn at w = 1; one line
    per retro variant (and budget), one panel per ``facet`` value."""
    out = _window_plot(df, metric, facet, ylabel(metric))
    if isinstance(out, Figure):
        return out
    fig, axes = out
    for ax in axes:
        legend(ax)
    return fig


def exposure_vs_window(df: Any, paper: bool = True, facet: str | None = None) -> Figure:
    """Effective KV exposure (mean, 95% CI) against w, with the paper's ≈1.17 (w=2) and ≈1.6 (w=8)
    marked when ``paper``."""
    from retrobench.report.paper_numbers import exposure_points

    out = _window_plot(df, "exposure", facet, "effective KV exposure (x own selection)",
                       split=("model", "budget_fraction", "budget_tokens"))  # fmt: skip
    if isinstance(out, Figure):
        return out
    fig, axes = out
    for ax in axes:
        ax.axhline(1.0, color="grey", lw=0.8, ls=":")
        if paper:
            points = exposure_points()
            ax.scatter(list(points), list(points.values()), marker="x", s=60, color="black", zorder=5,
                       label="paper (Llama-3.1-8B)")  # fmt: skip
        legend(ax)
    return fig


def exposure_vs_accuracy(df: Any, metric: str = "accuracy", hue: str = "label") -> Figure:
    """One point per run: mean exposure (x) against mean ``metric`` with its 95% CI (y)."""
    if df.empty or "exposure" not in df.columns or metric not in df.columns:
        return empty(f"no rows with exposure and {metric}")
    df = df[df["exposure"].notna() & df[metric].notna()]
    if df.empty:
        return empty(f"no rows with exposure and {metric}")
    fig, (ax,) = figure()
    scale = metric_scale(metric)
    for name, group in df.groupby(hue, dropna=False, sort=True):
        xs, ys, lo, hi = [], [], [], []
        for _, run in group.groupby("run", sort=True):
            values = run[metric].to_numpy(float)
            low, high = bootstrap_ci(values)
            xs.append(float(run["exposure"].mean()))
            ys.append(float(values.mean()) * scale)
            lo.append(low * scale)
            hi.append(high * scale)
        ys_a = np.asarray(ys)
        ax.errorbar(xs, ys, yerr=[np.maximum(ys_a - lo, 0), np.maximum(np.asarray(hi) - ys_a, 0)],
                    fmt="o", capsize=3, label=str(name))  # fmt: skip
    ax.set_xlabel("effective KV exposure (x own selection)")
    ax.set_ylabel(ylabel(metric))
    ax.set_title(f"{metric} vs exposure (one point per run)")
    ax.grid(alpha=0.3)
    legend(ax)
    return fig


# ---- perplexity over position ------------------------------------------------------------------------


def bucket_columns(df: Any) -> list[tuple[int, str]]:
    """``[(i, "nll_ratio_bucket_<i>")]`` present in ``df`` with at least one value, by i."""
    found = []
    for col in getattr(df, "columns", []):
        match = _BUCKET.match(str(col))
        if match and df[col].notna().any():
            found.append((int(match.group(1)), str(col)))
    return sorted(found)


def ppl_ratio_over_position(df: Any, hue: str = "label", facet: str | None = None) -> Figure:
    """The paper's Figure 1b (right): perplexity ratio to full attention per generated-position
    bucket (``nll_ratio_bucket_<i>`` columns; mean and 95% CI over rows), one line per ``hue``.

    The x axis is the bucket's last position when ``task.bucket_tokens`` is known, else its index.
    """
    buckets = bucket_columns(df)
    if not buckets:
        return empty("no nll_ratio_bucket_<i> columns")
    size = None
    if "task.bucket_tokens" in df.columns and df["task.bucket_tokens"].nunique() == 1:
        size = float(df["task.bucket_tokens"].dropna().iloc[0])
    panels = facet_groups(df, facet)
    fig, axes = figure(len(panels))
    for ax, (value, part) in zip(axes, panels):
        part = series_column(part, hue, skip=(facet,))
        for name, group in part.groupby("_series", dropna=False, sort=True):
            xs, mean, lo, hi = [], [], [], []
            for i, col in buckets:
                values = group[col].to_numpy(float)
                values = values[np.isfinite(values)]
                if values.size == 0:
                    continue
                low, high = bootstrap_ci(values)
                xs.append((i + 1) * size if size else i)
                mean.append(values.mean())
                lo.append(low)
                hi.append(high)
            if xs:
                ax.plot(xs, mean, marker="o", label=str(name))
                ax.fill_between(xs, lo, hi, alpha=0.2)
        ax.axhline(1.0, color="grey", lw=0.8, ls=":")
        ax.set_xlabel("generated position (tokens)" if size else "position bucket")
        ax.set_ylabel("perplexity ratio to full attention")
        ax.set_title(f"{facet}={value}" if value is not None else "perplexity ratio over position")
        ax.grid(alpha=0.3)
        legend(ax)
    return fig


def paired_differences(diff: Any, metric: str = "accuracy", by: str | Sequence[str] | None = None) -> Figure:
    """Paired differences (rows of :func:`retrobench.report.paired`: mean, ci_low, ci_high,
    label_a, label_b) as points with 95% CIs, zero marked; in pp for percent metrics."""
    if diff.empty:
        return empty("no paired differences")
    scale = metric_scale(metric)
    by = [by] if isinstance(by, str) else list(by or [])
    names = []
    for _, row in diff.iterrows():
        parts = [f"{row['label_a']} − {row['label_b']}"]
        parts += [f"{SHORT_NAMES.get(c, c)}={short(row[c])}" for c in by + ["num_questions", "budget_fraction"]
                  if c in diff.columns
                  and row[c] is not None and not (isinstance(row[c], float) and math.isnan(row[c]))]  # fmt: skip
        names.append(", ".join(dict.fromkeys(parts)))
    mean = diff["mean"].to_numpy(float) * scale
    low = diff["ci_low"].to_numpy(float) * scale
    high = diff["ci_high"].to_numpy(float) * scale
    fig = Figure(figsize=(7, 0.9 + 0.35 * len(diff)), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    ys = np.arange(len(diff))[::-1]
    ax.errorbar(mean, ys, xerr=[np.maximum(mean - low, 0), np.maximum(high - mean, 0)], fmt="o", capsize=3)
    ax.axvline(0.0, color="grey", lw=0.8, ls=":")
    ax.set_yticks(ys, names, fontsize=8)
    ax.set_xlabel(f"paired difference in {metric}" + (" (pp)" if metric in PERCENT else ""))
    ax.grid(alpha=0.3, axis="x")
    return fig


__all__ = [
    "accuracy_vs_budget",
    "accuracy_vs_questions",
    "accuracy_vs_window",
    "bucket_columns",
    "decode_time_over_position",
    "exposure_vs_accuracy",
    "exposure_vs_window",
    "latency_series",
    "latency_vs_context",
    "metric_vs",
    "paired_differences",
    "ppl_ratio_over_position",
    "window_frame",
]
