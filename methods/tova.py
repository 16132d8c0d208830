"""TOVA (Oren et al., 2024, "Transformers are Multi-State RNNs"): attention-guided KV eviction.

Per layer, once the live tokens exceed the budget, the tokens with the lowest attention weight
from the current query, averaged over all query heads of the layer, are evicted (their KV freed
in that layer only, so layers keep different token sets). This follows ``TOVACache.reduce`` of
the original code (schwartz-lab-NLP/TOVA, ``src/tova_cache.py``): after the layer's attention,
keep the top-``budget`` keys by the last query's head-averaged softmax weights.

Budget (see methods/README.md): ``budget`` counts the live tokens of a layer *after* the step's
eviction, the current token included; the query of a step attends to at most ``budget + 1`` keys
(the budgeted cache plus itself). With ``fraction`` the budget is ``ceil(b x context)`` where the
context is the positions seen so far including the current token, re-evaluated every step.

* End of prefill (``info.last_chunk``): each layer, after its dense prompt attention, is cut to
  ``budget(L)`` with the last prompt token's weights (the whole prompt at once, as TOVA does).
* Decode: attend over live keys, then evict the lowest-weight tokens until at most ``budget``
  are live. The newest token is never evicted (the original code does not enforce this).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from retrobench.methods.base import AttnResult, Method, StepInfo, as_budget, attend_live
from retrobench.methods.common import context_lengths, require_no_dense_layers


def head_mean_weights(q: torch.Tensor, k: torch.Tensor, scaling: float, visible: torch.Tensor) -> torch.Tensor:
    """``[T]`` softmax weights of one query ``q [H, D]`` over keys ``k [T, H_kv, D]`` restricted to
    ``visible [T]``, averaged over the H query heads (query head h reads KV head h // G), in fp32."""
    G = q.shape[0] // k.shape[1]
    scores = torch.einsum("hd,thd->ht", q.float(), k.float().repeat_interleave(G, dim=1)) * scaling
    scores = scores.masked_fill(~visible.unsqueeze(0), float("-inf"))
    return torch.softmax(scores, dim=-1).mean(dim=0)


def lowest_weight(weights: torch.Tensor, candidates: torch.Tensor, n: int) -> torch.Tensor:
    """Positions of the ``n`` candidates with the lowest weight (ties: the lower position first)."""
    masked = weights.masked_fill(~candidates, float("inf"))
    return torch.sort(masked, stable=True).indices[:n]


@dataclass
class TOVAMethod(Method):
    """Per-layer eviction of the lowest head-averaged attention weight of the current query.

    Settings:
        budget: ``{tokens: N}`` or ``{fraction: b}`` of the current context (default fraction 0.15):
            live tokens per layer after each step's eviction.
        dense_layers: must be 0 (every layer evicts).
    """

    name: ClassVar[str] = "tova"
    budget: Any = field(default_factory=lambda: {"fraction": 0.15})
    dense_layers: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        require_no_dense_layers(self.dense_layers, "TOVA evicts KV in every layer")
        self.budget = as_budget(self.budget)

    def attended_bound(self, context: int, page_size: int) -> int:
        """The budgeted cache of the previous step plus the current token."""
        return min(context, self.budget.budget_tokens(context - 1) + 1)

    def compress(self, layer: int, q: torch.Tensor, cache: Any, info: StepInfo) -> None:
        """Cut ``layer`` to the budget with the weights of each sequence's last query ``q[b, :, -1]``."""
        for b, end in enumerate(context_lengths(info)):
            live = cache.live_mask(layer, b, end)
            excess = int(live.sum()) - self.budget.budget_tokens(end)
            if excess <= 0:
                continue
            # the last query sits at end - 1, so causality hides nothing: visible = live
            weights = head_mean_weights(q[b, :, -1], cache.keys(layer, b, end), info.scaling, live)
            candidates = live.clone()
            candidates[end - 1] = False  # the newest token is never evicted
            cache.evict(b, lowest_weight(weights, candidates, excess), layers=[layer])

    def prefill(self, layer: int, q: torch.Tensor, cache: Any, info: StepInfo, state: Any) -> AttnResult:
        result = attend_live(layer, q, cache, info)
        if info.last_chunk:
            self.compress(layer, q, cache, info)
        return result

    def decode(self, layer: int, q: torch.Tensor, cache: Any, info: StepInfo, state: Any) -> AttnResult:
        result = attend_live(layer, q, cache, info)
        self.compress(layer, q, cache, info)
        return result

    def end_step(self, info: StepInfo, cache: Any, state: Any) -> dict[str, float]:
        ends = context_lengths(info)
        return {"budget_kv": sum(self.budget.budget_tokens(e) for e in ends) / len(ends)}
