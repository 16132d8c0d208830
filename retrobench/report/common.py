"""Conventions and small value helpers shared by every :mod:`retrobench.report` module.

Kept apart (and importing nothing of the package) so that loading, statistics, the paper
comparison and rendering share one definition of which metrics are percentages, which methods
are bases, the method order in tables, and how a value is shortened, tested for missing or made
numeric.
"""

from __future__ import annotations

import math
from typing import Any

#: Metrics stored as fractions in [0, 1] and shown in percent.
PERCENT = frozenset({"accuracy", "completion", "top1_agreement", "mass_recall"})

#: Methods that select (and can be wrapped by retro as ``method.base``).
BASES = ("quest", "infllm", "oracle")

#: Preferred order of methods in tables.
METHOD_ORDER = ("full", "streaming", "tova", "infllm", "quest", "oracle", "retro")


def _scale(metric: str) -> float:
    return 100.0 if metric in PERCENT else 1.0


def _short(value: Any) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _none(value: Any) -> Any:
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else value


def _numeric(series: Any) -> Any:
    import pandas as pd

    return pd.to_numeric(series, errors="coerce").astype(float)
