"""RetroAttention (Choi et al., ICLR 2026): retrospective sparse attention with an output cache.

A wrapper around a selecting method (``base: quest`` by default; ``infllm`` and ``oracle`` work
too). Per decode step T and sparse layer:

1. the current query selects keys ``S_T`` with the base method and attends to them;
2. each earlier generated token t still in the window (the w-1 previous steps) attends only to
   the keys of ``S_T`` it has not seen yet: a key is new for t exactly when its "last loaded step"
   ``A < step(t)``; keys after t's position are masked (causality);
3. that supplementary output is merged into t's cached (output, LSE) by log-sum-exp weights;
4. ``A <- T`` for every key of ``S_T``;
5. the engine feeds the window's tokens through the whole model each step, so t's revised output
   flows through o_proj, the MLP and later layers and its K/V are overwritten there.

After t leaves the window its output equals attention over the union of what steps t..t+w-1
loaded (restricted to keys at or before t) — exactly so in the first sparse layer, where t's query
never changes. ``A`` is kept per key rather than per page so token-level bases (oracle tokens,
InfLLM's windows) work; for page-aligned bases it is the paper's per-page mask.

Open choices of the paper are settings: ``past_query`` (``recomputed``: the past token's query as
re-embedded this step, default; ``cached``: the query it had when it was current), plus the base's
``selection``, ``dense_layers``, ``budget`` and ``min_pages``. See methods/README.md.
"""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from retrobench.kernels.attention_ref import attention_ref, causal_mask, merge_states_ref
from retrobench.methods.base import AttnResult, ConfigError, Method, ModelSpec, StepInfo
from retrobench.methods.common import SelectionMethod, attend_selection, dense_decode, selection_heads

PAST_QUERIES = ("recomputed", "cached")


def selecting_methods() -> dict[str, type[SelectionMethod]]:
    """Selecting methods discovered from ``retrobench.methods`` (one module per method, no central list)."""
    import retrobench.methods as package

    found: dict[str, type[SelectionMethod]] = {}
    for info in pkgutil.iter_modules(package.__path__):
        if info.name in ("base", "common", "retro"):
            continue
        module = importlib.import_module(f"retrobench.methods.{info.name}")
        for obj in vars(module).values():
            if isinstance(obj, type) and issubclass(obj, SelectionMethod) and obj.__module__ == module.__name__:
                found[obj.name] = obj
    return found


@dataclass
class PastEntry:
    """Output-cache entry of one past token in one layer: its state and exposure counts."""

    step: int
    out: torch.Tensor  # [H, D] current merged output
    lse: torch.Tensor  # [H] its log-sum-exp
    query: torch.Tensor  # [H, D] the query it had when it was current (past_query: cached)
    own: torch.Tensor  # [H_sel] keys in its own selection (visible to it)
    exposed: torch.Tensor  # [H_sel] own + supplement keys


@dataclass
class RetroState:
    base: Any
    last_loaded: torch.Tensor  # A: [L, B, H_sel, max_tokens] int64, -1 = never loaded
    outputs: list[list[dict[int, PastEntry]]]  # [layer][b] position -> entry
    finished: list[float] = field(default_factory=list)  # exposures finalised this step
    supplement: list[float] = field(default_factory=list)  # supplement keys attended this step


@dataclass
class RetroMethod(Method):
    """RetroAttention around a selecting ``base`` method.

    Settings:
        base: name of a selecting method (quest | infllm | oracle); its other settings go in
            ``base_options``.
        window: retrospective window w >= 1 (default 2; 1 is exactly the base method).
        past_query: ``recomputed`` (default) | ``cached``.
        budget, min_pages, selection, dense_layers: passed to the base method; left unset (null),
            each takes the base method's own default.
    """

    name: ClassVar[str] = "retro"
    reports_exposure: ClassVar[bool] = True
    base: str = "quest"
    window: int = 2
    past_query: str = "recomputed"
    budget: Any = field(default_factory=lambda: {"fraction": 0.15})
    min_pages: int | None = None
    selection: str | None = None
    dense_layers: int | None = None  # type: ignore[assignment]
    base_options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.window, int) or self.window < 1:
            raise ConfigError(f"method.window must be an integer >= 1, got {self.window!r}")
        if self.past_query not in PAST_QUERIES:
            raise ConfigError(f"method.past_query={self.past_query!r} is not supported; allowed: {', '.join(PAST_QUERIES)}")
        bases = selecting_methods()
        if self.base not in bases:
            raise ConfigError(f"method.base={self.base!r} is not a selecting method; allowed: {', '.join(sorted(bases))}")
        self.base_options = dict(self.base_options)
        shared = {"budget": self.budget, "min_pages": self.min_pages, "selection": self.selection,
                  "dense_layers": self.dense_layers}  # fmt: skip
        # unset shared settings take the base method's own defaults
        self.selector: SelectionMethod = bases[self.base](
            **{k: v for k, v in shared.items() if v is not None}, **self.base_options
        )
        self.budget, self.min_pages = self.selector.budget, self.selector.min_pages
        self.selection, self.dense_layers = self.selector.selection, self.selector.dense_layers
        super().__post_init__()

    @property
    def reprocess_window(self) -> int:
        return self.window

    def attended_bound(self, context: int, page_size: int) -> int:
        return self.selector.attended_bound(context, page_size)

    # ---- state ------------------------------------------------------------------------------
    def new_state(self, spec: ModelSpec, batch_size: int, device: torch.device) -> RetroState:
        h_sel = selection_heads(self.selection, spec.num_heads, spec.num_kv_heads)
        return RetroState(
            base=self.selector.new_state(spec, batch_size, device),
            last_loaded=torch.full((spec.num_layers, batch_size, h_sel, 0), -1, dtype=torch.long, device=device),
            outputs=[[{} for _ in range(batch_size)] for _ in range(spec.num_layers)],
        )

    def prefill(self, layer: int, q: torch.Tensor, cache: Any, info: StepInfo, state: RetroState) -> AttnResult:
        return self.selector.prefill(layer, q, cache, info, state.base)

    # ---- decode -------------------------------------------------------------------------------
    def decode(self, layer: int, q: torch.Tensor, cache: Any, info: StepInfo, state: RetroState) -> AttnResult:
        if self.is_dense_layer(layer):
            return dense_decode(layer, q, cache, info)
        self._grow(state, cache.max_tokens)
        outs, lses, attended, pages = [], [], [], []
        for b in range(q.shape[0]):
            out, lse, att, n_pages = self._decode_one(layer, q[b], cache, info, state, b)
            outs.append(out)
            lses.append(lse)
            attended.append(att)
            pages.append(n_pages)
        return AttnResult(out=torch.stack(outs), lse=torch.stack(lses), attended=torch.stack(attended),
                          pages=torch.stack(pages) if pages[0] is not None else None)  # fmt: skip

    def _decode_one(self, layer: int, q: torch.Tensor, cache: Any, info: StepInfo, state: RetroState, b: int):
        pos = info.positions[b]  # [S]: S-1 past tokens, then the current one
        S, T = pos.shape[0], info.step
        end = int(pos[-1]) + 1
        keys, values = cache.keys(layer, b, end), cache.values(layer, b, end)
        live = cache.live_mask(layer, b, end)
        select, n_pages = self.selector.select(layer, q[:, -1], cache, b, end, state.base, info.scaling)
        out_t, lse_t, att_t = attend_selection(q[:, -1:], keys, values, pos[-1:], info.scaling, select, live)
        A = state.last_loaded[layer, b, :, :end]  # [H_sel, end]
        entries = state.outputs[layer][b]
        outs, lses = [], []
        attended = torch.zeros(S)
        for i in range(S - 1):  # supplementary attention of each past token in the window
            p, step_i = int(pos[i]), T - (S - 1) + i
            entry = entries[p]
            new = select & (A < step_i) & live & causal_mask(pos[i : i + 1], end)  # [H_sel, end]
            query = q[:, i : i + 1] if self.past_query == "recomputed" else entry.query.unsqueeze(1)
            sup_out, sup_lse = attention_ref(query, keys, values, info.scaling, new.unsqueeze(1))
            entry.out, entry.lse = merge_states_ref(entry.out, entry.lse, sup_out[:, 0], sup_lse[:, 0])
            count = new.sum(dim=-1).float()
            entry.exposed = entry.exposed + count
            attended[i] = count.mean()
            state.supplement.append(float(count.mean()))
            outs.append(entry.out)
            lses.append(entry.lse)
        A[select] = T  # every key loaded now
        own = (select & live & causal_mask(pos[-1:], end)).sum(dim=-1).float()
        entries[int(pos[-1])] = PastEntry(T, out_t[:, 0], lse_t[:, 0], q[:, -1].clone(), own, own.clone())
        for p in [p for p, e in entries.items() if e.step <= T + 1 - self.window]:  # leaves the window
            done = entries.pop(p)
            state.finished.append(float((done.exposed / done.own.clamp_min(1)).mean()))
        outs.append(out_t[:, 0])
        lses.append(lse_t[:, 0])
        attended[-1] = att_t[0]
        n = n_pages.float().mean().expand(S) if n_pages is not None else None
        return torch.stack(outs, dim=1), torch.stack(lses, dim=1), attended, n

    def _grow(self, state: RetroState, max_tokens: int) -> None:
        if state.last_loaded.shape[-1] < max_tokens:
            L, B, H_sel, _ = state.last_loaded.shape
            grown = torch.full((L, B, H_sel, max_tokens), -1, dtype=torch.long, device=state.last_loaded.device)
            grown[..., : state.last_loaded.shape[-1]] = state.last_loaded
            state.last_loaded = grown

    def end_step(self, info: StepInfo, cache: Any, state: RetroState) -> dict[str, float]:
        stats: dict[str, float] = {}
        if state.finished:
            stats["exposure"] = sum(state.finished) / len(state.finished)
        stats["supplement_kv"] = sum(state.supplement) / max(1, len(state.supplement)) if state.supplement else 0.0
        stats["output_cache_bytes"] = float(self.output_cache_bytes(state))
        state.finished, state.supplement = [], []
        return stats

    @staticmethod
    def output_cache_bytes(state: RetroState) -> int:
        """Bytes held by the output cache (outputs, LSEs and cached queries of past tokens)."""
        total = 0
        for layer in state.outputs:
            for entries in layer:
                for e in entries.values():
                    total += sum(t.numel() * t.element_size() for t in (e.out, e.lse, e.query))
        return total
