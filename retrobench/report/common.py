"""Conventions and small value helpers shared by every :mod:`retrobench.report` module.

Kept apart (importing nothing of the report) so that loading, statistics, the paper comparison
and rendering share one definition of which metrics are percentages, the method order in tables,
and how a value is shortened, tested for missing or made numeric. Which method wraps which base,
and the settings they share, is not kept here: it is read from what each run recorded.
"""

from __future__ import annotations

import math
from typing import Any

from retrobench.store.tables import numeric, short  # noqa: F401 - one definition, shared with the store's reader

#: Metrics stored as fractions in [0, 1] and shown in percent.
PERCENT = frozenset({"accuracy", "completion", "top1_agreement", "mass_recall"})

#: Preferred order of methods in tables (display only: which method wraps which base, and what they
#: share, is read from the settings each run recorded).
METHOD_ORDER = ("full", "streaming", "tova", "infllm", "quest", "oracle", "retro")


def metric_scale(metric: str) -> float:
    """100 for a metric shown in percent (:data:`PERCENT`), else 1."""
    return 100.0 if metric in PERCENT else 1.0


def none_if_nan(value: Any) -> Any:
    """``None`` for None or NaN, else the value."""
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else value


__all__ = ["METHOD_ORDER", "PERCENT", "metric_scale", "none_if_nan", "numeric", "short"]
