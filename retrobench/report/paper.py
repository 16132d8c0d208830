"""Our numbers beside the paper's (:mod:`retrobench.report.paper_numbers`): :func:`paper_table`.

Kept apart from the statistics it builds on because it is the one place that knows how a
paper number (mean, paired delta, latency delta) maps to our samples and benchmark CSVs.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from retrobench.report.common import metric_scale, none_if_nan, short
from retrobench.report.load import is_latency_frame
from retrobench.report.stats import groups, latency_overhead, paired, select, summary


def _values_note(df: Any, column: str, name: str) -> str:
    if column not in df.columns:
        return ""
    values = sorted(set(df[column].dropna()), key=lambda v: (isinstance(v, str), v))
    values = list(dict.fromkeys(short(v) for v in values))
    return f"{name}={','.join(values)}" if values else ""


def paper_table(
    samples: Any,
    bench: Mapping[str, Any] | None = None,
    numbers: Sequence[Any] | None = None,
    same_model_only: bool = False,
) -> Any:
    """Our numbers beside the paper's (:data:`retrobench.report.paper_numbers.PAPER_NUMBERS`).

    One row per paper number and per (our model, our label[s]) that matches it, or one row with
    ``ours`` NaN and ``note`` "no runs" when nothing does. A number's ``match`` selects samples
    (all keys but ``model``); ``mean`` numbers pool the matching samples (e.g. over every
    num_questions present), ``delta`` numbers are :func:`paired` differences, ``latency_delta``
    numbers come from the benchmark CSVs (retro - quest p50 step time at the same context, budget
    and batch; mean over contexts). Our runs of another model are listed too (``same_model``
    False) unless ``same_model_only``: their gap is context, not a reproduction check.

    Columns: key, quantity, unit, bound, paper, paper_model, model, label, ours, ci_low, ci_high,
    n, gap (ours - paper), same_model, note, source. Percent metrics are in % (pp for deltas).
    """
    import pandas as pd

    from retrobench.report.paper_numbers import PAPER_NUMBERS

    numbers = PAPER_NUMBERS if numbers is None else numbers
    columns = [
        "key", "quantity", "unit", "bound", "paper", "paper_model", "model", "label", "ours",
        "ci_low", "ci_high", "n", "gap", "same_model", "note", "source",
    ]  # fmt: skip
    rows: list[dict[str, Any]] = []
    for number in numbers:
        if number.kind not in ("mean", "delta", "latency_delta"):
            continue
        base = {
            "key": number.key,
            "quantity": number.quantity,
            "unit": number.unit,
            "bound": number.bound,
            "paper": number.value,
            "paper_model": number.model,
            "source": number.source,
        }
        found = _paper_rows(number, samples, bench or {})
        if same_model_only:
            found = [r for r in found if r["model"] == number.model or number.model is None]
        if not found:
            rows.append({**base, "n": 0, "note": "no runs"})
            continue
        for row in found:
            row["gap"] = row["ours"] - number.value
            row["same_model"] = None if number.model is None else row["model"] == number.model
            rows.append({**base, **row})
    frame = pd.DataFrame(rows, columns=columns)
    return frame


def _paper_rows(number: Any, samples: Any, bench: Mapping[str, Any]) -> list[dict[str, Any]]:
    match = {k: v for k, v in number.match.items() if k != "model"}
    scale = metric_scale(number.metric)
    out: list[dict[str, Any]] = []
    if number.kind == "mean":
        chosen = select(samples, match) if not samples.empty else samples
        if chosen.empty:
            return out
        for key, group in groups(chosen, ["model", "label", "budget_fraction", "budget_tokens"]):
            s = summary(group, [], number.metric)
            if s.empty:
                continue
            s = s.iloc[0]
            notes = [_values_note(group, c, n) for c, n in (
                ("budget_fraction", "b"), ("budget_tokens", "budget"), ("task", "task"), ("dataset", "dataset"),
                ("num_questions", "n"), ("seed", "seeds"))]  # fmt: skip
            out.append({
                "model": key[0],
                "label": key[1],
                "ours": s["mean"] * scale,
                "ci_low": s["ci_low"] * scale,
                "ci_high": s["ci_high"] * scale,
                "n": int(s["n"]),
                "note": "; ".join(n for n in notes if n),
            })  # fmt: skip
    elif number.kind == "delta":
        versus = {k: v for k, v in number.versus.items() if k != "model"}
        side_a, side_b = select(samples, match), select(samples, versus)
        if side_a.empty or side_b.empty:
            return out
        for label_a in sorted(side_a["label"].dropna().unique()):
            for label_b in sorted(side_b["label"].dropna().unique()):
                try:
                    frame = paired(
                        samples, {**match, "label": label_a}, {**versus, "label": label_b}, number.metric,
                        ["model", "budget_fraction", "budget_tokens"],
                    )  # fmt: skip
                except ValueError as exc:  # runs the labels do not tell apart share samples
                    out.append({"model": None, "label": f"{label_a} - {label_b}", "ours": float("nan"),
                                "ci_low": float("nan"), "ci_high": float("nan"), "n": 0,
                                "note": f"not paired: {exc}"})  # fmt: skip
                    continue
                for _, r in frame.iterrows():
                    out.append({
                        "model": r["model"],
                        "label": f"{label_a} - {label_b}",
                        "ours": r["mean"] * scale,
                        "ci_low": r["ci_low"] * scale,
                        "ci_high": r["ci_high"] * scale,
                        "n": int(r["n"]),
                        "note": "paired on (id, seed)" + (
                            "" if none_if_nan(r["budget_fraction"]) is None else f"; b={short(r['budget_fraction'])}"
                        ),
                    })  # fmt: skip
    elif number.kind == "latency_delta":
        for name, frame in bench.items():
            if not is_latency_frame(frame):
                continue
            for row in latency_overhead(frame):
                if match.get("window") is not None and not math.isclose(row["window"], match["window"]):
                    continue
                out.append({
                    "model": row.get("model"),
                    "label": f"retro(w={short(row['window'])}) - quest",
                    "ours": row["mean_ms"],
                    "ci_low": float("nan"),
                    "ci_high": float("nan"),
                    "n": row["contexts"],
                    "note": f"{name}.csv; mean over contexts {row['context_range']}, max {row['max_ms']:.3g} ms; "
                    f"budget={row['budget']}, batch={row['batch']}, device={row['device']}",
                })  # fmt: skip
    return out
