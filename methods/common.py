"""Shared machinery of the selecting methods: a selection, attention over it, and its accounting.

A selecting method answers one question per (layer, decode step): which keys may the current query
of each sequence see? It returns a :class:`Selection`: per sequence and *selection head*, a list of
units (pages of P keys, or single tokens) compacted to the front and padded with -1 to a static
width. The selection heads follow the GQA policy ``selection``: ``kv_head`` (one list per KV head,
the group's query-head scores summed, so K/V are read once per group), ``q_head`` (one per query
head, Quest's evaluation code) or ``layer`` (one list for all heads). :class:`SelectionMethod`
then attends every query of the forward over its selection with the sparse attention op and
records the accounting. RetroAttention reuses ``select`` and :func:`attend_selection` unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from retrobench.methods.base import ConfigError, Forward, Method, as_budget, attend_dense

SELECTIONS = ("kv_head", "q_head", "layer")


def selection_heads(selection: str, num_heads: int, num_kv_heads: int) -> int:
    """``H_sel`` for a GQA selection policy."""
    return {"kv_head": num_kv_heads, "q_head": num_heads, "layer": 1}[selection]


def reduce_heads(scores: torch.Tensor, selection: str, num_kv_heads: int) -> torch.Tensor:
    """Per-query-head scores ``[B, H, N]`` -> per-selection-head scores ``[B, H_sel, N]`` (summed)."""
    if selection == "q_head":
        return scores
    if selection == "kv_head":
        B, H, N = scores.shape
        return scores.view(B, num_kv_heads, H // num_kv_heads, N).sum(dim=2)
    return scores.sum(dim=1, keepdim=True)


@dataclass
class Selection:
    """What the current query of each sequence attends in one layer.

    units: ``[B, H_sel, K]`` long logical units (pages when ``unit == P``, tokens when ``unit == 1``),
        valid entries first, -1 after; entries unique.
    unit: tokens per unit.
    count: ``[B]`` long, an upper bound on the valid entries (the kernel reads only those).
    """

    units: torch.Tensor
    unit: int
    count: torch.Tensor

    def valid(self) -> torch.Tensor:
        return self.units >= 0

    def visible(self, q_pos: torch.Tensor) -> torch.Tensor:
        """``[B, H_sel, S]`` fp32: keys of the selection at or before each query position ``q_pos [B, S]``."""
        start = self.units.long().clamp(min=0) * self.unit  # [B, H_sel, K]
        n = (q_pos.view(q_pos.shape[0], 1, 1, -1) + 1 - start.unsqueeze(-1)).clamp(0, self.unit)
        return (n * self.valid().unsqueeze(-1)).sum(dim=2).float()


def cache_view(fwd: Forward, layer: int, unit: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(k, v, table)`` of ``layer`` with units of ``unit`` tokens: the pages, or a one-token-per-unit view."""
    c = fwd.cache
    if unit == c.page_size:
        return c.k[layer], c.v[layer], c.page_table
    if unit == 1:
        return c.token_view(layer)
    raise ValueError(f"a selection unit must be the page size {c.page_size} or 1 token, got {unit}")


def attend_selection(
    layer: int,
    q: torch.Tensor,
    fwd: Forward,
    sel: Selection,
    page_step: torch.Tensor | None = None,
    q_step: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of every query ``q [B, H, S, D]`` over ``sel`` (causal; with ``page_step``/``q_step``,
    unit u is visible to row s only if ``page_step[u] < q_step[s]``)."""
    k, v, table = cache_view(fwd, layer, sel.unit)
    units = sel.units
    if units.shape[1] == 1:  # selection: layer -> one list shared by every KV head (no copy)
        units = units.expand(-1, fwd.spec.num_kv_heads, -1)
        if page_step is not None:
            page_step = page_step.expand(-1, fwd.spec.num_kv_heads, -1)
    return fwd.ops.sparse_attention(
        q, k, v, table, units, fwd.pos, fwd.scaling, page_step=page_step, q_step=q_step, num_units=sel.count
    )


def visible_keys(
    units: torch.Tensor,
    unit: int,
    q_pos: torch.Tensor,
    steps: torch.Tensor | None = None,
    q_step: torch.Tensor | None = None,
) -> torch.Tensor:
    """``[..., B, H_sel, S]`` fp32: keys of unit lists ``[..., B, H_sel, K]`` at or before each query
    position ``q_pos [B, S]`` (-1 entries count nothing); with ``steps`` (per entry, e.g. the last
    step it was loaded) and ``q_step [B, S]``, only entries with ``steps < q_step`` count."""
    start = units.long().clamp(min=0) * unit
    n = (q_pos.view(*q_pos.shape[:1], 1, 1, -1) + 1 - start.unsqueeze(-1)).clamp(0, unit)  # [..., B, H_sel, K, S]
    keep = (units >= 0).unsqueeze(-1)
    if steps is not None:
        keep = keep & (steps.unsqueeze(-1) < q_step.view(*q_step.shape[:1], 1, 1, -1))
    return (n * keep).sum(dim=-2).float()


def selection_accounting(fwd: Forward, units: torch.Tensor, unit: int) -> tuple[torch.Tensor, torch.Tensor]:
    """From the kept unit lists of the sparse layers ``[L', B, H_sel, K]``: the current query's attended
    keys per selection head ``[L', B, H_sel]`` and the pages selected ``[L', B, H_sel]``."""
    attended = visible_keys(units, unit, fwd.pos[:, -1:])[..., 0]
    pages = (units >= 0).sum(dim=-1).float() * (unit / fwd.cache.page_size)
    return attended, pages


@dataclass
class SelectionMethod(Method):
    """A method that keeps all KV resident and, per decode step, selects keys for the current query.

    Settings:
        budget: ``{tokens: N}`` or ``{fraction: b}`` (of the current context, re-evaluated each step).
        min_pages: lower bound on pages selected.
        selection: GQA policy, ``kv_head`` (default) | ``q_head`` | ``layer``.
        dense_layers: leading layers with full attention (default 2, as in Quest).
    """

    budget: Any = field(default_factory=lambda: {"fraction": 0.15})
    min_pages: int = 1
    selection: str = "kv_head"
    dense_layers: int = 2

    def __post_init__(self) -> None:
        super().__post_init__()
        self.budget = as_budget(self.budget)
        if self.selection not in SELECTIONS:
            raise ConfigError(f"method.selection={self.selection!r} is not supported; allowed: {', '.join(SELECTIONS)}")
        if not isinstance(self.min_pages, int) or self.min_pages < 1:
            raise ConfigError(f"method.min_pages must be an integer >= 1, got {self.min_pages!r}")

    def attended_bound(self, context: int, page_size: int) -> int:
        """Selected pages (current page included) times P: ceil(budget / P) pages, at least min_pages."""
        return self.budget.num_pages(context, page_size, self.min_pages) * page_size

    def selection_heads(self, spec: Any) -> int:
        return selection_heads(self.selection, spec.num_heads, spec.num_kv_heads)

    def unit(self, spec: Any) -> int:
        """Tokens per selected unit: a page (default) or one token."""
        return spec.page_size

    # ---- what subclasses implement --------------------------------------------------------------
    def select(self, layer: int, q: torch.Tensor, fwd: Forward, state: Any) -> Selection:
        """The selection of the current queries ``q [B, H, D]`` in ``layer`` (static shapes, no sync)."""
        raise NotImplementedError

    def observe(self, layer: int, q: torch.Tensor, sel: Selection, lse: torch.Tensor, fwd: Forward, state: Any) -> None:
        """After attending: the current queries ``q [B, H, D]`` and their LSE ``[B, H]`` (InfLLM's scores)."""

    # ---- shared decode ------------------------------------------------------------------------------
    def decode(self, layer: int, q: torch.Tensor, fwd: Forward) -> tuple[torch.Tensor, torch.Tensor]:
        if self.is_dense_layer(layer):
            return attend_dense(layer, q, fwd, need_lse=False)
        sel = self.select(layer, q[:, :, -1], fwd, fwd.state)
        out, lse = attend_selection(layer, q, fwd, sel)
        self.observe(layer, q[:, :, -1], sel, lse[:, :, -1], fwd, fwd.state)
        fwd.acct.keep(layer, "units", sel.units)  # accounted once per step, for every layer at once
        return out, lse

    def end_step(self, fwd: Forward) -> dict[str, torch.Tensor]:
        attended, pages = selection_accounting(fwd, fwd.acct.kept["units"][self.dense_layers :], self.unit(fwd.spec))
        fwd.acct.add_layers({"attended_kv": attended.mean(dim=-1), "pages_selected": pages.mean(dim=-1)})
        return super().end_step(fwd)


def require_no_dense_layers(dense_layers: Any, why: str) -> None:
    """Eviction methods free KV in every layer, so no layer can stay dense."""
    if dense_layers != 0:
        raise ConfigError(f"method.dense_layers must be 0 for this method ({why}), got {dense_layers!r}")
