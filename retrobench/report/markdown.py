"""Rendering: markdown tables (:func:`to_markdown`), ``mean [CI]`` cells (:func:`cell`), wide
tables of cells (:func:`pivot_cells`), and the writer that accumulates report.md with its CSV
tables and PNG plots.

Kept apart so that every number reaches the page through one set of formatting rules.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from retrobench.report.common import METHOD_ORDER, PERCENT, metric_scale, short
from retrobench.report.stats import equal, groups


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return ""
    if isinstance(value, (bool, np.bool_)):
        return "yes" if value else "no"
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        if math.isnan(value):
            return ""
        if float(value).is_integer() and abs(value) < 1e6:
            return str(int(value))
        return f"{value:.{digits}g}"
    return str(value)


def to_markdown(df: Any, digits: int = 4) -> str:
    """A GitHub markdown table of ``df`` (no tabulate needed); floats with ``digits`` significant digits."""
    if df is None or len(df.columns) == 0:
        return "(empty)\n"
    header = [str(c) for c in df.columns]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    for row in df.itertuples(index=False):
        cells = [_fmt(v, digits).replace("|", "\\|").replace("\n", " ") for v in row]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def cell(mean: float, low: float, high: float, metric: str = "", digits: int | None = None) -> str:
    """``"56.5 [52.1, 60.9]"``: a mean and its CI, in percent for :data:`PERCENT` metrics."""
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return ""
    scale = metric_scale(metric)
    if digits is None and metric in PERCENT:
        return f"{mean * scale:.1f} [{low * scale:.1f}, {high * scale:.1f}]"
    d = digits or 4
    return f"{mean * scale:.{d}g} [{low * scale:.{d}g}, {high * scale:.{d}g}]"


def _method_key(label: str) -> tuple[int, str]:
    method = str(label).split("(")[0]
    rank = METHOD_ORDER.index(method) if method in METHOD_ORDER else len(METHOD_ORDER)
    return rank, str(label)


def pivot_cells(stats: Any, rows: Sequence[str], column: str, metric: str) -> Any:
    """A wide table of ``mean [ci]`` cells: one row per ``rows`` group, one column per ``column`` value."""
    import pandas as pd

    if stats.empty:
        return pd.DataFrame(columns=list(rows))
    stats = stats.copy()
    stats["cell"] = [
        cell(m, lo, hi, metric) for m, lo, hi in zip(stats["mean"], stats["ci_low"], stats["ci_high"])
    ]
    values = list(stats[column].dropna().unique())
    values = sorted(values, key=_method_key) if column == "label" else sorted(values)
    out = []
    for key, group in groups(stats, rows):
        row = dict(zip(rows, key))
        for value in values:
            hit = group[equal(group[column], value)]
            row[short(value) if column != "label" else value] = hit["cell"].iloc[0] if len(hit) else ""
        out.append(row)
    return pd.DataFrame(out)


class Writer:
    """Accumulates report.md text, CSV tables and PNG plots under ``out_dir``."""

    def __init__(self, out_dir: Path) -> None:
        self.out = out_dir
        self.lines: list[str] = []
        self.tables: list[str] = []
        self.plots: list[str] = []

    def text(self, *lines: str) -> None:
        self.lines.extend(lines)
        self.lines.append("")

    def table(self, name: str, frame: Any, shown: Any = None, digits: int = 4) -> None:
        """Write ``frame`` to ``tables/<name>.csv`` and ``shown`` (default: ``frame``) into the markdown."""
        (self.out / "tables").mkdir(parents=True, exist_ok=True)
        frame.to_csv(self.out / "tables" / f"{name}.csv", index=False)
        self.tables.append(name)
        shown = frame if shown is None else shown
        empty = [c for c in shown.columns if shown[c].map(lambda v: _fmt(v) == "").all()]
        if len(empty) < len(shown.columns) and len(shown):
            shown = shown.drop(columns=empty)  # e.g. budget_tokens when no run sets it; the CSV keeps it
        self.lines.append(to_markdown(shown, digits))
        self.lines.append(f"(table: `tables/{name}.csv`)")
        self.lines.append("")

    def figure(self, name: str, fig: Any, caption: str) -> None:
        (self.out / "plots").mkdir(parents=True, exist_ok=True)
        fig.savefig(self.out / "plots" / f"{name}.png", dpi=110, bbox_inches="tight")
        self.plots.append(name)
        self.lines.append(f"![{caption}](plots/{name}.png)")
        self.lines.append("")

    def none(self, why: str = "") -> None:
        self.text("no runs" + (f" ({why})" if why else ""))
