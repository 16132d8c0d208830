"""Selection, summaries and paired differences over the frames of :mod:`retrobench.report.load`.

:func:`select` filters rows, :func:`summary` gives n, mean, std and a percentile-bootstrap 95% CI
per group, :func:`paired` / :func:`paired_vs_base` the mean difference over matched samples, and
:func:`latency_overhead` retro minus quest step time in a latency CSV. Pure functions over frames,
shared by the paper comparison, the written report and the notebooks.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from retrobench.store.metrics import bootstrap_ci, paired_difference
from retrobench.report.common import none_if_nan, numeric


def equal(series: Any, value: Any) -> Any:
    """Elementwise ``series == value`` where NaN/None equal each other and floats are compared loosely."""
    import pandas as pd

    if value is None or (isinstance(value, float) and math.isnan(value)):
        return series.isna()
    if isinstance(value, (list, tuple, set, frozenset)):
        mask = pd.Series(False, index=series.index)
        for v in value:
            mask |= equal(series, v)
        return mask
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        numbers = pd.to_numeric(series, errors="coerce")
        return pd.Series(
            np.isclose(numbers.to_numpy(float), float(value), rtol=1e-9, atol=1e-12), index=series.index
        )
    return series.astype(object) == value


def select(df: Any, spec: Mapping[str, Any] | Callable[[Any], Any] | None) -> Any:
    """Rows of ``df`` matching ``spec``: ``{column: value}`` (lists match any; ``None`` values are
    ignored; a column ``df`` lacks matches nothing) or a callable ``df -> boolean mask``."""
    if spec is None:
        return df
    if callable(spec):
        return df[spec(df)]
    mask = np.ones(len(df), dtype=bool)
    for column, value in spec.items():
        if value is None:
            continue
        if column not in df.columns:
            return df.iloc[0:0]
        mask &= equal(df[column], value).to_numpy(bool)
    return df[mask]


def groups(df: Any, by: Sequence[str]) -> Iterable[tuple[tuple[Any, ...], Any]]:
    by = list(by)
    if not by:
        yield (), df
        return
    for key, group in df.groupby(by, dropna=False, sort=True):
        yield (key if isinstance(key, tuple) else (key,)), group


def summary(
    df: Any, by: Sequence[str] = (), metric: str = "accuracy", n_boot: int = 2000, seed: int = 0
) -> Any:
    """Per group of ``by``: n (finite values), mean, std, 95% bootstrap CI (ci_low, ci_high) of
    ``metric``, and runs (distinct run hashes). Groups without a finite value are dropped."""
    import pandas as pd

    by = [c for c in by if c in df.columns]
    columns = [*by, "n", "mean", "std", "ci_low", "ci_high", "runs"]
    if metric not in df.columns or df.empty:
        return pd.DataFrame(columns=columns)
    rows = []
    for key, group in groups(df, by):
        values = numeric(group[metric]).to_numpy()
        values = np.sort(values[np.isfinite(values)])  # sorted: the CI does not depend on file order
        if values.size == 0:
            continue
        low, high = bootstrap_ci(values, n_boot=n_boot, seed=seed)
        rows.append({
            **dict(zip(by, key)),
            "n": int(values.size),
            "mean": float(values.mean()),
            "std": float(values.std(ddof=1)) if values.size > 1 else 0.0,
            "ci_low": low,
            "ci_high": high,
            "runs": int(group["run"].nunique()) if "run" in group.columns else len(group),
        })  # fmt: skip
    return pd.DataFrame(rows, columns=columns)


def paired(
    samples: Any,
    a: Mapping[str, Any] | Callable[[Any], Any],
    b: Mapping[str, Any] | Callable[[Any], Any],
    metric: str = "accuracy",
    by: Sequence[str] = (),
    key: Sequence[str] = ("id", "seed"),
    n_boot: int = 2000,
    seed: int = 0,
) -> Any:
    """Paired difference ``a - b`` of ``metric`` over samples matched by ``key`` within each ``by`` group.

    ``a`` and ``b`` are :func:`select` specs (e.g. ``{"label": "retro(w=2)"}`` and
    ``{"method": "quest"}``). Returns one row per group where both sides share a sample:
    ``by`` columns, n (pairs), mean, std, ci_low, ci_high (:func:`retrobench.store.metrics.paired_difference`),
    ``label_a`` / ``label_b`` (the labels on each side). A sample key present in two ``a`` (or two
    ``b``) runs of one group is ambiguous and raises ``ValueError``: narrow the spec or add ``by``.
    """
    import pandas as pd

    by = [c for c in by if c in samples.columns]
    columns = [*by, "n", "mean", "std", "ci_low", "ci_high", "label_a", "label_b"]
    side_a, side_b = select(samples, a), select(samples, b)
    if metric not in samples.columns or side_a.empty or side_b.empty:
        return pd.DataFrame(columns=columns)
    rows = []
    for group_key, group_a in groups(side_a, by):
        group_b = select(side_b, dict(zip(by, [none_if_nan(v) for v in group_key]))) if by else side_b
        if by:  # select() ignores None values: NaN keys must match NaN explicitly
            for col, value in zip(by, group_key):
                if none_if_nan(value) is None:
                    group_b = group_b[group_b[col].isna()]
        if group_b.empty:
            continue
        values_a, values_b = _by_key(group_a, key, metric, "a"), _by_key(group_b, key, metric, "b")
        stats = paired_difference(values_a, values_b, n_boot=n_boot, seed=seed)
        if not stats["n"]:
            continue
        rows.append({
            **dict(zip(by, group_key)),
            **stats,
            "label_a": _join(group_a, "label"),
            "label_b": _join(group_b, "label"),
        })  # fmt: skip
    return pd.DataFrame(rows, columns=columns)


def _join(df: Any, column: str) -> str:
    if column not in df.columns:
        return ""
    return ", ".join(sorted({str(v) for v in df[column].dropna()}))


def _by_key(df: Any, key: Sequence[str], metric: str, side: str) -> dict[Any, Any]:
    cols = [c for c in key if c in df.columns]
    dup = df.duplicated(subset=cols, keep=False)
    if dup.any():
        runs = ", ".join(sorted({f"{r.label} ({r.run})" for r in df[dup].itertuples()}))
        raise ValueError(
            f"paired: side {side} has several runs for the same sample {tuple(cols)}: {runs}; narrow the filter"
        )
    return {tuple(row[c] for c in cols): row[metric] for _, row in df.iterrows()}


def paired_vs_base(samples: Any, metric: str, by: Sequence[str] = (), **kwargs: Any) -> Any:
    """:func:`paired` of every retro label against every label of its base method, same budget.

    Returns the rows of all pairs (columns as :func:`paired`), grouped by ``by`` plus
    ``budget_fraction`` and ``budget_tokens``.
    """
    import pandas as pd

    if samples.empty or "method" not in samples.columns:
        return paired(samples, {"method": "retro"}, {"method": "quest"}, metric, by)
    retro = samples[samples["base"].notna()] if "base" in samples.columns else samples.iloc[0:0]  # runs over a base
    frames = []
    group_by = [*by, "budget_fraction", "budget_tokens"]
    for label in sorted(retro["label"].dropna().unique()):
        bases = retro.loc[retro["label"] == label, "base"].dropna().unique()
        for base in bases:
            for base_label in sorted(samples.loc[samples["method"] == base, "label"].dropna().unique()):
                frame = paired(samples, {"label": label}, {"label": base_label}, metric, group_by, **kwargs)
                if not frame.empty:
                    frames.append(frame)
    if not frames:
        return paired(samples.iloc[0:0], {}, {}, metric, group_by)
    return pd.concat(frames, ignore_index=True)


def latency_overhead(frame: Any) -> list[dict[str, Any]]:
    """Retro minus quest ``p50_ms`` at equal context (and budget, batch, model, device) in a latency CSV.

    One dict per (retro window, budget, batch, model, device): mean_ms and max_ms over the contexts
    both methods were measured at, contexts (count) and context_range.
    """
    frame = frame[frame["op"] == "decode_step"] if "op" in frame.columns else frame  # decode.csv: steps only
    frame = frame.copy()
    for col in ("window", "budget", "batch", "model", "device"):
        if col not in frame.columns:
            frame[col] = None
    frame["window"] = numeric(frame["window"])
    retro = frame[frame["method"] == "retro"]
    quest = frame[frame["method"] == "quest"]
    out = []
    keys = ["budget", "batch", "model", "device"]
    for (window, *rest), group in retro.groupby(["window", *keys], dropna=False, sort=True):
        spec = dict(zip(keys, rest))
        base = quest
        for col, value in spec.items():
            base = base[equal(base[col], none_if_nan(value))]
        merged = group.merge(base[["context", "p50_ms"]], on="context", suffixes=("", "_quest"))
        if merged.empty:
            continue
        diff = (merged["p50_ms"] - merged["p50_ms_quest"]).to_numpy(float)
        contexts = sorted(merged["context"].tolist())
        out.append({
            "window": float(window),
            **{k: none_if_nan(v) for k, v in spec.items()},
            "mean_ms": float(diff.mean()),
            "max_ms": float(diff.max()),
            "contexts": len(contexts),
            "context_range": f"{contexts[0]}-{contexts[-1]}" if len(contexts) > 1 else str(contexts[0]),
        })  # fmt: skip
    return out
