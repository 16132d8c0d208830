"""The method contract: how a KV-selection method plugs into the shared decoding engine.

The engine runs the model with transformers' own modules and calls, for every attention layer
of every forward, either :meth:`Method.prefill` (dense prompt chunks) or :meth:`Method.decode`
(one or more query tokens per sequence). The method receives the query, the engine-owned
paged KV cache (already holding this forward's keys/values) and its explicit per-request
state, and returns the attention output, its natural-log log-sum-exp and its accounting.

A method is a small dataclass (kvpress style): settings are fields, validated in
``__post_init__`` so a bad config fails before any model loads. Per-request state is created
by :meth:`Method.new_state` for every sample and never stored on the method itself, so one
method object can serve any number of requests.

Shape glossary (used across retrobench):
    B     batch (sequences)            H     query heads         H_kv  KV heads
    G     query heads per KV head      T     tokens in the cache S     query tokens this forward
    D     head dim                     K     selected entries    P     page size
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from retrobench.kernels.attention_ref import dense_attention_ref

if TYPE_CHECKING:  # the engine owns the cache; methods only use its public accessors
    from retrobench.engine.cache import PagedKVCache


class ConfigError(ValueError):
    """A configuration value is invalid. The message names the key and the allowed values."""


@dataclass(frozen=True)
class ModelSpec:
    """What a method needs to know about the model and the cache layout."""

    num_layers: int
    num_heads: int  # H
    num_kv_heads: int  # H_kv
    head_dim: int  # D
    page_size: int  # P

    @property
    def group_size(self) -> int:  # G
        return self.num_heads // self.num_kv_heads


@dataclass
class StepInfo:
    """What the engine tells a method about the current forward.

    Attributes
    ----------
    phase: ``"prefill"`` or ``"decode"``.
    positions: ``[B, S]`` absolute positions of this forward's query tokens (ascending). In a
        decode step with a retrospective window, the first S-1 are earlier generated tokens
        being re-run (their K/V overwritten) and the last is the current token.
    step: index of the decode step (0 for the first generated token's forward); -1 in prefill.
    scaling: softmax scale (1/sqrt(D) for Llama-family models).
    last_chunk: in prefill, whether this forward holds the prompt's last token (eviction methods
        compress the prompt then).
    """

    phase: str
    positions: torch.Tensor
    step: int
    scaling: float
    last_chunk: bool = False


@dataclass
class AttnResult:
    """A method's answer for one layer and one forward.

    out: ``[B, H, S, D]`` attention output (query dtype).
    lse: ``[B, H, S]`` natural-log log-sum-exp of the scaled scores over the attended keys (fp32).
    attended: ``[B, S]`` KV tokens attended by each query, averaged over KV heads (fp32), or None
        in prefill.
    pages: ``[B, S]`` pages selected per query, averaged over KV heads, or None when the method
        does not select pages.
    """

    out: torch.Tensor
    lse: torch.Tensor
    attended: torch.Tensor | None = None
    pages: torch.Tensor | None = None


@dataclass
class Budget:
    """A KV budget: ``tokens: N`` or ``fraction: b`` of the current context (recomputed every step).

    Pages selected = ceil(budget / P), at least ``min_pages``; see DESIGN.md "Budget semantics".
    """

    tokens: int | None = None
    fraction: float | None = None

    def __post_init__(self) -> None:
        if (self.tokens is None) == (self.fraction is None):
            raise ConfigError(
                "method.budget: set exactly one of method.budget.tokens (int > 0) or "
                f"method.budget.fraction (0 < b <= 1), nulling the other (e.g. method.budget.tokens=2048 "
                f"method.budget.fraction=null); got tokens={self.tokens}, fraction={self.fraction}"
            )
        if self.tokens is not None and (not isinstance(self.tokens, int) or self.tokens <= 0):
            raise ConfigError(f"method.budget.tokens must be an integer > 0, got {self.tokens!r}")
        if self.fraction is not None and not (0.0 < float(self.fraction) <= 1.0):
            raise ConfigError(f"method.budget.fraction must be in (0, 1], got {self.fraction!r}")

    def budget_tokens(self, context: int) -> int:
        """The nominal budget in tokens for a context of ``context`` tokens (at least 1)."""
        if self.tokens is not None:
            return int(self.tokens)
        return max(1, math.ceil(float(self.fraction) * context))

    def num_pages(self, context: int, page_size: int, min_pages: int = 1) -> int:
        """Pages to select at this context length: ceil(budget / P), at least ``min_pages``."""
        return max(min_pages, math.ceil(self.budget_tokens(context) / page_size))

    def describe(self) -> str:
        return f"tokens={self.tokens}" if self.tokens is not None else f"fraction={self.fraction}"


def as_budget(value: Any) -> Budget:
    """Accept a Budget, a mapping from Hydra (``{tokens: N}`` / ``{fraction: b}``) or None."""
    if isinstance(value, Budget):
        return value
    if value is None:
        raise ConfigError("method.budget is required: set method.budget.tokens or method.budget.fraction")
    try:
        items = dict(value)
    except (TypeError, ValueError):
        raise ConfigError(f"method.budget must be a mapping with tokens or fraction, got {value!r}") from None
    unknown = set(items) - {"tokens", "fraction"}
    if unknown:
        raise ConfigError(f"method.budget: unknown key(s) {sorted(unknown)}; allowed: tokens, fraction")
    return Budget(tokens=items.get("tokens"), fraction=items.get("fraction"))


@dataclass
class Method:
    """Base class of every method. Subclasses are dataclasses with their own settings.

    Settings shared by all methods:
        dense_layers: layers [0, dense_layers) use full attention and are not counted in budget
            accounting (Quest keeps 2 dense layers).
    """

    name: ClassVar[str] = "base"
    reports_exposure: ClassVar[bool] = False  # True: end_step reports effective KV exposure itself
    dense_layers: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.dense_layers, int) or self.dense_layers < 0:
            raise ConfigError(f"method.dense_layers must be an integer >= 0, got {self.dense_layers!r}")

    # ---- engine-facing properties ------------------------------------------------------
    @property
    def reprocess_window(self) -> int:
        """Tokens fed per decode step: 1 + how many earlier generated tokens are re-run (RetroAttention)."""
        return 1

    def is_dense_layer(self, layer: int) -> bool:
        return layer < self.dense_layers

    # ---- per-request state -------------------------------------------------------------
    def new_state(self, spec: ModelSpec, batch_size: int, device: torch.device) -> Any:
        """Fresh per-request state. Called once per sample; the engine passes it back on every call."""
        return None

    # ---- attention ----------------------------------------------------------------------
    def prefill(
        self, layer: int, q: torch.Tensor, cache: PagedKVCache, info: StepInfo, state: Any
    ) -> AttnResult:
        """Dense causal attention of prompt chunk queries ``q [B, H, S, D]`` over the cache.

        Methods that need statistics of the prompt (e.g. attention received by each key) override
        this and call :func:`dense_prefill` themselves.
        """
        return dense_prefill(layer, q, cache, info)

    def decode(
        self, layer: int, q: torch.Tensor, cache: PagedKVCache, info: StepInfo, state: Any
    ) -> AttnResult:
        raise NotImplementedError

    def attended_bound(self, context: int, page_size: int) -> int:
        """Most KV tokens the current query of a sparse layer may attend at this context length.

        The budget check of the test matrix; each method's card states the same rule.
        """
        return context

    def end_step(self, info: StepInfo, cache: PagedKVCache, state: Any) -> dict[str, float]:
        """Called once after every forward's last layer; returns extra per-step stats (e.g. exposure)."""
        return {}

    def resident_tokens(self, cache: PagedKVCache, state: Any) -> torch.Tensor:
        """``[B]`` KV tokens resident in memory (eviction methods free entries)."""
        return cache.resident_tokens()

    # ---- description ----------------------------------------------------------------------
    def settings(self) -> dict[str, Any]:
        """Flat description of the method for result rows."""
        out: dict[str, Any] = {"method": self.name}
        for key, value in asdict(self).items():
            if isinstance(value, dict):
                for sub, subval in value.items():
                    out[f"{key}.{sub}"] = subval
            else:
                out[key] = value
        return out


def attend_live(layer: int, q: torch.Tensor, cache: PagedKVCache, info: StepInfo) -> AttnResult:
    """Causal attention of ``q [B, H, S, D]`` at ``info.positions`` over every live key of the cache.

    What full attention computes, prefill and decode alike; ``attended [B, S]`` counts the live
    keys visible to each query.
    """
    outs, lses, attended = [], [], []
    for b in range(q.shape[0]):
        pos = info.positions[b]
        end = int(pos.max()) + 1
        live = cache.live_mask(layer, b, end)
        out, lse = dense_attention_ref(
            q[b], cache.keys(layer, b, end), cache.values(layer, b, end), pos, info.scaling, key_mask=live
        )
        outs.append(out)
        lses.append(lse)
        attended.append(torch.cumsum(live.to(torch.float32), 0)[pos])
    return AttnResult(out=torch.stack(outs), lse=torch.stack(lses), attended=torch.stack(attended))


dense_prefill = attend_live  # prompt chunks are plain causal attention over the live keys


__all__ = [
    "AttnResult",
    "Budget",
    "ConfigError",
    "Method",
    "ModelSpec",
    "StepInfo",
    "as_budget",
    "attend_live",
    "dense_prefill",
]
