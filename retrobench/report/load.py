"""The benchmark side of the report's inputs: :func:`read_bench` (the benchmark CSVs),
:func:`runs_latency` (runs as a latency table) and :func:`is_latency_frame`.

Runs and samples come from the store's one reader (:func:`retrobench.store.load_runs` /
:func:`~retrobench.store.load_samples`); the report never writes to the store.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from retrobench.report.common import none_if_nan, numeric, short

def read_bench(bench_dir: str | Path) -> dict[str, Any]:
    """``{stem: DataFrame}`` of every ``*.csv`` in ``bench_dir`` (``{}`` when it does not exist)."""
    import pandas as pd

    folder = Path(bench_dir)
    if not folder.is_dir():
        return {}
    return {p.stem: pd.read_csv(p) for p in sorted(folder.glob("*.csv"))}


def runs_latency(runs: Any) -> Any:
    """Runs as a latency table in the benchmark CSV format, for runs that vary the context length.

    One row per (model, device, method, window, budget, backend, ``task.context_tokens``): the mean
    over runs (seeds) of each run's decode-step p10/p50/p90 in ms, ``context`` = prompt tokens
    (``task.context_tokens``), batch 1, and ``runs``. Empty when no task sets ``context_tokens``.
    """
    import pandas as pd

    columns = [
        "model",
        "device",
        "method",
        "window",
        "budget",
        "batch",
        "context",
        "p10_ms",
        "p50_ms",
        "p90_ms",
        "runs",
    ]
    if runs.empty or "task.context_tokens" not in runs.columns or "tpot_p50_s" not in runs.columns:
        return pd.DataFrame(columns=columns)
    frame = runs[runs["task.context_tokens"].notna() & runs["tpot_p50_s"].notna()].copy()
    if frame.empty:
        return pd.DataFrame(columns=columns)
    frame["budget"] = [
        f"{short(f)}" if none_if_nan(f) is not None else (f"{short(t)} tokens" if none_if_nan(t) is not None else "")
        for f, t in zip(frame["budget_fraction"], frame["budget_tokens"])
    ]
    frame["device"] = frame.get("env.device_name", frame.get("device"))
    frame["context"] = numeric(frame["task.context_tokens"]).astype(int)
    for q in ("p10", "p50", "p90"):
        frame[f"{q}_ms"] = numeric(frame.get(f"tpot_{q}_s", np.nan)) * 1000
    keys = ["model", "device", "method", "window", "budget", "context"]
    out = (
        frame.groupby(keys, dropna=False)
        .agg(
            p10_ms=("p10_ms", "mean"),
            p50_ms=("p50_ms", "mean"),
            p90_ms=("p90_ms", "mean"),
            runs=("run", "count"),
        )
        .reset_index()
    )
    out["batch"] = 1
    return out[columns]


def is_latency_frame(frame: Any) -> bool:
    """Whether a benchmark CSV is in the long latency format (method, context, p50_ms, ...)."""
    return {"method", "context", "p50_ms"} <= set(frame.columns)
