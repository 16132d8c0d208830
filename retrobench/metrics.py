"""Aggregate statistics over samples: summaries, bootstrap confidence intervals, run metrics.

Every aggregate the harness reports is computed here, from the per-sample rows that
``samples.jsonl`` holds, so a resumed run's ``metrics.json`` is computed exactly as an
uninterrupted one's (DESIGN.md "Metrics"). Latency percentiles pool every decode step of every
sample (time per output token); the other metrics are means over samples.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

#: Per-sample engine stats (``Generation.stats``) averaged into the run metrics.
STAT_KEYS = ("attended_kv", "resident_kv", "pages_selected", "exposure")


def _finite(values: Iterable[Any]) -> np.ndarray:
    arr = np.asarray([float(v) for v in values if v is not None], dtype=np.float64)
    return arr[np.isfinite(arr)]


def summarize(values: Iterable[Any]) -> dict[str, float]:
    """n, mean, std (sample, ddof=1; 0 for n=1), p10, p50, p90 of the finite values (NaN when empty)."""
    arr = _finite(values)
    n = int(arr.size)
    if n == 0:
        nan = float("nan")
        return {"n": 0, "mean": nan, "std": nan, "p10": nan, "p50": nan, "p90": nan}
    p10, p50, p90 = np.percentile(arr, [10, 50, 90])
    return {
        "n": n,
        "mean": float(arr.mean()),
        "std": float(arr.std(ddof=1)) if n > 1 else 0.0,
        "p10": float(p10),
        "p50": float(p50),
        "p90": float(p90),
    }


def bootstrap_ci(
    values: Iterable[Any], n_boot: int = 1000, alpha: float = 0.05, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap ``(low, high)`` confidence interval of the mean (``1 - alpha`` coverage).

    Deterministic for a given ``seed``. Returns ``(nan, nan)`` for no values and ``(x, x)`` for one.
    """
    arr = _finite(values)
    if arr.size == 0:
        return (float("nan"), float("nan"))
    if arr.size == 1:
        return (float(arr[0]), float(arr[0]))
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, arr.size, size=(n_boot, arr.size))
    means = arr[idx].mean(axis=1)
    low, high = np.quantile(means, [alpha / 2, 1 - alpha / 2])
    return (float(low), float(high))


def _mean(values: Sequence[Any]) -> float:
    arr = _finite(values)
    return float(arr.mean()) if arr.size else float("nan")


def aggregate(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Run-level metrics from per-sample rows (the lines of ``samples.jsonl``).

    Returns
    -------
    ``{"metrics": {name: float}, "summaries": {name: summarize(...) + ci_low/ci_high}}`` where
    ``metrics`` holds n, accuracy, completion, attended_kv, resident_kv, pages_selected,
    exposure, ttft_p50_s, tpot_p10_s / tpot_p50_s / tpot_p90_s (over all decode steps),
    tokens_per_s (decode), new_tokens, peak_memory_bytes and kv_bytes (max over samples) and
    wall_time_s (sum of per-sample wall times, so resumed runs add up).
    """
    score_keys = sorted({k for r in rows for k, v in r.get("score", {}).items() if _is_number(v)})
    per_sample: dict[str, list[float]] = {k: [r["score"].get(k) for r in rows] for k in score_keys}
    for key in STAT_KEYS:
        per_sample[key] = [r.get("stats", {}).get(key) for r in rows]
    per_sample["ttft_s"] = [r.get("ttft_s") for r in rows]
    per_sample["new_tokens"] = [r.get("new_tokens") for r in rows]
    steps = [t for r in rows for t in r.get("step_times_s", [])]

    metrics: dict[str, float] = {"n": float(len(rows))}
    for key in ("accuracy", "completion", *[k for k in score_keys if k not in ("accuracy", "completion")]):
        if key in per_sample:
            metrics[key] = _mean(per_sample[key])
    for key in STAT_KEYS:
        metrics[key] = _mean(per_sample[key])
    ttft = summarize(per_sample["ttft_s"])
    tpot = summarize(steps)
    metrics.update(
        ttft_p50_s=ttft["p50"],
        tpot_p10_s=tpot["p10"],
        tpot_p50_s=tpot["p50"],
        tpot_p90_s=tpot["p90"],
        tokens_per_s=(len(steps) / sum(steps)) if steps and sum(steps) > 0 else float("nan"),
        new_tokens=_mean(per_sample["new_tokens"]),
        peak_memory_bytes=_max(r.get("stats", {}).get("peak_memory_bytes") for r in rows),
        kv_bytes=_max(r.get("stats", {}).get("kv_bytes") for r in rows),
        wall_time_s=float(sum(float(r.get("wall_s", 0.0)) for r in rows)),
    )
    summaries: dict[str, dict[str, float]] = {}
    for key, values in {**per_sample, "tpot_s": steps}.items():
        summary = summarize(values)
        if summary["n"]:
            summary["ci_low"], summary["ci_high"] = bootstrap_ci(values)
            summaries[key] = summary
    return {"metrics": {k: _clean(v) for k, v in metrics.items()}, "summaries": summaries}


def _max(values: Iterable[Any]) -> float:
    arr = _finite(values)
    return float(arr.max()) if arr.size else float("nan")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float))  # bools count (True = 1)


def _clean(value: float) -> float | None:
    """JSON has no NaN: missing metrics are stored as null."""
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else value


__all__ = ["STAT_KEYS", "aggregate", "bootstrap_ci", "summarize"]
