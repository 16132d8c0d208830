"""StreamingLLM (Xiao et al., ICLR 2024, "Efficient Streaming Language Models with Attention Sinks").

Keeps the first ``sinks`` tokens (the attention sinks) plus a window of the most recent tokens and
frees the KV of everything else in every layer, so resident KV stays at the budget instead of
growing with the context. The evicted set depends only on positions, so one eviction serves all
layers and the first layer already attends over the compressed cache.

Budget (see methods/README.md): ``budget = sinks + window`` tokens of the current context (the
positions seen so far, the current token included, re-evaluated every step for ``fraction``); the
window includes the current token. Eviction runs at two points:

* end of prefill (``info.last_chunk``, after the last layer's dense prompt attention): the prompt
  is cut to ``budget(L)`` so resident KV shrinks before decoding starts;
* every decode step, at layer 0 before attending: the cache (now holding the new token) is cut to
  ``budget(context)``, so every query of every layer, the first decode step included, attends to
  at most ``budget`` keys and resident KV after the step is at most ``budget``.

Positions keep their original RoPE (no re-rotation into cache slots, unlike StreamingLLM's
rolling cache): a deviation stated in the method card.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from retrobench.methods.base import AttnResult, ConfigError, Method, StepInfo, as_budget, attend_live
from retrobench.methods.common import context_lengths, require_no_dense_layers


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

    def kept(self, end: int, device: torch.device | None = None) -> torch.Tensor:
        """``[end]`` bool: the positions StreamingLLM keeps at context length ``end``."""
        budget = self.budget.budget_tokens(end)
        idx = torch.arange(end, device=device)
        if end <= budget:
            return torch.ones(end, dtype=torch.bool, device=device)
        sinks = min(self.sinks, budget - 1)  # a tiny fraction budget keeps at least the current token
        return (idx < sinks) | (idx >= end - (budget - sinks))

    def _evict(self, cache: Any, info: StepInfo) -> None:
        for b, end in enumerate(context_lengths(info)):
            live = cache.live_mask(0, b, end)  # eviction is global: every layer holds the same set
            drop = torch.nonzero(live & ~self.kept(end, live.device)).squeeze(1)
            cache.evict(b, drop)

    def prefill(self, layer: int, q: torch.Tensor, cache: Any, info: StepInfo, state: Any) -> AttnResult:
        result = attend_live(layer, q, cache, info)
        if info.last_chunk and layer == cache.num_layers - 1:  # once, after every layer saw the prompt
            self._evict(cache, info)
        return result

    def decode(self, layer: int, q: torch.Tensor, cache: Any, info: StepInfo, state: Any) -> AttnResult:
        if layer == 0:  # before the first layer attends: the whole step sees the budgeted cache
            self._evict(cache, info)
        return attend_live(layer, q, cache, info)

    def end_step(self, info: StepInfo, cache: Any, state: Any) -> dict[str, float]:
        ends = context_lengths(info)
        return {"budget_kv": sum(self.budget.budget_tokens(e) for e in ends) / len(ends)}
