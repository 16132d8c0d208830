"""The RetroAttention paper's published numbers: :data:`PAPER_NUMBERS`, read from
``paper_numbers.yaml`` beside this file (the data, with the source of each table).

The YAML is copied from ``reference/paper.md`` of the project, which tags every claim by source;
each entry names its table in ``sources:`` and the tag is kept in :attr:`PaperNumber.source`
(``[N]`` a third-party note of the paper's tables, ``[V]`` the paper's text, ``[R]`` reviews,
``[W]`` wizwand, never matched).

:mod:`retrobench.report` joins these with our runs (:func:`retrobench.report.paper_table`). A
number is matched to runs by :attr:`PaperNumber.match`: column -> value of the runs table
(``None`` values are ignored; floats compare with a tolerance). ``kind`` says what our side is:

- ``mean``: the mean of ``metric`` over the matching samples (accuracy in %, exposure as a ratio);
- ``delta``: the paired difference ``a - b`` of ``metric`` on the same sample ids, where ``a`` is
  :attr:`match` and ``b`` is :attr:`versus` (e.g. retro - quest, in percentage points);
- ``latency_delta``: retro - quest decode step time (ms) from the benchmark CSVs;
- ``unmatched``: kept for reference only.

Percent metrics (accuracy) are stored in percent, as the paper prints them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

#: The data file: ``defaults``, ``sources`` (one line per table of the paper) and ``numbers``.
DATA = Path(__file__).with_name("paper_numbers.yaml")
KINDS = ("mean", "delta", "latency_delta", "unmatched")
UNITS = ("%", "pp", "x", "ms")
BOUNDS = ("=", "<", "~")


@dataclass(frozen=True)
class PaperNumber:
    """One number of the paper and the runs it is compared with."""

    key: str  #: short unique name, e.g. ``main/gsm8k/quest``
    quantity: str  #: what it is, in words
    value: float
    unit: str  #: ``%``, ``pp`` (percentage points), ``x`` (ratio) or ``ms``
    metric: str  #: column of our tables (``accuracy``, ``exposure``, ``p50_ms``)
    kind: str  #: ``mean`` | ``delta`` | ``latency_delta`` | ``unmatched``
    match: dict[str, Any] = field(default_factory=dict)
    versus: dict[str, Any] = field(default_factory=dict)  #: ``b`` side of a delta
    source: str = ""
    bound: str = "="  #: ``=`` exact, ``<`` an upper bound, ``~`` approximate

    @property
    def model(self) -> str | None:
        return self.match.get("model")


def _number(entry: Mapping[str, Any], defaults: Mapping[str, Any], sources: Mapping[str, str]) -> PaperNumber:
    """One YAML entry as a :class:`PaperNumber` (defaults filled in, the source resolved), checked."""
    key = entry.get("key", "?")
    allowed = {f.name for f in fields(PaperNumber)} | {"note"}
    unknown = sorted(set(entry) - allowed)
    if unknown:
        raise ValueError(f"paper number {key}: unknown field {unknown[0]}; allowed: {', '.join(sorted(allowed))}")
    if entry.get("source") not in sources:
        raise ValueError(f"paper number {key}: source={entry.get('source')} is not a source; allowed: {', '.join(sources)}")
    values = {**defaults, **entry}
    for name, options in (("kind", KINDS), ("unit", UNITS), ("bound", BOUNDS)):
        if values.get(name) not in options:
            raise ValueError(f"paper number {key}: {name}={values.get(name)}; allowed: {', '.join(options)}")
    note = values.pop("note", None)
    source = sources[values.pop("source")] + (f"; {note}" if note else "")
    return PaperNumber(**{**values, "value": float(values["value"]), "source": source})


def load_paper_numbers(path: Path = DATA) -> tuple[PaperNumber, ...]:
    """Every number of ``path`` in file order (report order); a key appears once."""
    import yaml

    data = yaml.safe_load(Path(path).read_text())
    numbers = tuple(_number(e, data.get("defaults") or {}, data["sources"]) for e in data["numbers"])
    keys = [n.key for n in numbers]
    duplicated = sorted({k for k in keys if keys.count(k) > 1})
    if duplicated:
        raise ValueError(f"{path}: key {duplicated[0]} appears more than once")
    return numbers


#: Every number, in report order.
PAPER_NUMBERS: tuple[PaperNumber, ...] = load_paper_numbers()


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


__all__ = ["PAPER_NUMBERS", "PaperNumber", "by_key", "exposure_points", "load_paper_numbers", "main_table"]
