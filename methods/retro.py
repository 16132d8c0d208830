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
never changes. ``A`` is kept per selection *unit* of the base: per page for page-selecting bases
(quest, oracle pages: the paper's per-page mask), per token for token-level bases (oracle tokens,
InfLLM's windows).

Static state, preallocated per request: ``A [L, B, H_sel, units + 1]`` (the last column keeps
the reference's padding scatter a no-op), and the output cache ``[L, B, w-1, ...]``: per past
token its merged output and LSE (fp32), its own and exposed key counts per selection head, and its query (``past_query:
cached``). The cache is a ring: the token generated at step t lives in slot ``t mod (w-1)``, so
each step the current token takes the slot of the oldest, which leaves (its exposure is recorded
first), and nothing else moves. The past
tokens are extra query rows of the current token's one sparse-attention call (they read no extra
K/V); ``A < q_step`` hides units a row has already seen. Dense layers attend the current token
only and return each past token's output from ``dense_out [dense_layers, B, w-1, H, D]``, kept when
it was current, in the same ring slot (a dense layer's inputs for a past token never change).

Open choices of the paper are settings: ``past_query`` (``recomputed``: the past token's query as
re-embedded this step, default; ``cached``: the query it had when it was current), plus the base's
``selection``, ``dense_layers``, ``budget`` and ``min_pages``. See methods/README.md.
"""

from __future__ import annotations

import dataclasses
import importlib
import math
import pkgutil
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from retrobench.kernels.retro import ring_slots
from retrobench.methods.base import ConfigError, Forward, Method, ModelSpec, attend_dense
from retrobench.methods.common import SelectionMethod, attend_selection, selection_accounting, visible_keys

PAST_QUERIES = ("recomputed", "cached")


def ring_index(step: torch.Tensor, slots: int, past: int = 0) -> tuple[Any, Any]:
    """Index over the (batch, slot) dims of a ring ``[B, w-1, ...]``: with ``past`` the slots of the
    ``past`` tokens before ``step [B]`` (oldest first, ``[B, past]``), else the slot of the step's own
    token (the oldest one's, which it replaces, ``[B]``). One slot (w = 2): plain slices, so reads
    are views and writes are copies, with no index kernels."""
    if slots == 1:
        return (slice(None), slice(0, past)) if past else (slice(None), 0)
    b = torch.arange(step.shape[0], device=step.device)
    return (b.view(-1, 1), ring_slots(step, past, slots)) if past else (b, step % slots)


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
class RetroState:
    base: Any
    last_loaded: torch.Tensor  # A: [L, B, H_sel, units + 1] int32, -1 = never loaded
    out: torch.Tensor  # [L, B, w-1, H, D] fp32 merged outputs of the past tokens
    lse: torch.Tensor  # [L, B, w-1, H] fp32 (-inf: empty slot)
    own: torch.Tensor  # [L, B, w-1, H_sel] keys in each past token's own selection
    exposed: torch.Tensor  # [L, B, w-1, H_sel] own + supplement keys
    query: torch.Tensor | None  # [L, B, w-1, H, D] the query a past token had when current (cached)
    cur_out: torch.Tensor  # [L, B, H, D] this step's current-token output, cached at the step's end
    cur_lse: torch.Tensor  # [L, B, H]
    cur_query: torch.Tensor | None  # [L, B, H, D] (cached)
    dense_out: torch.Tensor  # [dense_layers, B, w-1, H, D] fp32: each past token's dense-layer outputs
    unit: int
    cache_bytes: float  # bytes of the output cache per sequence


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

    @property
    def needs_page_meta(self) -> bool:  # type: ignore[override]
        return self.selector.needs_page_meta

    def attended_bound(self, context: int, page_size: int) -> int:
        return self.selector.attended_bound(context, page_size)

    # ---- state and plan ---------------------------------------------------------------------------
    def new_state(self, spec: ModelSpec, batch: int, capacity: int, device: torch.device) -> RetroState:
        unit = self.selector.unit(spec)
        units = math.ceil(capacity / spec.page_size) * spec.page_size // unit
        L, H, D, slots = spec.num_layers, spec.num_heads, spec.head_dim, self.window - 1
        h_sel = self.selector.selection_heads(spec)
        f32 = {"dtype": torch.float32, "device": device}
        cached = self.past_query == "cached"
        q_bytes = H * D * torch.finfo(torch.get_default_dtype()).bits // 8 if cached else 0
        return RetroState(
            base=self.selector.new_state(spec, batch, capacity, device),
            last_loaded=torch.full((L, batch, h_sel, units + 1), -1, dtype=torch.int32, device=device),
            out=torch.zeros(L, batch, slots, H, D, **f32),
            lse=torch.full((L, batch, slots, H), float("-inf"), **f32),
            own=torch.zeros(L, batch, slots, h_sel, **f32),
            exposed=torch.zeros(L, batch, slots, h_sel, **f32),
            query=torch.zeros(L, batch, slots, H, D, device=device) if cached else None,
            cur_out=torch.zeros(L, batch, H, D, **f32),
            cur_lse=torch.full((L, batch, H), float("-inf"), **f32),
            cur_query=torch.zeros(L, batch, H, D, device=device) if cached else None,
            dense_out=torch.zeros(self.dense_layers, batch, slots, H, D, **f32),
            unit=unit,
            cache_bytes=float((L - self.dense_layers) * slots * (H * D * 4 + H * 4 + q_bytes)),
        )

    def plan(
        self, state: RetroState, ends: list[int], steps: list[int], phase: str, last_chunk: bool = False
    ) -> dict[str, list[int]]:
        values = self.selector.plan(state.base, ends, steps, phase, last_chunk)
        values["leaving"] = [int(s >= self.window - 1) for s in steps]  # the oldest past token leaves
        return values

    def _base_fwd(self, fwd: Forward) -> Forward:
        return dataclasses.replace(fwd, state=fwd.state.base)

    def prepare(self, fwd: Forward) -> None:
        self.selector.prepare(self._base_fwd(fwd))

    def prefilled(self, state: RetroState, ends: list[int]) -> None:
        self.selector.prefilled(state.base, ends)

    def prefill(self, layer: int, q: torch.Tensor, fwd: Forward) -> tuple[torch.Tensor, torch.Tensor]:
        return self.selector.prefill(layer, q, self._base_fwd(fwd))

    # ---- decode -------------------------------------------------------------------------------------
    def decode(self, layer: int, q: torch.Tensor, fwd: Forward) -> tuple[torch.Tensor, torch.Tensor]:
        """Per layer only what the layer's output needs: the selection, one attention call for the
        current and past rows, the past rows' merge into the output cache, and ``A``. The counts
        (exposure, supplements) are taken once per step, for every layer, in :meth:`end_step`."""
        state: RetroState = fwd.state
        S, slots = q.shape[2], self.window - 1
        if self.is_dense_layer(layer):
            return self._decode_dense(layer, q, fwd, state) if slots else attend_dense(layer, q, fwd, need_lse=False)
        q_cur = q[:, :, -1]
        sel = self.selector.select(layer, q_cur, fwd, state.base)
        A = state.last_loaded[layer]
        fwd.acct.keep(layer, "units", sel.units)
        if S == 1:
            out, lse = attend_selection(layer, q, fwd, sel)
        else:
            rows = q
            if self.past_query == "cached":  # the queries the past tokens had when they were current
                past_q = state.query[layer][ring_index(fwd.step, slots, S - 1)].transpose(1, 2).to(q.dtype)
                rows = torch.cat([past_q, q[:, :, -1:]], dim=2)
            out, lse = attend_selection(layer, rows, fwd, sel, page_step=A, q_step=fwd.q_step)
        self.selector.observe(layer, q_cur, sel, lse[:, :, -1], fwd, state.base)
        # A before this step (the supplement counts of end_step), straight into the step's scratch
        seen = fwd.acct.slot(layer, "seen", sel.units.shape, A.dtype, A.device) if S > 1 else None
        if slots:  # past rows merged into the output cache (and leave the layer merged), the current row
            # kept, and A <- step for S_T: one op
            fwd.ops.retro_upkeep(A, sel.units, fwd.step, out, lse, state.out[layer], state.lse[layer],
                                 state.cur_out[layer], state.cur_lse[layer], seen=seen)  # fmt: skip
            if state.query is not None:
                state.cur_query[layer] = q_cur
        else:
            fwd.ops.mark_loaded(A, sel.units, fwd.step, seen=seen)
        return out, lse

    def _decode_dense(self, layer: int, q: torch.Tensor, fwd: Forward, state: RetroState) -> tuple[torch.Tensor, None]:
        """A dense layer attends the current token only. The past tokens' outputs come from ``dense_out``,
        where each was kept when it was current: a dense layer's inputs for a past token never change
        (every dense layer precedes every sparse one), so recomputing them would read the whole
        context again for each past row (w-1 more query rows over every key) for the same result up to
        rounding."""
        S, slots = q.shape[2], self.window - 1
        cur, _ = attend_dense(layer, q[:, :, -1:], fwd, need_lse=False, q_pos=fwd.pos[:, -1:])  # [B, H, 1, D]
        cache = state.dense_out[layer]  # [B, w-1, H, D]
        out = cur
        if S > 1:  # read the past rows before the current token takes the oldest one's slot
            past = cache[ring_index(fwd.step, slots, S - 1)]  # [B, S-1, H, D]
            out = torch.cat([past.transpose(1, 2).to(q.dtype), cur], dim=2)
        cache[ring_index(fwd.step, slots)] = cur[:, :, 0].float()
        return out, None

    def end_step(self, fwd: Forward) -> dict[str, torch.Tensor]:
        """Accounting and output-cache upkeep of every sparse layer at once: attended keys, the past rows'
        supplement counts, the leaving token's exposure, then the current token takes its ring slot."""
        state: RetroState = fwd.state
        first, slots, S = self.dense_layers, self.window - 1, fwd.pos.shape[1]
        units = fwd.acct.kept["units"][first:]  # [L', B, H_sel, K]
        own, pages = selection_accounting(fwd, units, state.unit)  # [L', B, H_sel]
        values = {"attended_kv": own.mean(dim=-1), "pages_selected": pages.mean(dim=-1)}
        if slots == 0:  # w = 1: the current token leaves at once, exposed to its own selection only
            values["exposure"] = torch.ones_like(values["attended_kv"])
            values["supplement_kv"] = torch.zeros_like(values["attended_kv"])
            fwd.acct.add_layers(values)
        else:
            ow, ex = state.own[first:], state.exposed[first:]  # [L', B, slots, H_sel]
            if S > 1:
                new = visible_keys(units, state.unit, fwd.pos[:, :-1], steps=fwd.acct.kept["seen"][first:],
                                   q_step=fwd.q_step[:, :-1])  # [L', B, H_sel, S-1]  # fmt: skip
                past = (slice(None), *ring_index(fwd.step, slots, S - 1))
                if slots == 1:  # a view: add in place
                    ex[past].add_(new.transpose(2, 3))
                else:
                    ex[past] += new.transpose(2, 3)
                values["supplement_kv"] = new.mean(dim=(2, 3))
            else:
                values["supplement_kv"] = torch.zeros_like(values["attended_kv"])
            oldest = (slice(None), *ring_index(fwd.step, slots))  # the leaving token's slot, the current's from now on
            values["exposure"] = (ex[oldest] / ow[oldest].clamp(min=1)).mean(dim=-1)
            leaving = fwd.plan["leaving"].to(torch.bool).expand(units.shape[0], -1)
            fwd.acct.add_layers(values, valid={"exposure": leaving})
            pairs = [(ow, own), (ex, own), (state.out[first:], state.cur_out[first:].float()),
                     (state.lse[first:], state.cur_lse[first:])]  # fmt: skip
            if state.query is not None:
                pairs.append((state.query[first:], state.cur_query[first:]))
            for cache, newest in pairs:
                cache[oldest] = newest
        values = self.selector_end_step(fwd)
        values["output_cache_bytes"] = torch.full_like(values["resident_kv"], state.cache_bytes)
        return values

    def selector_end_step(self, fwd: Forward) -> dict[str, torch.Tensor]:
        """The base's per-step values (resident KV), without its own selection accounting."""
        return Method.end_step(self.selector, self._base_fwd(fwd))
