"""``engine.backend=triton``: a static-shape decode step over the paged cache, built on the kernels.

The reference decode path (``backend=torch``) loops over sequences in Python, reads lengths back
from the device and keeps per-token dictionaries; it defines the results. This module computes
the same decode step for ``full``, ``quest`` and ``retro`` (base ``quest``) with tensors of fixed
shape and no device-to-host synchronisation, so a whole model forward can be captured in a CUDA
graph and replayed:

* everything that depends on the step (positions, pages per sequence, Quest's page count ``k``,
  the forced current page, the step index) is computed on the host with the same integer
  arithmetic as the reference and copied into static device buffers (:class:`StepPlan`);
* per layer the attention function writes K/V at the step's positions (append or overwrite),
  refreshes the touched pages' key min/max (:func:`retrobench.kernels.page_meta.update_page_minmax`),
  scores pages and takes the top ``k`` with the current page forced (:mod:`retrobench.kernels.quest`)
  and attends the selected pages with every query of the forward in one pass
  (:func:`retrobench.kernels.paged_attention.sparse_paged_attention`);
* RetroAttention's past tokens are extra query rows of that same pass: the per-page "last loaded
  step" ``A`` hides pages a past token has already seen, their supplementary (output, LSE) is
  merged into the output cache (:func:`retrobench.kernels.merge.merge_states`), and ``A`` is set to
  the current step for every loaded page. The output cache is a fixed ``[B, w-1, H, D]`` per layer:
  slot ``j`` holds the token generated ``w-1-j`` steps before the current one.

Shapes (glossary in methods/base.py): B sequences stepping together, S = tokens per sequence in the
forward (1 + past tokens of the window), n_max = pages per sequence, K = most pages selected.
Prefill stays on the reference path (dense; it also leaves exact page min/max behind).
Not covered here, so rejected with a ConfigError by :func:`check_fast_method`: the other methods,
``selection: q_head``, ``past_query: cached`` and retro bases other than quest.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from retrobench.kernels.merge import merge_states
from retrobench.kernels.page_meta import update_page_minmax
from retrobench.kernels.paged_attention import sparse_paged_attention
from retrobench.kernels.quest import quest_page_scores, quest_select
from retrobench.methods.base import ConfigError, Method, ModelSpec

FAST_METHODS = ("full", "quest", "retro")
FAST_SELECTIONS = ("kv_head", "layer")
INT32_MAX = 2**31 - 1


def check_fast_method(method: Method) -> None:
    """Raise a ConfigError naming the key when ``method`` has no static-shape decode step."""
    name = getattr(method, "name", "?")
    if name not in FAST_METHODS:
        raise ConfigError(
            f"engine.backend=triton does not support method={name}; allowed: {', '.join(FAST_METHODS)} "
            "(use engine.backend=torch for the others)"
        )
    if name == "retro":
        if method.base != "quest":
            raise ConfigError(
                f"engine.backend=triton supports method.base=quest only for retro, got {method.base!r}"
            )
        if method.past_query != "recomputed":
            raise ConfigError(
                f"engine.backend=triton supports method.past_query=recomputed only, got {method.past_query!r}"
            )
    if name in ("quest", "retro") and method.selection not in FAST_SELECTIONS:
        raise ConfigError(
            f"engine.backend=triton does not support method.selection={method.selection}; "
            f"allowed: {', '.join(FAST_SELECTIONS)}"
        )


@dataclass
class StepPlan:
    """Host-side description of one decode step for B sequences feeding S tokens each."""

    positions: torch.Tensor  # [B, S] long (CPU)
    step: int  # decode step index of the current (last) token


class FastDecoder:
    """Static buffers and the per-layer attention of the triton backend for one request.

    ``cache`` is the request's :class:`retrobench.engine.cache.PagedKVCache` (already prefilled);
    ``batch_size`` sequences step together with the same S.
    """

    def __init__(self, method: Method, spec: ModelSpec, cache: Any, scaling: float) -> None:
        check_fast_method(method)
        self.method, self.spec, self.cache, self.scaling = method, spec, cache, scaling
        self.name = method.name
        dev = cache.k.device
        B, n_max, P = cache.batch_size, cache.pages_per_seq, cache.page_size
        self.B, self.n_max, self.P = B, n_max, P
        self.window = method.reprocess_window
        self.sparse = self.name in ("quest", "retro")
        self.dense_layers = method.dense_layers if self.sparse else spec.num_layers
        # Quest's page count is monotone in the context: the largest one sizes the static page list.
        if self.sparse:
            self.k_max = min(n_max, method.budget.num_pages(cache.max_tokens, P, method.min_pages))
            self.group_reduce = method.selection
        self.page_table = cache.page_table.to(torch.int32).contiguous()
        i32 = {"dtype": torch.int32, "device": dev}
        # static per-step inputs (copied from the host plan before each forward / graph replay)
        self.pos = torch.zeros(B, self.window, dtype=torch.long, device=dev)
        self.q_pos = torch.zeros(B, self.window, **i32)
        self.lengths = torch.zeros(B, **i32)
        self.n_pages = torch.zeros(B, **i32)
        self.k_pages = torch.zeros(B, **i32)
        self.forced = torch.zeros(B, **i32)
        self.q_step = torch.zeros(B, self.window, **i32)
        self.step = torch.zeros((), **i32)
        self._arange_pages = torch.arange(n_max, **i32)
        self.all_pages = torch.zeros(B, spec.num_kv_heads, n_max, **i32)
        if self.name == "retro":
            L, H, D = spec.num_layers, spec.num_heads, spec.head_dim
            # A: last step each page was loaded, per layer / sequence / KV head; column n_max absorbs padding
            self.last_loaded = torch.full((L, B, spec.num_kv_heads, n_max + 1), -1, **i32)
            slots = max(1, self.window - 1)
            self.out_cache = torch.zeros(L, B, slots, H, D, dtype=torch.float32, device=dev)
            self.lse_cache = torch.full((L, B, slots, H), float("-inf"), dtype=torch.float32, device=dev)
        self.S = 1

    # ---- host side ---------------------------------------------------------------------------------
    def load_plan(self, plan: StepPlan) -> None:
        """Copy one step's host-computed values into the static buffers (no device-to-host sync)."""
        pos = plan.positions
        B, S = pos.shape
        if B != self.B or S > self.window:
            raise ValueError(
                f"step plan of shape {tuple(pos.shape)} does not fit batch {self.B}, window {self.window}"
            )
        self.S = S
        ends = [int(pos[b, -1]) + 1 for b in range(B)]
        n_pages = [math.ceil(e / self.P) for e in ends]
        k = [min(self.method.budget.num_pages(e, self.P, self.method.min_pages), n) for e, n in zip(ends, n_pages)] \
            if self.sparse else n_pages  # fmt: skip
        forced = [(e - 1) // self.P for e in ends]
        q_step = torch.full((B, S), INT32_MAX, dtype=torch.int32)
        q_step[:, : S - 1] = torch.arange(plan.step - (S - 1), plan.step, dtype=torch.int32)
        dev = self.pos.device
        self.pos[:, :S].copy_(pos.to(dev), non_blocking=True)
        self.q_pos[:, :S].copy_(pos.to(device=dev, dtype=torch.int32), non_blocking=True)
        self.lengths.copy_(torch.tensor(ends, dtype=torch.int32), non_blocking=True)
        self.n_pages.copy_(torch.tensor(n_pages, dtype=torch.int32), non_blocking=True)
        self.k_pages.copy_(torch.tensor(k, dtype=torch.int32), non_blocking=True)
        self.forced.copy_(torch.tensor(forced, dtype=torch.int32), non_blocking=True)
        self.q_step[:, :S].copy_(q_step, non_blocking=True)
        self.step.fill_(plan.step)

    def snapshot(self) -> dict[str, torch.Tensor]:
        """Copies of the method state a forward mutates non-idempotently (graph warm-up replays steps)."""
        if self.name != "retro":
            return {}
        return {"last_loaded": self.last_loaded.clone(), "out_cache": self.out_cache.clone(),
                "lse_cache": self.lse_cache.clone()}  # fmt: skip

    def restore(self, saved: dict[str, torch.Tensor]) -> None:
        for key, value in saved.items():
            getattr(self, key).copy_(value)

    # ---- device side (capturable) -----------------------------------------------------------------
    def begin_step(self) -> None:
        """Per-step tensors shared by every layer: the page list of dense attention, lengths, liveness."""
        valid = self._arange_pages.unsqueeze(0) < self.n_pages.unsqueeze(1)  # [B, n_max]
        pages = torch.where(
            valid, self._arange_pages.unsqueeze(0), torch.full_like(valid, -1, dtype=torch.int32)
        )
        self.all_pages.copy_(pages.unsqueeze(1).expand_as(self.all_pages))
        self.cache.lengths.copy_(self.lengths.to(self.cache.lengths.dtype))
        rows = torch.arange(self.B, device=self.pos.device).unsqueeze(1)
        self.cache.live[:, rows, self.pos[:, : self.S]] = True

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """``q [B, H, S, D]``, ``k, v [B, H_kv, S, D]`` of this forward -> attention output ``[B, H, S, D]``."""
        S = self.S
        pos, q_pos = self.pos[:, :S], self.q_pos[:, :S]
        c = self.cache
        P = self.P
        phys = torch.gather(self.page_table, 1, (pos // P).to(torch.int64)).to(torch.int64)  # [B, S]
        slot = pos % P
        c.k[layer][phys, slot] = k.transpose(1, 2).to(c.k.dtype)
        c.v[layer][phys, slot] = v.transpose(1, 2).to(c.v.dtype)
        update_page_minmax(c.k[layer], c.kmin[layer], c.kmax[layer], self.page_table, pos, self.lengths)
        if not self.sparse or layer < self.dense_layers:
            out, _ = sparse_paged_attention(
                q, c.k[layer], c.v[layer], self.page_table, self.all_pages, q_pos, self.scaling
            )
            return out
        scores = quest_page_scores(q[:, :, -1], c.kmin[layer], c.kmax[layer], self.page_table, self.n_pages,
                                   group_reduce=self.group_reduce)  # fmt: skip
        pages = quest_select(scores, self.k_pages, self.k_max, self.forced)  # [B, H_sel, K]
        if pages.shape[1] != self.spec.num_kv_heads:  # selection: layer -> one list for every KV head
            pages = pages.expand(-1, self.spec.num_kv_heads, -1).contiguous()
        if self.name == "quest" or S == 1:
            out, lse = sparse_paged_attention(
                q, c.k[layer], c.v[layer], self.page_table, pages, q_pos, self.scaling
            )
            if self.name == "retro":
                self._retro_update(layer, pages, out, lse, S)
            return out
        A = self.last_loaded[layer, :, :, : self.n_max]
        out, lse = sparse_paged_attention(
            q, c.k[layer], c.v[layer], self.page_table, pages, q_pos, self.scaling,
            page_step=A, q_step=self.q_step[:, :S],
        )  # fmt: skip
        return self._retro_update(layer, pages, out, lse, S)

    def _retro_update(
        self, layer: int, pages: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, S: int
    ) -> torch.Tensor:
        """Merge past tokens' supplements into the output cache, push the current token, set A."""
        slots = self.out_cache.shape[2]
        if self.window > 1:
            oc, lc = self.out_cache[layer], self.lse_cache[layer]  # [B, slots, H, D], [B, slots, H]
            merged_out = out
            if S > 1:
                past = slice(slots - (S - 1), slots)
                m_out, m_lse = merge_states(
                    oc[:, past], lc[:, past], out[:, :, : S - 1].transpose(1, 2).float(), lse[:, :, : S - 1].transpose(1, 2)
                )  # fmt: skip
                merged_out = torch.cat([m_out.transpose(1, 2).to(out.dtype), out[:, :, -1:]], dim=2)
                oc[:, past] = m_out.float()
                lc[:, past] = m_lse
            # shift: the oldest slot leaves the window, the current token enters the newest one
            if slots > 1:
                oc[:, :-1] = oc[:, 1:].clone()
                lc[:, :-1] = lc[:, 1:].clone()
            oc[:, -1] = out[:, :, -1].float()
            lc[:, -1] = lse[:, :, -1]
            out = merged_out
        index = torch.where(pages < 0, torch.full_like(pages, self.n_max), pages).to(torch.int64)
        A = self.last_loaded[layer]
        A.scatter_(2, index, self.step.expand(index.shape).to(A.dtype))
        return out


class FastContext:
    """The ``rb`` keyword the triton backend's attention function receives (one per request)."""

    def __init__(self, decoder: FastDecoder) -> None:
        self.decoder = decoder


def fast_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    rb: FastContext | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """``query [B, H, S, D]``, ``key/value [B, H_kv, S, D]`` -> ``([B, S, H, D], None)``."""
    if rb is None:
        raise RuntimeError(
            "the retrobench_triton attention implementation must be driven by retrobench.engine.Engine"
        )
    out = rb.decoder.attend(module.layer_idx, query, key, value)
    return out.transpose(1, 2).contiguous(), None


class GraphRunner:
    """Captures one decode forward (fixed B and S) in a CUDA graph and replays it.

    ``run(input_ids [B, S])`` copies the tokens into the static input and replays; the decoder's
    plan must have been loaded first. Returns the static logits ``[B, V]`` (valid until the next run).
    """

    def __init__(self, forward: Any, decoder: FastDecoder, input_ids: torch.Tensor, warmup: int = 2) -> None:
        self.decoder = decoder
        self.ids = input_ids.clone()
        saved = decoder.snapshot()  # warm-up runs the step for real; K/V and min/max writes are idempotent
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(warmup):
                forward(self.ids)
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = forward(self.ids)
        decoder.restore(saved)

    def run(self, input_ids: torch.Tensor) -> torch.Tensor:
        self.ids.copy_(input_ids, non_blocking=True)
        self.graph.replay()
        return self.logits
