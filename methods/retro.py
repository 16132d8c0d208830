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

Static state, preallocated per request: ``A [L, B, H_sel, units + 1]`` (the last column absorbs
padding), and the output cache ``[L, B, w-1, ...]``: per past token its merged output and LSE
(fp32), its own and exposed key counts per selection head, and its query (``past_query:
cached``). Slot j holds the token generated ``w-1-j`` steps before the current one; each step the
oldest leaves (its exposure is recorded) and the current token enters the newest slot. The past
tokens are extra query rows of the current token's one sparse-attention call (they read no extra
K/V); ``A < q_step`` hides units a row has already seen.

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

from retrobench.methods.base import ConfigError, Forward, Method, ModelSpec, attend_dense
from retrobench.methods.common import Selection, SelectionMethod, attend_selection, record_selection

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
class RetroState:
    base: Any
    last_loaded: torch.Tensor  # A: [L, B, H_sel, units + 1] int32, -1 = never loaded
    out: torch.Tensor  # [L, B, w-1, H, D] fp32 merged outputs of the past tokens
    lse: torch.Tensor  # [L, B, w-1, H] fp32 (-inf: empty slot)
    own: torch.Tensor  # [L, B, w-1, H_sel] keys in each past token's own selection
    exposed: torch.Tensor  # [L, B, w-1, H_sel] own + supplement keys
    query: torch.Tensor | None  # [L, B, w-1, H, D] the query a past token had when current (cached)
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
        if self.is_dense_layer(layer):  # past tokens are recomputed with full attention
            return attend_dense(layer, q, fwd)
        state: RetroState = fwd.state
        S = q.shape[2]
        q_cur = q[:, :, -1]
        sel = self.selector.select(layer, q_cur, fwd, state.base)
        A = state.last_loaded[layer]
        if S == 1:
            out, lse = attend_selection(layer, q, fwd, sel)
        else:
            rows = q
            if self.past_query == "cached":  # the queries the past tokens had when they were current
                past = state.query[layer][:, -(S - 1) :].transpose(1, 2).to(q.dtype)
                rows = torch.cat([past, q[:, :, -1:]], dim=2)
            out, lse = attend_selection(layer, rows, fwd, sel, page_step=A, q_step=fwd.q_step)
        self.selector.observe(layer, q_cur, sel, lse[:, :, -1], fwd, state.base)
        own = record_selection(layer, fwd, sel)  # [B, H_sel]
        return self._update(layer, q_cur, sel, A, out, lse, own, fwd)

    def _update(
        self, layer: int, q_cur: torch.Tensor, sel: Selection, A: torch.Tensor, out: torch.Tensor,
        lse: torch.Tensor, own: torch.Tensor, fwd: Forward,
    ) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        """Merge the past rows into the output cache, retire the oldest token, push the current one, set A."""
        state: RetroState = fwd.state
        S, slots = out.shape[2], self.window - 1
        values = {"supplement_kv": torch.zeros_like(own[:, 0])}
        if slots == 0:  # w = 1: the current token leaves at once, exposed to its own selection only
            values["exposure"] = torch.ones_like(own[:, 0])
        else:
            oc, lc, ow, ex = state.out[layer], state.lse[layer], state.own[layer], state.exposed[layer]
            if S > 1:
                past = slice(slots - (S - 1), slots)
                m_out, m_lse = fwd.ops.merge_states(
                    oc[:, past], lc[:, past], out[:, :, :-1].transpose(1, 2).float(), lse[:, :, :-1].transpose(1, 2)
                )  # fmt: skip
                oc[:, past] = m_out
                lc[:, past] = m_lse
                new = self._supplement(sel, A, fwd, S)  # [B, H_sel, S-1]
                ex[:, past] += new.transpose(1, 2)
                values["supplement_kv"] = new.mean(dim=(1, 2))
                out = torch.cat([m_out.transpose(1, 2).to(out.dtype), out[:, :, -1:]], dim=2)
                lse = torch.cat([m_lse.transpose(1, 2), lse[:, :, -1:]], dim=2)
            values["exposure"] = (ex[:, 0] / ow[:, 0].clamp(min=1)).mean(dim=-1)  # the leaving token
            for t, new_row in ((oc, out[:, :, -1].float()), (lc, lse[:, :, -1]), (ow, own), (ex, own)):
                if slots > 1:
                    t[:, :-1] = t[:, 1:].clone()
                t[:, -1] = new_row
            if state.query is not None:
                qc = state.query[layer]
                if slots > 1:
                    qc[:, :-1] = qc[:, 1:].clone()
                qc[:, -1] = q_cur
        fwd.acct.layer(layer, values, valid={"exposure": fwd.plan["leaving"]})
        units = sel.units.long()
        index = torch.where(units < 0, torch.full_like(units, A.shape[-1] - 1), units)
        A.scatter_(2, index, fwd.step.view(-1, 1, 1).expand_as(index).to(A.dtype))
        return out, lse

    @staticmethod
    def _supplement(sel: Selection, A: torch.Tensor, fwd: Forward, S: int) -> torch.Tensor:
        """``[B, H_sel, S-1]`` keys of ``sel`` new to each past row (``A < its step``, at or before it)."""
        units = sel.units.long()
        valid = units >= 0
        seen = torch.gather(A, 2, units.clamp(min=0)).long()  # [B, H_sel, K]
        new = valid.unsqueeze(-1) & (seen.unsqueeze(-1) < fwd.q_step[:, : S - 1].view(-1, 1, 1, S - 1))
        start = units.clamp(min=0).unsqueeze(-1) * sel.unit
        visible = (fwd.pos[:, : S - 1].view(-1, 1, 1, S - 1) + 1 - start).clamp(0, sel.unit)
        return (visible * new).sum(dim=2).float()

    def end_step(self, fwd: Forward) -> dict[str, torch.Tensor]:
        values = self.selector.end_step(self._base_fwd(fwd))
        values["output_cache_bytes"] = torch.full_like(values["resident_kv"], fwd.state.cache_bytes)
        return values
