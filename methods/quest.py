"""Quest (Tang et al., ICML 2024): query-aware page selection from per-page key min/max.

Each page of P keys is summarised, per KV head and channel, by the min and max of its keys (kept
exact by the engine on every append and overwrite). For query q the page score
``Σ_i max(q_i·Kmax_i, q_i·Kmin_i)`` is an upper bound on ``q·k`` for every key k of the page,
whatever the signs of q (``kernels/quest.py``). The top-scoring pages plus the page holding the
current token are attended (``kernels/topk.py``); all KV stays resident (no eviction). Defaults
follow Quest's evaluation code where it is explicit (page size 16, layers 0-1 dense); the GQA
policy is a flag (see methods/README.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from retrobench.methods.base import Forward, ModelSpec
from retrobench.methods.common import Selection, SelectionMethod


@dataclass
class QuestState:
    page_size: int
    k_max: int  # static width of the page lists: the most pages any step of the request selects


@dataclass
class QuestMethod(SelectionMethod):
    """Quest page selection.

    Settings (see SelectionMethod): ``budget`` (default fraction 0.15), ``min_pages`` (1),
    ``selection`` (``kv_head``: the group's query-head scores are summed, one page set per KV head),
    ``dense_layers`` (2). Pages selected = max(min_pages, ceil(budget / P)), the current page
    included; when that covers every page the step is dense.
    """

    name: ClassVar[str] = "quest"
    needs_page_meta: ClassVar[bool] = True

    def new_state(self, spec: ModelSpec, batch: int, capacity: int, device: torch.device) -> QuestState:
        P = spec.page_size
        n_max = math.ceil(capacity / P)
        return QuestState(P, min(n_max, self.budget.num_pages(capacity, P, self.min_pages)))

    def plan(
        self, state: QuestState, ends: list[int], steps: list[int], phase: str, last_chunk: bool = False
    ) -> dict[str, list[int]]:
        P = state.page_size
        return {
            "k": [min(self.budget.num_pages(e, P, self.min_pages), math.ceil(e / P)) for e in ends],
            "forced": [(e - 1) // P for e in ends],
        }

    def select(self, layer: int, q: torch.Tensor, fwd: Forward, state: Any) -> Selection:
        c = fwd.cache
        scores = fwd.ops.page_scores(q, c.kmin[layer], c.kmax[layer], c.page_table, fwd.n_pages, self.selection)
        units = fwd.ops.topk_forced(scores, fwd.plan["k"], state.k_max, fwd.plan["forced"])
        return Selection(units, state.page_size, fwd.plan["k"])
