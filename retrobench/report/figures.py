"""The figure helpers the plot modules share: an Agg figure of panels, facets, error bars with
95 % CIs, series labels that never pool different settings, legends.

Figures are created without pyplot on the Agg canvas (no global state, no display needed).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from retrobench.report.common import PERCENT, metric_scale, short


def figure(panels: int = 1, width: float = 5.0, height: float = 3.6) -> tuple[Figure, list[Any]]:
    cols = max(1, min(panels, 3))
    rows = max(1, math.ceil(panels / cols))
    fig = Figure(figsize=(width * cols, height * rows), layout="constrained")
    FigureCanvasAgg(fig)
    axes = [fig.add_subplot(rows, cols, i + 1) for i in range(max(panels, 1))]
    return fig, axes


def empty(message: str) -> Figure:
    fig, (ax,) = figure()
    ax.text(0.5, 0.5, message, ha="center", va="center", transform=ax.transAxes)
    ax.set_axis_off()
    return fig


def ylabel(metric: str) -> str:
    return f"{metric} (%)" if metric in PERCENT else metric


def facet_groups(df: Any, facet: str | None) -> list[tuple[Any, Any]]:
    if facet is None or facet not in df.columns or df[facet].nunique(dropna=False) <= 1:
        return [(None, df)]
    return [(value, group) for value, group in df.groupby(facet, dropna=False, sort=True)]


def errorbar(ax: Any, stats: Any, x: str, metric: str, label: str, **kwargs: Any) -> None:
    stats = stats.sort_values(x)
    scale = metric_scale(metric)
    mean = stats["mean"].to_numpy(float) * scale
    low = stats["ci_low"].to_numpy(float) * scale
    high = stats["ci_high"].to_numpy(float) * scale
    ax.errorbar(
        stats[x].to_numpy(float),
        mean,
        yerr=[np.maximum(mean - low, 0), np.maximum(high - mean, 0)],
        marker="o",
        capsize=3,
        label=label,
        **kwargs,
    )


#: Columns that split a line when they vary within a panel (never pool different settings silently).
SPLIT = ("model", "task", "dataset", "num_questions", "budget_fraction", "budget_tokens")


SHORT_NAMES = {"num_questions": "n", "budget_fraction": "b", "budget_tokens": "budget"}


def series_column(df: Any, name: str, skip: Sequence[str | None] = (), split: Sequence[str] = SPLIT) -> Any:
    """``df`` with a ``_series`` column: column ``name``'s value plus ``col=value`` for every
    ``split`` column (not in ``skip``) that takes more than one value in ``df``."""
    df = df.copy()
    base = [str(v) for v in df[name]] if name in df.columns else [""] * len(df)
    cols = [
        c
        for c in split
        if c in df.columns and c not in skip and c != name and df[c].nunique(dropna=False) > 1
    ]
    for col in cols:
        values = ["-" if v is None or (isinstance(v, float) and math.isnan(v)) else short(v) for v in df[col]]
        base = [f"{b}, {SHORT_NAMES.get(col, col)}={v}" for b, v in zip(base, values)]
    df["_series"] = base
    return df


def legend(ax: Any) -> None:
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
