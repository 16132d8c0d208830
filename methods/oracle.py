"""Oracle top-k: the keys (or pages) holding the most true attention mass of the current query.

An upper bound for any selector at the same budget: it reads every key to compute the exact
softmax of the current query, then keeps the top-k tokens (``granularity: token``) or pages
(``granularity: page``, the current page forced) by attention mass, summed over the query heads
that share a selection (``selection`` policy). The current token is always kept and counts
toward the budget. It costs a full KV read per step, so it measures accuracy, never speed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from retrobench.methods.base import ConfigError
from retrobench.methods.common import SelectionMethod, pages_to_tokens, reduce_head_scores, topk_with_forced

GRANULARITIES = ("token", "page")


def attention_probs(q: torch.Tensor, k: torch.Tensor, scaling: float, live: torch.Tensor) -> torch.Tensor:
    """Softmax weights ``[H, T]`` of the current queries ``q [H, D]`` over the live keys ``k [T, H_kv, D]``."""
    G = q.shape[0] // k.shape[1]
    scores = torch.einsum("hd,thd->ht", q.float(), k.float().repeat_interleave(G, dim=1)) * scaling
    return torch.softmax(scores.masked_fill(~live.view(1, -1), float("-inf")), dim=-1)


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

    def select(
        self, layer: int, q: torch.Tensor, cache: Any, b: int, end: int, state: Any, scaling: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        P = cache.page_size
        live = cache.live_mask(layer, b, end)
        probs = attention_probs(q, cache.keys(layer, b, end), scaling, live)  # [H, T]
        mass = reduce_head_scores(probs, self.selection, cache.num_kv_heads)  # [H_sel, T]
        if self.granularity == "page":
            n = cache.num_pages(b, end)
            padded = torch.zeros(mass.shape[0], n * P, dtype=mass.dtype)
            padded[:, :end] = mass
            page_mass = padded.view(mass.shape[0], n, P).sum(dim=-1)
            pages = topk_with_forced(page_mass, self.budget.num_pages(end, P, self.min_pages), forced=n - 1)
            return pages_to_tokens(pages, P, end), pages.sum(dim=-1).float()
        k = max(self.budget.budget_tokens(end), self.min_pages * P)
        select = topk_with_forced(mass, k, forced=end - 1)
        return select, select.sum(dim=-1).float() / P
