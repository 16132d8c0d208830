"""Quest (Tang et al., ICML 2024): query-aware page selection from per-page key min/max.

Each page of P keys is summarised, per KV head and channel, by the min and max of its keys (kept
exact by the engine's cache). For query q the page score ``Σ_i max(q_i·Kmax_i, q_i·Kmin_i)`` is an
upper bound on ``q·k`` for every key k of the page, whatever the signs of q. The top-scoring pages
plus the page holding the current token are attended; all KV stays resident (no eviction).
Defaults follow Quest's evaluation code where it is explicit (page size 16, layers 0-1 dense);
the GQA policy is a flag (see methods/README.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from retrobench.methods.common import SelectionMethod, pages_to_tokens, reduce_head_scores, topk_with_forced


def quest_page_scores(q: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor) -> torch.Tensor:
    """Upper-bound scores ``[H, n_pages]`` of query ``q [H, D]`` against ``kmin, kmax [n_pages, H_kv, D]``."""
    H = q.shape[0]
    G = H // kmin.shape[1]
    qf = q.float().unsqueeze(0)  # [1, H, D]
    lo = kmin.float().repeat_interleave(G, dim=1)  # [n, H, D]
    hi = kmax.float().repeat_interleave(G, dim=1)
    bound = torch.maximum(qf * hi, qf * lo).sum(dim=-1)  # [n, H]
    empty = (lo == float("inf")).any(dim=-1)  # [n, H]: a page with no live key holds kmin = +inf
    return torch.where(empty, float("-inf"), bound).transpose(0, 1)  # empty pages score -inf


@dataclass
class QuestMethod(SelectionMethod):
    """Quest page selection.

    Settings (see SelectionMethod): ``budget`` (default fraction 0.15), ``min_pages`` (1),
    ``selection`` (``kv_head``: the group's query-head scores are summed, one page set per KV head),
    ``dense_layers`` (2). Pages selected = max(min_pages, ceil(budget / P)), the current page
    included; when that covers every page the step is dense.
    """

    name: ClassVar[str] = "quest"

    def page_scores(self, layer: int, q: torch.Tensor, cache: Any, b: int, end: int, state: Any) -> torch.Tensor:
        kmin, kmax = cache.page_meta(layer, b, end)
        return quest_page_scores(q, kmin, kmax)

    def select(
        self, layer: int, q: torch.Tensor, cache: Any, b: int, end: int, state: Any, scaling: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        P = cache.page_size
        scores = reduce_head_scores(self.page_scores(layer, q, cache, b, end, state), self.selection, cache.num_kv_heads)
        k = self.budget.num_pages(end, P, self.min_pages)
        pages = topk_with_forced(scores, k, forced=(end - 1) // P)
        return pages_to_tokens(pages, P, end), pages.sum(dim=-1).float()
