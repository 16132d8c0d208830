"""The method contract: how a KV-selection method plugs into the shared decoding engine.

A method is written once, for both backends and any batch size: the engine hands it the op table
of ``engine.backend`` (``retrobench.kernels.ops``) and every computation on the device goes
through those ops or plain tensor ops. Per forward (a prefill chunk, or one decode step of B
sequences feeding S tokens each) the engine calls, in order:

1. :meth:`Method.plan` on the host: the step's integers per sequence (pages to select, budgets,
   forced entries...) from the context lengths alone, never reading the device. The engine copies
   them, with its own (positions, context ends, steps), into static device buffers.
2. :meth:`Method.prepare`, eagerly, for upkeep that changes shape from step to step (InfLLM builds
   the representatives of blocks that just formed). Most methods need none.
3. per attention layer, :meth:`Method.prefill` or :meth:`Method.decode`: the post-RoPE query of the
   forward and a :class:`Forward` (cache, ops, device buffers, the method's state, the accounting).
   Decode is static-shape and sync-free, so on the triton backend a whole decode step is captured
   in a CUDA graph and replayed; prefill runs eagerly.
4. after the last layer, :meth:`Method.end_step` (still inside the graph): per-step accounting.

Method state (RetroAttention's last-loaded steps and output cache, eviction liveness, InfLLM's
scores and representatives) is created by :meth:`Method.new_state` for every request, in tensors
preallocated for the request's capacity, and passed back explicitly; one method object serves any
number of requests. Accounting lives on the device (:class:`Accounting`) and is read once per
request. A method is a small dataclass (kvpress style): settings are fields, validated in
``__post_init__`` so a bad config fails before any model loads.

Shape glossary (used across retrobench):
    B     batch (sequences)            H     query heads         H_kv  KV heads
    G     query heads per KV head      T     tokens in the cache S     query tokens this forward
    D     head dim                     K     selected entries    P     page size
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from retrobench.conf import ConfigError  # noqa: F401 - the one config error; methods raise it, callers import it here too

if TYPE_CHECKING:  # the engine owns the cache and picks the ops; methods only call them
    from retrobench.engine.cache import PagedKVCache
    from retrobench.kernels.ops import Ops

INT32_MAX = 2**31 - 1  # the current query's step: it sees every selected unit


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


class Accounting:
    """Per-request, per-sequence attention accounting, accumulated on the device, read once.

    Every metric is a mean over decode steps of a per-step value (DESIGN.md "Metrics"). A per-layer
    metric's step value is the mean over the layers that recorded it, and ``attended_kv_max`` is the
    step's largest per-layer ``attended_kv``. Methods record per-layer values in one batch per step
    (:meth:`add_layers`, ``[L', B]`` each: usually from what they :meth:`keep` per layer, one copy
    per layer, computed once at the end of the step) and per-step values with :meth:`step`. Counts
    are kept beside the sums, so a metric recorded only for some sequences or steps (``exposure``
    once a token leaves the window) averages over those alone. Every update is a static-shape device
    op (graph-capturable).
    """

    METRICS = (
        "attended_kv", "attended_kv_max", "pages_selected", "resident_kv", "exposure", "supplement_kv",
        "budget_kv", "context", "output_cache_bytes", "mass_recall", "attn_out_rel_err",
    )  # fmt: skip

    def __init__(self, num_layers: int, batch: int, device: torch.device) -> None:
        M = len(self.METRICS)
        self.num_layers = num_layers
        self.index = {name: i for i, name in enumerate(self.METRICS)}
        self.sums = torch.zeros(batch, M, dtype=torch.float64, device=device)
        self.counts = torch.zeros(batch, M, dtype=torch.float64, device=device)
        self.last = torch.zeros(batch, M, device=device)  # the latest per-step values (e.g. resident_kv)
        self._zero = torch.zeros(batch, device=device)
        self._one = torch.ones(batch, device=device)
        self.kept: dict[str, torch.Tensor] = {}  # per-layer scratch: name -> [L, ...]

    def keep(self, layer: int, name: str, value: torch.Tensor) -> None:
        """Store ``value`` as ``layer``'s entry of the scratch ``name`` (for :meth:`add_layers` at the step's end).

        The scratch is allocated at the first call, which runs eagerly (graph warm-up) before any capture.
        """
        self.slot(layer, name, value.shape, value.dtype, value.device).copy_(value)

    def slot(self, layer: int, name: str, shape: torch.Size, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """``layer``'s entry of the scratch ``name`` (allocated at the first call, like :meth:`keep`), for an
        op to write its result into directly, sparing :meth:`keep`'s copy."""
        if name not in self.kept:
            self.kept[name] = torch.zeros(self.num_layers, *shape, dtype=dtype, device=device)
        return self.kept[name][layer]

    def _row(self, values: dict[str, torch.Tensor], masks: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        unknown = set(values) - set(self.index)
        if unknown:
            raise KeyError(f"unknown accounting metric(s) {sorted(unknown)}; known: {', '.join(self.METRICS)}")
        vals = torch.stack([values[n].float() if n in values else self._zero for n in self.METRICS], dim=-1)
        cnts = torch.stack([masks.get(n, self._one).float() if n in values else self._zero for n in self.METRICS], dim=-1)
        return vals, cnts

    def add_layers(self, values: dict[str, torch.Tensor], valid: dict[str, torch.Tensor] | None = None) -> None:
        """Record per-layer values ``[L', B]`` of this step; ``valid[name]`` ``[L', B]`` masks entries.

        ``attended_kv`` also gives the step's ``attended_kv_max`` (the largest layer value).
        """
        valid = valid or {}
        sums = {n: (v * valid[n] if n in valid else v).float().sum(dim=0) for n, v in values.items()}
        counts = {n: valid[n].float().sum(dim=0) if n in valid else torch.full_like(sums[n], v.shape[0])
                  for n, v in values.items()}  # fmt: skip
        if "attended_kv" in values:
            sums["attended_kv_max"] = values["attended_kv"].float().amax(dim=0)
            counts["attended_kv_max"] = self._one
        vals, cnts = self._row(sums, counts)
        self.sums += vals.double()
        self.counts += cnts.double()

    def step(self, values: dict[str, torch.Tensor]) -> None:
        """Add one value per sequence (``[B]`` each) for each of ``values``: the per-step metrics."""
        vals, cnts = self._row(values, {})
        self.last.copy_(vals)
        self.sums += vals.double()
        self.counts += cnts.double()

    def means(self) -> list[dict[str, float]]:
        """Per sequence, the mean of every metric recorded at least once (one host read)."""
        sums, counts = self.sums.cpu(), self.counts.cpu()
        return [
            {name: float(sums[b, i] / counts[b, i]) for name, i in self.index.items() if counts[b, i] > 0}
            for b in range(sums.shape[0])
        ]

    def latest(self, name: str) -> list[float]:
        """Per sequence, the last per-step value of ``name`` (e.g. the resident KV after the last step)."""
        return self.last[:, self.index[name]].tolist()

    def copy_row(self, b: int, src: Accounting, a: int) -> None:
        """Sequence ``a`` of ``src``'s sums, counts and latest values into row ``b`` (continuous batching)."""
        for mine, theirs in ((self.sums, src.sums), (self.counts, src.counts), (self.last, src.last)):
            mine[b].copy_(theirs[a])
        for name, scratch in src.kept.items():  # per-layer scratch [L, B, ...]
            if name in self.kept:
                self.kept[name][:, b].copy_(scratch[:, a])

    def tensors(self) -> list[torch.Tensor]:
        """Everything a step mutates (snapshotted around a CUDA-graph warm-up)."""
        return [self.sums, self.counts, self.last, *self.kept.values()]

@dataclass(eq=False)
class Forward:
    """What one model forward tells a method; the engine fills it and reuses it across graph replays.

    Device tensors (static buffers in decode; positions ascending per sequence):
        pos ``[B, S]`` long: positions of this forward's tokens. In a decode step with a
            retrospective window the first S-1 are earlier generated tokens being re-run (their
            K/V overwritten) and the last is the current token.
        ends ``[B]`` long: context length after this forward (last position + 1).
        n_pages ``[B]`` long: pages covering [0, ends).
        step ``[B]`` long: decode step of the current token (0 for the first generated token's
            forward; -1 in prefill). q_step ``[B, S]`` long: the step of each row, INT32_MAX for the
            current one (RetroAttention's visibility test ``A < q_step``).
        plan: the method's :meth:`Method.plan` values, ``[B]`` long each.
    ``memo`` holds tensors derived once per forward (e.g. the all-pages list); the engine clears it.
    """

    phase: str
    ops: Ops
    cache: PagedKVCache
    state: Any
    spec: ModelSpec
    scaling: float
    pos: torch.Tensor
    ends: torch.Tensor
    n_pages: torch.Tensor
    step: torch.Tensor
    q_step: torch.Tensor
    plan: dict[str, torch.Tensor]
    acct: Accounting
    last_chunk: bool = False
    probing: bool = False  # this (eager) decode step compares each sparse layer with dense attention
    memo: dict[str, Any] = field(default_factory=dict)

    @property
    def batch(self) -> int:
        return self.pos.shape[0]

    def derived(self, key: str, make: Any) -> Any:
        """``make()`` once per forward (cached in ``memo`` under ``key``)."""
        if key not in self.memo:
            self.memo[key] = make()
        return self.memo[key]

    def all_pages(self) -> torch.Tensor:
        """``[B, 1, n_max]`` long: logical pages 0 .. n_pages-1, then -1 (a dense selection)."""

        def make() -> torch.Tensor:
            n_max = self.cache.pages_per_seq
            idx = torch.arange(n_max, device=self.pos.device).view(1, 1, n_max)
            return torch.where(idx < self.n_pages.view(-1, 1, 1), idx, torch.full_like(idx, -1))

        return self.derived("all_pages", make)


def copy_state_row(dst: Any, b: int, src: Any, a: int, one: Any, two: Any) -> None:
    """Copy sequence ``a`` of the method state ``src`` into row ``b`` of ``dst`` (continuous batching).

    ``one`` and ``two`` are the same method's states for batch 1 and 2 (built on the ``meta``
    device: no memory): a tensor's batch dimension is the one whose size differs between them, and
    a host list whose length differs holds one entry per sequence. Tensors and lists without one
    are per request and stay as they are; so do plain settings (ints, floats).
    """
    if isinstance(one, torch.Tensor):
        dims = [d for d in range(one.dim()) if one.shape[d] != two.shape[d]]
        if dims:
            dst.select(dims[0], b).copy_(src.select(dims[0], a))
    elif dataclasses.is_dataclass(one) and not isinstance(one, type):
        for f in dataclasses.fields(one):
            copy_state_row(getattr(dst, f.name), b, getattr(src, f.name), a, getattr(one, f.name), getattr(two, f.name))
    elif isinstance(one, list) and len(one) != len(two):
        dst[b] = src[a]
    elif isinstance(one, (list, tuple)):
        for d, s, o, t in zip(dst, src, one, two):
            copy_state_row(d, b, s, a, o, t)
    elif isinstance(one, dict):
        for key in one:
            copy_state_row(dst[key], b, src[key], a, one[key], two[key])


def state_tensors(obj: Any) -> list[torch.Tensor]:
    """Every tensor reachable through the dataclass fields (and lists/dicts) of a method state.

    The engine snapshots them before a CUDA-graph warm-up runs a step for real, and restores them.
    """
    found: list[torch.Tensor] = []
    if isinstance(obj, torch.Tensor):
        found.append(obj)
    elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        for f in dataclasses.fields(obj):
            found.extend(state_tensors(getattr(obj, f.name)))
    elif isinstance(obj, (list, tuple)):
        for item in obj:
            found.extend(state_tensors(item))
    elif isinstance(obj, dict):
        for item in obj.values():
            found.extend(state_tensors(item))
    return found


@dataclass
class Method:
    """Base class of every method. Subclasses are dataclasses with their own settings.

    Settings shared by all methods:
        dense_layers: layers [0, dense_layers) use full attention and are not counted in budget
            accounting (Quest keeps 2 dense layers).
    """

    name: ClassVar[str] = "base"
    needs_page_meta: ClassVar[bool] = False  # True: the engine keeps per-page key min/max exact
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

    def attended_bound(self, context: int, page_size: int) -> int:
        """Most KV tokens the current query of a sparse layer may attend at this context length.

        The budget check of the test matrix; each method's card states the same rule.
        """
        return context

    # ---- per request ----------------------------------------------------------------------
    def new_state(self, spec: ModelSpec, batch: int, capacity: int, device: torch.device) -> Any:
        """Fresh state for ``batch`` sequences of up to ``capacity`` tokens, preallocated on ``device``."""
        return None

    def plan(
        self, state: Any, ends: list[int], steps: list[int], phase: str, last_chunk: bool = False
    ) -> dict[str, list[int]]:
        """Host-side integers of one forward, per sequence: ``ends`` = context lengths after it.

        Called once per forward, in order (prefill chunks, then decode steps), before the forward
        runs; it may update host-side counters in ``state``. Every call returns the same keys.
        """
        return {}

    def prepare(self, fwd: Forward) -> None:
        """Eager device upkeep before a forward (outside any CUDA graph); default: nothing."""

    def copy_row(self, dst: Any, b: int, src: Any, a: int, spec: ModelSpec, capacity: int) -> None:
        """Copy sequence ``a`` of state ``src`` into row ``b`` of state ``dst`` (both for ``capacity``
        tokens): how continuous batching moves a started sequence into a batch. The default finds
        each tensor's batch dimension from states built on the ``meta`` device (:func:`copy_state_row`);
        a method whose state has other per-sequence structure overrides this."""
        meta = torch.device("meta")
        one, two = self.new_state(spec, 1, capacity, meta), self.new_state(spec, 2, capacity, meta)
        copy_state_row(dst, b, src, a, one, two)

    def prefilled(self, state: Any, ends: list[int]) -> None:
        """Put ``state`` where a prefill of ``ends[b]`` tokens would leave it (liveness, counters), for
        benchmarks that fill the cache with random K/V instead of prefilling; default: nothing."""

    # ---- attention ----------------------------------------------------------------------
    def prefill(self, layer: int, q: torch.Tensor, fwd: Forward) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Dense causal attention of a prompt chunk ``q [B, H, S, D]``: ``(out [B, H, S, D], lse)``, the
        LSE ``[B, H, S]`` or None (nothing reads a prefill LSE outside the method that asks for it)."""
        return attend_dense(layer, q, fwd, need_lse=False)

    def decode(self, layer: int, q: torch.Tensor, fwd: Forward) -> tuple[torch.Tensor, torch.Tensor]:
        """One decode step's attention in ``layer``: ``(out [B, H, S, D], lse [B, H, S] fp32)``; the LSE may
        be None where nothing reads it (a dense layer; full attention outside a probed step)."""
        raise NotImplementedError

    def end_step(self, fwd: Forward) -> dict[str, torch.Tensor]:
        """Per-step values (``[B]`` each) after the last layer of a decode step: default, resident KV."""
        return {"resident_kv": fwd.ends.to(torch.float64)}

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


def attend_dense(
    layer: int, q: torch.Tensor, fwd: Forward, key_mask: torch.Tensor | None = None, need_lse: bool = True,
    q_pos: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Causal attention of ``q [B, H, S, D]`` over every page of the context (optionally only the
    keys ``key_mask [B, T_max]`` keeps): full attention, dense layers and prefill alike. Without a
    mask and with ``need_lse=False`` it is the ``prefill_attention`` op in a prefill (SDPA) and the
    ``dense_attention`` op in a decode step, and returns ``(out, None)``. ``q_pos [B, S]``: the
    queries' positions when ``q`` holds only some of the forward's tokens (default ``fwd.pos``)."""
    c = fwd.cache
    q_pos = fwd.pos if q_pos is None else q_pos
    if key_mask is None and not need_lse:
        args = (q, c.k[layer], c.v[layer], c.page_table, fwd.n_pages, q_pos, fwd.scaling)
        if fwd.phase == "prefill":
            return fwd.ops.prefill_attention(*args), None
        return fwd.ops.dense_attention(*args, pages=fwd.all_pages()), None
    pages = fwd.all_pages().expand(-1, fwd.spec.num_kv_heads, -1)
    mask = None if key_mask is None else key_mask.unsqueeze(1).expand(-1, fwd.spec.num_kv_heads, -1)
    return fwd.ops.sparse_attention(
        q, c.k[layer], c.v[layer], c.page_table, pages, q_pos, fwd.scaling, key_mask=mask, num_units=fwd.n_pages,
        in_order=q.shape[2] > 1,  # a prefill chunk stops at its last query (decode: see dense_attention)
    )


__all__ = [
    "INT32_MAX",
    "Accounting",
    "Budget",
    "ConfigError",
    "Forward",
    "Method",
    "ModelSpec",
    "as_budget",
    "attend_dense",
    "copy_state_row",
    "state_tensors",
]
