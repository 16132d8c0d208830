"""StreamingLLM (Xiao et al., ICLR 2024, "Efficient Streaming Language Models with Attention Sinks").

Keeps the first ``sinks`` tokens (the attention sinks) plus a window of the most recent tokens and
frees the KV of everything else in every layer, so resident KV stays at the budget instead of
growing with the context. The evicted set depends only on positions, so one eviction serves all
layers and the first layer already attends over the compressed cache.

Budget (see methods/README.md): ``budget = sinks + window`` tokens of the current context (the
positions seen so far, the current token included, re-evaluated every step for ``fraction``); the
window includes the current token. Eviction runs at two points:

* end of prefill (``fwd.last_chunk``, after the last layer's dense prompt attention): the prompt
  is cut to ``budget(L)`` so resident KV shrinks before decoding starts;
* every decode step, at layer 0 before attending: the cache (now holding the new token) is cut to
  ``budget(context)``, so every query of every layer, the first decode step included, attends to
  at most ``budget`` keys and resident KV after the step is at most ``budget``.

Liveness is one ``[B, T]`` mask for all layers (the state); each step attends only the sink pages
and the window's pages (a list built from the plan, at most ``ceil(sinks / P) +
ceil(budget / P) + 1`` pages), masked by liveness, so its cost is the budget's, not the context's.

Positions keep their original RoPE (no re-rotation into cache slots, unlike StreamingLLM's
rolling cache): a deviation stated in the method card.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from retrobench.methods.base import ConfigError, Forward, Method, ModelSpec, as_budget, attend_dense
from retrobench.methods.common import require_no_dense_layers


@dataclass
class StreamingState:
    live: torch.Tensor  # [B, T] bool, shared by every layer
    page_size: int
    width: int  # static width of the page list: sink pages + window pages


@dataclass
class StreamingMethod(Method):
    """Attention sinks + recent window; everything else is evicted (freed) in every layer.

    Settings:
        budget: ``{tokens: N}`` or ``{fraction: b}`` of the current context (default fraction 0.15);
            counts sinks and window, the current token included.
        sinks: first tokens always kept (default 4, StreamingLLM's ``start_size``).
        dense_layers: must be 0 (eviction is global).
    """

    name: ClassVar[str] = "streaming"
    budget: Any = field(default_factory=lambda: {"fraction": 0.15})
    sinks: int = 4
    dense_layers: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        require_no_dense_layers(self.dense_layers, "StreamingLLM evicts KV from every layer")
        self.budget = as_budget(self.budget)
        if not isinstance(self.sinks, int) or isinstance(self.sinks, bool) or self.sinks < 0:
            raise ConfigError(f"method.sinks must be an integer >= 0, got {self.sinks!r}")
        if self.budget.tokens is not None and self.budget.tokens <= self.sinks:
            raise ConfigError(
                f"method.budget.tokens={self.budget.tokens} must exceed method.sinks={self.sinks} "
                "(the recent window needs at least the current token)"
            )

    def attended_bound(self, context: int, page_size: int) -> int:
        """Sinks + window: the budget at this context (the current token included)."""
        return min(context, self.budget.budget_tokens(context))

    def kept(self, end: int) -> tuple[int, int]:
        """``(sinks, window start)``: positions ``[0, sinks) ∪ [start, end)`` are kept at context ``end``."""
        budget = self.budget.budget_tokens(end)
        if end <= budget:
            return end, end
        sinks = min(self.sinks, budget - 1)  # a tiny fraction budget keeps at least the current token
        return sinks, end - (budget - sinks)

    # ---- state and plan -----------------------------------------------------------------------
    def new_state(self, spec: ModelSpec, batch: int, capacity: int, device: torch.device) -> StreamingState:
        P = spec.page_size
        T = math.ceil(capacity / P) * P
        budget = min(capacity, self.budget.budget_tokens(capacity))
        width = min(T // P, math.ceil(self.sinks / P) + math.ceil(budget / P) + 1)
        return StreamingState(torch.zeros(batch, T, dtype=torch.bool, device=device), P, width)

    def plan(
        self, state: StreamingState, ends: list[int], steps: list[int], phase: str, last_chunk: bool = False
    ) -> dict[str, list[int]]:
        kept = [self.kept(e) for e in ends]
        return {
            "sinks": [s for s, _ in kept],
            "start": [w for _, w in kept],
            "budget": [self.budget.budget_tokens(e) for e in ends],
        }

    def prefilled(self, state: StreamingState, ends: list[int]) -> None:
        t = torch.arange(state.live.shape[1], device=state.live.device)
        for b, end in enumerate(ends):
            sinks, start = self.kept(end)
            state.live[b] = (t < end) & ((t < sinks) | (t >= start))

    def _evict(self, fwd: Forward) -> None:
        """Mark this forward's tokens live, then keep ``[0, sinks) ∪ [start, ...)`` only (every layer)."""
        live = fwd.state.live
        live.scatter_(1, fwd.pos, True)
        t = torch.arange(live.shape[1], device=live.device).view(1, -1)
        live &= (t < fwd.plan["sinks"].view(-1, 1)) | (t >= fwd.plan["start"].view(-1, 1))

    def _pages(self, fwd: Forward) -> tuple[torch.Tensor, torch.Tensor]:
        """``([B, 1, width], [B])``: the sink pages, then the window's pages (no duplicates)."""
        P, width = fwd.state.page_size, fwd.state.width
        sink_pages = (fwd.plan["sinks"] + P - 1) // P  # [B]
        first = torch.maximum(fwd.plan["start"] // P, sink_pages)
        count = sink_pages + (fwd.n_pages - first)
        i = torch.arange(width, device=fwd.pos.device).view(1, width)
        page = torch.where(i < sink_pages.view(-1, 1), i, first.view(-1, 1) + i - sink_pages.view(-1, 1))
        return torch.where(i < count.view(-1, 1), page, torch.full_like(page, -1)).unsqueeze(1), count

    # ---- attention -----------------------------------------------------------------------------
    def prefill(self, layer: int, q: torch.Tensor, fwd: Forward) -> tuple[torch.Tensor, torch.Tensor]:
        if layer == 0:
            fwd.state.live.scatter_(1, fwd.pos, True)
        result = attend_dense(layer, q, fwd, need_lse=False)
        if fwd.last_chunk and layer == fwd.spec.num_layers - 1:  # once, after every layer saw the prompt
            self._evict(fwd)
        return result

    def decode(self, layer: int, q: torch.Tensor, fwd: Forward) -> tuple[torch.Tensor, torch.Tensor]:
        live = fwd.state.live
        if layer == 0:  # before the first layer attends: the whole step sees the budgeted cache
            self._evict(fwd)
        pages, count = fwd.derived("streaming_pages", lambda: self._pages(fwd))
        H_kv = fwd.spec.num_kv_heads
        c = fwd.cache
        out, lse = fwd.ops.sparse_attention(
            q, c.k[layer], c.v[layer], c.page_table, pages.expand(-1, H_kv, -1), fwd.pos, fwd.scaling,
            key_mask=live.unsqueeze(1).expand(-1, H_kv, -1), num_units=count,
        )  # fmt: skip
        return out, lse

    def end_step(self, fwd: Forward) -> dict[str, torch.Tensor]:
        live = fwd.state.live.sum(dim=1).float()  # every layer attends the same live set
        fwd.acct.add_layers({"attended_kv": live.expand(fwd.spec.num_layers, -1)})
        return {"resident_kv": live, "budget_kv": fwd.plan["budget"].float()}
