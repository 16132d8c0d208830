"""The RetroAttention paper's published numbers, each with where it comes from.

Everything here is copied from ``reference/paper.md`` of the project (sections 1, 3 and 5), which
tags every claim by source; the tag is kept in :attr:`PaperNumber.source`:

- ``[N]`` a detailed third-party note of the ICLR-2026 version (numbers look copied from the
  paper's tables; secondhand),
- ``[V]`` the paper's own text (abstract / Figure-1 caption),
- ``[R]`` the OpenReview reviews,
- ``[W]`` wizwand's "related benchmarks" list (model and setting not stated; not matched to runs).

:mod:`retrobench.report` joins these with our runs (:func:`retrobench.report.paper_table`). A
number is matched to runs by :attr:`PaperNumber.match`: column -> value of the runs table
(``None`` values are ignored; floats compare with a tolerance). ``kind`` says what our side is:

- ``mean``: the mean of ``metric`` over the matching samples (accuracy in %, exposure as a ratio);
- ``delta``: the paired difference ``a - b`` of ``metric`` on the same sample ids, where ``a`` is
  :attr:`match` and ``b`` is :attr:`versus` (e.g. retro - quest, in percentage points);
- ``latency_delta``: retro - quest decode step time (ms) from the benchmark CSVs.

Percent metrics (accuracy) are stored here in percent, as the paper prints them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

LLAMA = "llama31_8b_instruct"  # meta-llama/Llama-3.1-8B-Instruct (conf/model/llama31_8b_instruct.yaml)
R1_LLAMA = "r1_distill_llama_8b"  # deepseek-ai/DeepSeek-R1-Distill-Llama-8B
QWEN14 = "qwen25_14b_instruct"
QWEN32 = "qwen25_32b_instruct"

#: Where each source tag points (paper.md sections).
MAIN = (
    "paper.md §5.1 main LongGenBench table [N] (Llama-3.1-8B-Instruct, b=0.15, w=2; mean over n=15/30/45 [I])"
)
BY_N = "paper.md §5.1 per-n gaps [N]"
MOTIVATION = "paper.md §1 budget sensitivity [N] (5% budget, LongGenBench)"
REASONING = "paper.md §5.3 reasoning table [N] (R1-Distill-Llama-8B, b=0.15, w=2, pass@1)"
LARGER = "paper.md §5.2 larger models [N] (average over n; budget/window as main [I])"
EXPOSURE = "paper.md §1 Observation 2 / §5.4 [N]; abstract 'up to 1.6x' [V]"
LATENCY = "paper.md §3 / §5.5 [N] (overhead vs Quest, independent of context length)"
REUSE = "paper.md §1 / §5.5 selection reuse on Quest [N]"
WIZWAND = "paper.md §5.6 wizwand [W] (model and setting not stated)"


@dataclass(frozen=True)
class PaperNumber:
    """One number of the paper and the runs it is compared with."""

    key: str  #: short unique name, e.g. ``main/gsm8k/quest``
    quantity: str  #: what it is, in words
    value: float
    unit: str  #: ``%``, ``pp`` (percentage points), ``x`` (ratio) or ``ms``
    metric: str  #: column of our tables (``accuracy``, ``exposure``, ``p50_ms``)
    kind: str  #: ``mean`` | ``delta`` | ``latency_delta``
    match: dict[str, Any] = field(default_factory=dict)
    versus: dict[str, Any] = field(default_factory=dict)  #: ``b`` side of a delta
    source: str = ""
    bound: str = "="  #: ``=`` exact, ``<`` an upper bound, ``~`` approximate

    @property
    def model(self) -> str | None:
        return self.match.get("model")


def _main() -> list[PaperNumber]:
    table = {  # paper.md §5.1: Full, StreamingLLM, TOVA, Quest, RetroAttention
        "gsm8k": (61.8, 0.0, 0.2, 52.6, 56.5),
        "mmlu": (59.4, 1.9, 9.3, 54.8, 55.3),
        "csqa": (73.2, 2.0, 8.1, 56.8, 60.3),
    }
    common = {"model": LLAMA, "task": "longgenbench"}
    methods = (
        ("full", {"method": "full"}),
        ("streaming", {"method": "streaming", "budget_fraction": 0.15}),
        ("tova", {"method": "tova", "budget_fraction": 0.15}),
        ("quest", {"method": "quest", "budget_fraction": 0.15}),
        ("retro", {"method": "retro", "base": "quest", "window": 2, "budget_fraction": 0.15}),
    )
    out = []
    for dataset, values in table.items():
        for (name, match), value in zip(methods, values):
            out.append(
                PaperNumber(
                    key=f"main/{dataset}/{name}",
                    quantity=f"LongGenBench {dataset.upper()} accuracy, {name}",
                    value=value,
                    unit="%",
                    metric="accuracy",
                    kind="mean",
                    match={**common, "dataset": dataset, **match},
                    source=MAIN,
                )
            )
        out.append(
            PaperNumber(
                key=f"main/{dataset}/retro-quest",
                quantity=f"LongGenBench {dataset.upper()} accuracy, retro - quest",
                value=round(values[4] - values[3], 1),
                unit="pp",
                metric="accuracy",
                kind="delta",
                match={**common, "dataset": dataset, **dict(methods)["retro"]},
                versus={**common, "dataset": dataset, **dict(methods)["quest"]},
                source=MAIN + "; the table's Δ vs Quest column",
            )
        )
    return out


def _by_n() -> list[PaperNumber]:
    common = {"model": LLAMA, "task": "longgenbench"}
    retro = {"method": "retro", "base": "quest", "window": 2, "budget_fraction": 0.15}
    quest = {"method": "quest", "budget_fraction": 0.15}
    out = [
        PaperNumber(
            key=f"n45/{ds}/retro-quest",
            quantity=f"LongGenBench {ds.upper()} n=45 accuracy, retro - quest",
            value=value,
            unit="pp",
            metric="accuracy",
            kind="delta",
            match={**common, "dataset": ds, "num_questions": 45, **retro},
            versus={**common, "dataset": ds, "num_questions": 45, **quest},
            source=BY_N,
        )
        for ds, value in (("gsm8k", 6.8), ("csqa", 6.9))
    ]
    out += [
        PaperNumber(
            key=f"n{n}/csqa/quest-full",
            quantity=f"LongGenBench CSQA n={n} accuracy, quest - full",
            value=value,
            unit="pp",
            metric="accuracy",
            kind="delta",
            match={**common, "dataset": "csqa", "num_questions": n, **quest},
            versus={**common, "dataset": "csqa", "num_questions": n, "method": "full"},
            source=BY_N,
        )
        for n, value in ((15, -2.6), (30, -20.6), (45, -25.8))
    ]
    return out


def _motivation() -> list[PaperNumber]:
    common = {"model": LLAMA, "task": "longgenbench", "dataset": "gsm8k"}
    return [
        PaperNumber(
            key="b05/gsm8k/full",
            quantity="LongGenBench GSM8K accuracy, full (motivation experiment)",
            value=60.8,
            unit="%",
            metric="accuracy",
            kind="mean",
            match={**common, "method": "full"},
            source=MOTIVATION,
        ),
        PaperNumber(
            key="b05/gsm8k/quest",
            quantity="LongGenBench GSM8K accuracy, quest at a 5% budget",
            value=17.6,
            unit="%",
            metric="accuracy",
            kind="mean",
            match={**common, "method": "quest", "budget_fraction": 0.05},
            source=MOTIVATION,
        ),
        PaperNumber(
            key="reuse/gsm8k/quest+reuse",
            quantity="LongGenBench GSM8K accuracy, quest + selection reuse (no such method here)",
            value=25.2,
            unit="%",
            metric="accuracy",
            kind="mean",
            match={**common, "method": "quest_reuse", "budget_fraction": 0.15},
            source=REUSE,
        ),
    ]


def _reasoning() -> list[PaperNumber]:
    table = {  # paper.md §5.3: Full, Quest, RetroAttention
        "aime24": (47.1, 33.8, 39.2),
        "gpqa_diamond": (38.9, 33.6, 33.6),
        "livecodebench": (37.6, 32.7, 34.1),  # v5: task.version_tag / start_date / end_date
    }
    common = {"model": R1_LLAMA, "task": "reasoning"}
    methods = (
        ("full", {"method": "full"}),
        ("quest", {"method": "quest", "budget_fraction": 0.15}),
        ("retro", {"method": "retro", "base": "quest", "window": 2, "budget_fraction": 0.15}),
    )
    out = []
    for bench, values in table.items():
        for (name, match), value in zip(methods, values):
            out.append(
                PaperNumber(
                    key=f"reasoning/{bench}/{name}",
                    quantity=f"{bench} pass@1, {name}",
                    value=value,
                    unit="%",
                    metric="accuracy",
                    kind="mean",
                    match={**common, "dataset": bench, **match},
                    source=REASONING,
                )
            )
    return out


def _larger() -> list[PaperNumber]:
    retro = {"task": "longgenbench", "method": "retro", "base": "quest", "window": 2, "budget_fraction": 0.15}
    quest = {"task": "longgenbench", "method": "quest", "budget_fraction": 0.15}
    rows = ((QWEN14, "csqa", 7.4), (QWEN32, "csqa", 4.3), (QWEN32, "gsm8k", 4.0))
    return [
        PaperNumber(
            key=f"{model}/{ds}/retro-quest",
            quantity=f"LongGenBench {ds.upper()} accuracy, retro - quest ({model})",
            value=value,
            unit="pp",
            metric="accuracy",
            kind="delta",
            match={"model": model, "dataset": ds, **retro},
            versus={"model": model, "dataset": ds, **quest},
            source=LARGER,
        )
        for model, ds, value in rows
    ]


def _exposure() -> list[PaperNumber]:
    # "1.17x at n=1 to 1.60x at n=7 future steps": window w = n + 1 (paper.md §5.4 [I]).
    return [
        PaperNumber(
            key=f"exposure/w{w}",
            quantity=f"effective KV exposure, retro w={w}",
            value=value,
            unit="x",
            metric="exposure",
            kind="mean",
            match={"model": LLAMA, "method": "retro", "window": w},
            source=EXPOSURE,
            bound="~",
        )
        for w, value in ((2, 1.17), (8, 1.60))
    ]


def _latency() -> list[PaperNumber]:
    return [
        PaperNumber(
            key="latency/w2",
            quantity="decode latency overhead of retro (w=2) over quest, per token",
            value=1.0,
            unit="ms",
            metric="p50_ms",
            kind="latency_delta",
            match={"method": "retro", "window": 2},
            versus={"method": "quest"},
            source=LATENCY,
            bound="<",
        ),
        PaperNumber(
            key="latency/w8",
            quantity="decode latency overhead of retro (w=8) over quest, per token",
            value=2.0,
            unit="ms",
            metric="p50_ms",
            kind="latency_delta",
            match={"method": "retro", "window": 8},
            versus={"method": "quest"},
            source=LATENCY,
            bound="~",
        ),
    ]


def _wizwand() -> list[PaperNumber]:
    # Model and setting unknown: kept for reference, never matched (model=None matches nothing).
    rows = (
        ("gsm8k", 15, 89.8),
        ("mmlu", 15, 80.9),
        ("csqa", 15, 68.8),
        ("csqa", 30, 72.2),
    )
    return [
        PaperNumber(
            key=f"wizwand/{ds}/n{n}",
            quantity=f"LongGenBench {ds.upper()} n={n} (wizwand; model unknown)",
            value=value,
            unit="%",
            metric="accuracy",
            kind="unmatched",
            match={"task": "longgenbench", "dataset": ds, "num_questions": n},
            source=WIZWAND,
        )
        for ds, n, value in rows
    ]


#: Every number, in report order.
PAPER_NUMBERS: tuple[PaperNumber, ...] = tuple(
    _main() + _by_n() + _motivation() + _larger() + _reasoning() + _exposure() + _latency() + _wizwand()
)


def by_key(key: str) -> PaperNumber:
    """The number named ``key`` (``KeyError`` if none)."""
    for number in PAPER_NUMBERS:
        if number.key == key:
            return number
    raise KeyError(key)


def main_table() -> dict[str, dict[str, float]]:
    """The main LongGenBench table as ``{dataset: {method: accuracy %}}`` (paper.md §5.1)."""
    out: dict[str, dict[str, float]] = {}
    for number in PAPER_NUMBERS:
        if number.key.startswith("main/") and number.kind == "mean":
            _, dataset, method = number.key.split("/")
            out.setdefault(dataset, {})[method] = number.value
    return out


def exposure_points() -> dict[int, float]:
    """``{window: exposure}`` the paper reports (≈1.17 at w=2, ≈1.6 at w=8)."""
    return {n.match["window"]: n.value for n in PAPER_NUMBERS if n.key.startswith("exposure/")}


__all__ = ["LLAMA", "PAPER_NUMBERS", "PaperNumber", "by_key", "exposure_points", "main_table"]
