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

* End of prefill (``fwd.last_chunk``): each layer, after its dense prompt attention, is cut to
  ``budget(L)`` with the last prompt token's weights (the whole prompt at once, as TOVA does).
* Decode: attend over live keys, then evict the lowest-weight tokens until at most ``budget``
  are live. The newest token is never evicted (the original code does not enforce this).

How many tokens a step evicts is known on the host (live count = min(context, budget) after every
step, so a decode step evicts ``budget(c - 1) + 1 - budget(c)`` tokens: 0 or 1), which keeps the
decode step static: the weights are ``exp(logit - lse)`` of the current query over the live keys
(``kernels/scores.py``; the LSE from its attention), averaged over heads, and the lowest one is
dropped where the plan says so (``argmin``: ties go to the lower position). Liveness is a
``[L, B, T]`` mask in the state; attention reads every page of the context under that mask.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from retrobench.methods.base import Forward, Method, ModelSpec, as_budget, attend_dense
from retrobench.methods.common import require_no_dense_layers


@dataclass
class TOVAState:
    live: torch.Tensor  # [L, B, T] bool
    count: list[int]  # host: live tokens per sequence after the last forward (every layer alike)


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

    def new_state(self, spec: ModelSpec, batch: int, capacity: int, device: torch.device) -> TOVAState:
        T = -(-capacity // spec.page_size) * spec.page_size
        return TOVAState(torch.zeros(spec.num_layers, batch, T, dtype=torch.bool, device=device), [0] * batch)

    def plan(
        self, state: TOVAState, ends: list[int], steps: list[int], phase: str, last_chunk: bool = False
    ) -> dict[str, list[int]]:
        """``evict``: tokens each layer drops in this forward (at the prompt's end, and in decode)."""
        evict, budgets = [], []
        for b, end in enumerate(ends):
            budget = self.budget.budget_tokens(end)
            if phase == "prefill":  # nothing is evicted before the prompt's last chunk
                live, drop = end, (max(0, end - budget) if last_chunk else 0)
            else:
                live = state.count[b] + 1
                drop = max(0, live - budget)
            state.count[b] = live - drop
            evict.append(drop)
            budgets.append(budget)
        return {"evict": evict, "budget": budgets}

    def prefilled(self, state: TOVAState, ends: list[int]) -> None:
        for b, end in enumerate(ends):  # which tokens survived does not matter to a benchmark, how many does
            state.count[b] = min(end, self.budget.budget_tokens(end))
            state.live[:, b] = False
            state.live[:, b, end - state.count[b] : end] = True

    def _weights(self, layer: int, q: torch.Tensor, lse: torch.Tensor, fwd: Forward) -> torch.Tensor:
        """``[B, T]`` the current queries' softmax weights over the live keys, averaged over heads."""
        live = fwd.state.live[layer]
        c = fwd.cache

        def positions() -> torch.Tensor:  # every position of the context, -1 past it
            t = torch.arange(live.shape[1], device=live.device).view(1, -1)
            return torch.where(t < fwd.ends.view(-1, 1), t, torch.full_like(t, -1))

        tokens = fwd.derived("tova_positions", positions)
        logits = fwd.ops.paged_logits(q, c.k[layer], c.page_table, tokens, fwd.scaling)  # [B, H, T]
        weights = torch.exp(logits - lse.unsqueeze(-1)).masked_fill(~live.unsqueeze(1), 0.0)
        return weights.mean(dim=1)

    def _candidates(self, layer: int, fwd: Forward) -> torch.Tensor:
        """Live keys other than the newest token (which is never evicted)."""
        live = fwd.state.live[layer]
        t = torch.arange(live.shape[1], device=live.device).view(1, -1)
        return live & (t != (fwd.ends - 1).view(-1, 1))

    def prefill(self, layer: int, q: torch.Tensor, fwd: Forward) -> tuple[torch.Tensor, torch.Tensor]:
        live = fwd.state.live[layer]
        live.scatter_(1, fwd.pos, True)
        out, lse = attend_dense(layer, q, fwd, need_lse=fwd.last_chunk)  # the last row's LSE ranks the prompt
        if fwd.last_chunk:  # the whole prompt at once, ranked by the last prompt token's weights
            weights = self._weights(layer, q[:, :, -1], lse[:, :, -1], fwd)
            masked = weights.masked_fill(~self._candidates(layer, fwd), float("inf"))
            order = torch.sort(masked, dim=-1, stable=True).indices  # lowest first, ties: lower position
            for b, n in enumerate(fwd.plan["evict"].tolist()):  # eager: the counts are known on the host
                live[b, order[b, :n]] = False
        return out, lse

    def decode(self, layer: int, q: torch.Tensor, fwd: Forward) -> tuple[torch.Tensor, torch.Tensor]:
        live = fwd.state.live[layer]
        live.scatter_(1, fwd.pos, True)
        out, lse = attend_dense(layer, q, fwd, key_mask=live)
        fwd.acct.keep(layer, "attended", live.sum(dim=1).float())
        weights = self._weights(layer, q[:, :, -1], lse[:, :, -1], fwd)
        masked = weights.masked_fill(~self._candidates(layer, fwd), float("inf"))
        victim = masked.argmin(dim=1, keepdim=True)  # the first minimum: ties evict the lower position
        keep = torch.gather(live, 1, victim) & (fwd.plan["evict"].view(-1, 1) == 0)
        live.scatter_(1, victim, keep)
        return out, lse

    def end_step(self, fwd: Forward) -> dict[str, torch.Tensor]:
        fwd.acct.add_layers({"attended_kv": fwd.acct.kept["attended"]})
        resident = fwd.state.live.sum(dim=2).float().mean(dim=0)
        return {"resident_kv": resident, "budget_kv": fwd.plan["budget"].float()}
