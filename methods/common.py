"""Shared machinery of the selection methods: budgets to pages, GQA selection policies, and
attention restricted to a selected key set.

A selecting method answers one question per (layer, sequence, decode step): which keys may the
current query see? It returns a boolean key mask ``[H_sel, T]`` where ``H_sel`` is the selection
granularity: ``H_kv`` for ``selection: kv_head`` (one set per KV head, shared by its G query
heads, so K/V are read once per group), ``H`` for ``q_head`` (Quest's evaluation code), ``1`` for
``layer`` (one set for all heads). :class:`SelectionMethod.decode` then attends every query of
the forward over its selection intersected with causality and liveness. RetroAttention reuses
``select`` and the attention helper unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from retrobench.kernels.attention_ref import attention_ref, causal_mask
from retrobench.methods.base import AttnResult, ConfigError, Method, StepInfo, as_budget, attend_live

SELECTIONS = ("kv_head", "q_head", "layer")


def selection_heads(selection: str, num_heads: int, num_kv_heads: int) -> int:
    """``H_sel`` for a GQA selection policy."""
    return {"kv_head": num_kv_heads, "q_head": num_heads, "layer": 1}[selection]


def reduce_head_scores(scores: torch.Tensor, selection: str, num_kv_heads: int) -> torch.Tensor:
    """Per-query-head scores ``[H, N]`` -> per-selection-head scores ``[H_sel, N]`` (summed over the group)."""
    if selection == "q_head":
        return scores
    if selection == "kv_head":
        H, N = scores.shape
        return scores.view(num_kv_heads, H // num_kv_heads, N).sum(dim=1)
    return scores.sum(dim=0, keepdim=True)


def pages_to_tokens(page_mask: torch.Tensor, page_size: int, num_tokens: int) -> torch.Tensor:
    """``[H_sel, n_pages]`` page mask -> ``[H_sel, T]`` key mask."""
    return page_mask.repeat_interleave(page_size, dim=-1)[..., :num_tokens]


def topk_with_forced(scores: torch.Tensor, k: int, forced: int) -> torch.Tensor:
    """Bool mask ``[H_sel, N]``: entry ``forced`` plus the top ``k - 1`` others by ``scores [H_sel, N]``.

    Equal scores break toward the lower index (a stable descending sort), so selections are
    deterministic; all N entries are selected when ``k >= N``.
    """
    H_sel, N = scores.shape
    mask = torch.zeros(H_sel, N, dtype=torch.bool, device=scores.device)
    if k >= N:
        mask[:] = True
        return mask
    others = scores.clone()
    others[:, forced] = float("-inf")
    order = torch.sort(others, dim=-1, descending=True, stable=True).indices[:, : max(0, k - 1)]
    mask.scatter_(1, order, True)
    mask[:, forced] = True
    return mask


def attend_selection(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_positions: torch.Tensor,
    scaling: float,
    select: torch.Tensor,
    live: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Attention of ``q [H, S, D]`` over keys in ``select [H_sel, T]`` that are live and causal.

    Returns ``out [H, S, D]``, ``lse [H, S]`` and ``attended [S]`` (keys seen per query, averaged
    over selection heads).
    """
    H, S, _ = q.shape
    H_kv = k.shape[1]
    mask = select.unsqueeze(1) & causal_mask(q_positions, k.shape[0]).unsqueeze(0) & live  # [H_sel, S, T]
    attended = mask.sum(dim=-1).float().mean(dim=0)
    if mask.shape[0] == 1:
        mask = mask.expand(H_kv, S, -1)
    out, lse = attention_ref(q, k, v, scaling, mask)
    return out, lse, attended


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

    # ---- what subclasses implement --------------------------------------------------------------
    def select(
        self, layer: int, q: torch.Tensor, cache: Any, b: int, end: int, state: Any, scaling: float
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Keys for the current query ``q [H, D]`` of sequence ``b`` over positions [0, end).

        ``scaling`` is the model's softmax scale (for methods that rank by attention probabilities).

        Returns ``(mask [H_sel, end] bool, pages [H_sel] float or None)``.
        """
        raise NotImplementedError

    # ---- shared decode ------------------------------------------------------------------------------
    def decode(self, layer: int, q: torch.Tensor, cache: Any, info: StepInfo, state: Any) -> AttnResult:
        if self.is_dense_layer(layer):
            return dense_decode(layer, q, cache, info)
        outs, lses, attended, pages = [], [], [], []
        for b in range(q.shape[0]):
            pos = info.positions[b]
            end = int(pos.max()) + 1
            select, n_pages = self.select(layer, q[b, :, -1], cache, b, end, state, info.scaling)
            out, lse, att = attend_selection(
                q[b], cache.keys(layer, b, end), cache.values(layer, b, end), pos, info.scaling, select,
                cache.live_mask(layer, b, end),
            )  # fmt: skip
            outs.append(out)
            lses.append(lse)
            attended.append(att)
            if n_pages is not None:
                pages.append(n_pages.float().mean().expand(pos.shape[0]))
        return AttnResult(
            out=torch.stack(outs),
            lse=torch.stack(lses),
            attended=torch.stack(attended),
            pages=torch.stack(pages) if pages else None,
        )


def dense_decode(layer: int, q: torch.Tensor, cache: Any, info: StepInfo) -> AttnResult:
    """Full attention for dense layers of selecting methods (not counted in budget accounting)."""
    return attend_live(layer, q, cache, info)


def context_lengths(info: StepInfo) -> list[int]:
    """Per sequence, the positions seen so far including this forward's last token."""
    return [int(p.max()) + 1 for p in info.positions]


def require_no_dense_layers(dense_layers: Any, why: str) -> None:
    """Eviction methods free KV in every layer, so no layer can stay dense."""
    if dense_layers != 0:
        raise ConfigError(f"method.dense_layers must be 0 for this method ({why}), got {dense_layers!r}")
