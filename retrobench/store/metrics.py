"""Aggregate statistics over samples: summaries, bootstrap confidence intervals, run metrics.

Every aggregate the harness reports is computed here, from the per-sample rows that
``samples.jsonl`` holds, so a resumed run's ``metrics.json`` is computed exactly as an
uninterrupted one's (DESIGN.md "Metrics"). Latency percentiles pool every decode step of every
sample (time per output token); the other metrics are means over samples.

Every aggregate comes with n, mean, std and a percentile-bootstrap 95% CI
(:func:`summarize`, :func:`bootstrap_ci`); method comparisons are paired on the same sample ids
(:func:`paired_difference`, :func:`paired_metric`). The logit-level fidelity measures shared by
the fidelity task and the studies (:func:`kl_per_position`, :func:`agreement`) live here too, so
there is one definition of "KL(full || method)" in the code base.
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
    values: Iterable[Any], n_boot: int = 2000, alpha: float = 0.05, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap ``(low, high)`` confidence interval of the mean (``1 - alpha`` coverage).

    Non-finite values and None are dropped. Deterministic for a given ``seed``. Returns
    ``(nan, nan)`` for no values and ``(x, x)`` for one. Resamples are drawn in blocks, so memory
    stays bounded for long inputs (e.g. every decode step of a run).
    """
    arr = _finite(values)
    if arr.size == 0:
        return (float("nan"), float("nan"))
    if arr.size == 1:
        return (float(arr[0]), float(arr[0]))
    rng = np.random.default_rng(seed)
    block = max(1, min(n_boot, (1 << 22) // arr.size))
    means = np.concatenate([
        arr[rng.integers(0, arr.size, size=(min(block, n_boot - start), arr.size))].mean(axis=1)
        for start in range(0, n_boot, block)
    ])  # fmt: skip
    low, high = np.quantile(means, [alpha / 2, 1 - alpha / 2])
    return (float(low), float(high))


def paired_difference(
    a: Mapping[Any, Any],
    b: Mapping[Any, Any],
    n_boot: int = 2000,
    alpha: float = 0.05,
    seed: int = 0,
) -> dict[str, float]:
    """Statistics of ``a[id] - b[id]`` over the ids present in both with finite values.

    Returns ``{"n", "mean", "std", "ci_low", "ci_high"}`` (std with ddof=1, 0 for n=1; NaN when
    no id is shared). The CI is the percentile bootstrap of the mean difference, so a CI that
    excludes 0 means the methods differ on these samples at level ``alpha``.
    """
    diffs = []
    for key in sorted(set(a) & set(b), key=str):
        x, y = a[key], b[key]
        if x is None or y is None:
            continue
        d = float(x) - float(y)
        if math.isfinite(d):
            diffs.append(d)
    s = summarize(diffs)
    low, high = bootstrap_ci(diffs, n_boot=n_boot, alpha=alpha, seed=seed)
    return {"n": s["n"], "mean": s["mean"], "std": s["std"], "ci_low": low, "ci_high": high}


def paired_metric(
    rows_a: Sequence[Mapping[str, Any]], rows_b: Sequence[Mapping[str, Any]], key: str, **kwargs: Any
) -> dict[str, float]:
    """:func:`paired_difference` of ``score[key]`` between two runs' rows (``samples.jsonl``), by id."""

    def by_id(rows: Sequence[Mapping[str, Any]]) -> dict[Any, Any]:
        return {r["id"]: (r.get("score") or {}).get(key) for r in rows}

    return paired_difference(by_id(rows_a), by_id(rows_b), **kwargs)


# ---- logit-level fidelity ----------------------------------------------------------------------------


def kl_per_position(full: Any, other: Any, chunk: int = 256) -> Any:
    """``KL(full || other)`` in nats per row of ``[N, V]`` logits, in float64 (``[N]`` tensor).

    Rows are processed in chunks so that an ``N x V`` float64 copy never exists at once.
    """
    import torch

    full, other = torch.as_tensor(full), torch.as_tensor(other)
    if full.shape != other.shape:
        raise ValueError(f"logits shapes differ: {tuple(full.shape)} vs {tuple(other.shape)}")
    out = []
    for start in range(0, full.shape[0], chunk):
        lp = torch.log_softmax(full[start : start + chunk].double(), -1)
        lq = torch.log_softmax(other[start : start + chunk].to(lp.device).double(), -1)
        out.append((lp.exp() * (lp - lq)).sum(-1).clamp_min(0.0).cpu())
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.float64)


def agreement(full: Any, other: Any) -> tuple[float, float]:
    """Top-1 agreement and mean KL(full || other) of ``[N, V]`` logits (float64 softmax)."""
    import torch

    full, other = torch.as_tensor(full), torch.as_tensor(other)
    top1 = float((full.argmax(-1) == other.argmax(-1).to(full.device)).double().mean())
    return top1, float(kl_per_position(full, other).mean())


def token_nll(logits: Any, targets: Any, chunk: int = 256) -> Any:
    """Negative log-likelihood in nats of ``targets [N]`` under ``logits [N, V]`` (float64 ``[N]``)."""
    import torch

    logits = torch.as_tensor(logits)
    targets = torch.as_tensor(targets, dtype=torch.long)
    out = []
    for start in range(0, logits.shape[0], chunk):
        lp = torch.log_softmax(logits[start : start + chunk].double(), -1)
        t = targets[start : start + chunk].to(lp.device)
        out.append(-lp.gather(-1, t[:, None])[:, 0].cpu())
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.float64)


def _mean(values: Sequence[Any]) -> float:
    arr = _finite(values)
    return float(arr.mean()) if arr.size else float("nan")


def aggregate(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Run-level metrics from per-sample rows (the lines of ``samples.jsonl``).

    Returns
    -------
    ``{"metrics": {name: float}, "summaries": {name: summarize(...) + ci_low/ci_high}}`` where
    ``metrics`` holds n, accuracy and completion (null when the task does not score them, e.g.
    ppl), the mean of every other numeric per-sample score key (ppl's ``nll_bucket_<i>``,
    fidelity's ``kl_full_method``...), attended_kv, resident_kv, pages_selected,
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
    for key in ("accuracy", "completion"):  # always reported; null when the task has no such score
        metrics[key] = _mean(per_sample.get(key, []))
    for key in score_keys:
        if key not in metrics:
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


__all__ = [
    "STAT_KEYS",
    "aggregate",
    "agreement",
    "bootstrap_ci",
    "kl_per_position",
    "paired_difference",
    "paired_metric",
    "summarize",
    "token_nll",
]
