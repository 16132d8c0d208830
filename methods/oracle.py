"""Oracle top-k: the keys (or pages) holding the most true attention mass of the current query.

An upper bound for any selector at the same budget: it reads every key to compute the exact
softmax of the current query (``kernels/scores.py``), then keeps the top-k tokens
(``granularity: token``) or pages (``granularity: page``, the current page forced) by attention
mass, summed over the query heads that share a selection (``selection`` policy). The current token
is always kept and counts toward the budget. It costs a full KV read per step, so it measures
accuracy, never speed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from retrobench.methods.base import ConfigError, Forward, ModelSpec
from retrobench.methods.common import Selection, SelectionMethod, reduce_heads

GRANULARITIES = ("token", "page")


@dataclass
class OracleState:
    page_size: int
    k_max: int  # static width: most units (tokens or pages) any step of the request selects


@dataclass
class OracleMethod(SelectionMethod):
    """Exact top-k by attention mass. ``granularity``: ``token`` (default) | ``page``."""

    name: ClassVar[str] = "oracle"
    granularity: str = "token"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.granularity not in GRANULARITIES:
            raise ConfigError(
                f"method.granularity={self.granularity!r} is not supported; allowed: {', '.join(GRANULARITIES)}"
            )

    def unit(self, spec: ModelSpec) -> int:
        return spec.page_size if self.granularity == "page" else 1

    def _k(self, end: int, P: int) -> int:
        """Units selected at context ``end``: tokens (at least min_pages pages' worth) or quest's pages."""
        if self.granularity == "page":
            return min(self.budget.num_pages(end, P, self.min_pages), math.ceil(end / P))
        return min(max(self.budget.budget_tokens(end), self.min_pages * P), end)

    def new_state(self, spec: ModelSpec, batch: int, capacity: int, device: torch.device) -> OracleState:
        return OracleState(spec.page_size, self._k(capacity, spec.page_size))  # _k grows with the context

    def plan(
        self, state: OracleState, ends: list[int], steps: list[int], phase: str, last_chunk: bool = False
    ) -> dict[str, list[int]]:
        P = state.page_size
        forced = [e - 1 for e in ends] if self.granularity == "token" else [(e - 1) // P for e in ends]
        return {"k": [self._k(e, P) for e in ends], "forced": forced}

    def select(self, layer: int, q: torch.Tensor, fwd: Forward, state: Any) -> Selection:
        c = fwd.cache
        T = c.pages_per_seq * c.page_size

        def positions() -> torch.Tensor:  # [B, T]: every position of the context, -1 past it
            t = torch.arange(T, device=q.device).view(1, T)
            return torch.where(t < fwd.ends.view(-1, 1), t, torch.full_like(t, -1))

        tokens = fwd.derived("oracle_positions", positions)
        logits = fwd.ops.paged_logits(q, c.k[layer], c.page_table, tokens, fwd.scaling)  # [B, H, T]
        mass = reduce_heads(torch.softmax(logits, dim=-1), self.selection, c.num_kv_heads)  # [B, H_sel, T]
        if self.granularity == "page":
            mass = mass.view(*mass.shape[:2], c.pages_per_seq, c.page_size).sum(dim=-1)
            exists = torch.arange(c.pages_per_seq, device=q.device).view(1, 1, -1) < fwd.n_pages.view(-1, 1, 1)
            unit = c.page_size
        else:
            exists = (tokens >= 0).unsqueeze(1)
            unit = 1
        mass = torch.where(exists, mass, torch.full_like(mass, float("-inf")))
        units = fwd.ops.topk_forced(mass, fwd.plan["k"], state.k_max, fwd.plan["forced"])
        return Selection(units, unit, fwd.plan["k"])
