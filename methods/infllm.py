"""InfLLM-style block retrieval (Xiao et al., NeurIPS 2024; thunlp/InfLLM): sinks + local window +
top-k memory blocks chosen by per-block representative keys.

Why: InfLLM is the training-free "context memory" baseline RetroAttention is compared with. Every
query of a sparse layer sees (1) the first ``n_init`` tokens, (2) the ``n_local`` most recent tokens
(its own included), (3) the not-yet-full remainder between the last memory block and the local
window (InfLLM's ``global_remainder``) and (4) the ``topk`` best memory blocks: the tokens that left
the local window, cut into blocks of ``block_size`` at positions ``n_init + j*block_size``. A block
is represented per KV head by the mean of its ``repr_topk`` keys with the highest representative
score (the attention probability each token drew while inside the local window, summed over those
queries and the group's query heads; accumulated in prefill and decode). Block score =
``Σ_h q_h · r_{block, kv(h)}``: one block set for the layer (``selection: layer``, InfLLM's default)
or per KV head (``kv_head``). The budget is split as in InfLLM's Llama-3 config (128 + 4096 +
16 x 128 of 6272 tokens); a budget covering the context attends every key (= full attention).
Deviations from InfLLM (ordinary RoPE positions, no offload, per-token retrieval, GQA
representatives per KV head) are listed in methods/README.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from retrobench.methods.base import AttnResult, ConfigError, ModelSpec, StepInfo, dense_prefill
from retrobench.methods.common import SelectionMethod, reduce_head_scores, selection_heads

INFLLM_SELECTIONS = ("layer", "kv_head")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def block_representatives(keys: torch.Tensor, scores: torch.Tensor, repr_topk: int) -> torch.Tensor:
    """Mean of the ``repr_topk`` highest-scored keys of each block, per KV head.

    ``keys [N, L, H_kv, D]``, ``scores [N, L, H_kv]`` -> ``[N, H_kv, D]`` (fp32). Equal scores
    break toward the earlier token (stable sort), so representatives are deterministic.
    """
    r = min(repr_topk, keys.shape[1])
    idx = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :r]  # [N, r, H_kv]
    picked = keys.float().gather(1, idx.unsqueeze(-1).expand(-1, -1, -1, keys.shape[-1]))
    return picked.mean(dim=1)


@dataclass
class InfLLMState:
    """Per-request state, keyed by (layer, sequence).

    score: ``[n, H_kv]`` fp32 representative score of each token so far (grown on demand).
    seen: last query position whose probabilities were added (so a repeated call adds nothing).
    reprs: ``(n_init it was built for, [n_blocks, H_kv, D])`` representatives of the formed blocks.
    """

    score: dict[tuple[int, int], torch.Tensor] = field(default_factory=dict)
    seen: dict[tuple[int, int], int] = field(default_factory=dict)
    reprs: dict[tuple[int, int], tuple[int, torch.Tensor]] = field(default_factory=dict)

    def add(self, key: tuple[int, int], start: int, probs: torch.Tensor) -> None:
        """Add ``probs [n, H_kv]`` to the scores of positions [start, start + n)."""
        need = start + probs.shape[0]
        cur = self.score.get(key)
        if cur is None or cur.shape[0] < need:
            grown = probs.new_zeros(max(need, 2 * (0 if cur is None else cur.shape[0])), probs.shape[1])
            if cur is not None:
                grown[: cur.shape[0]] = cur
            self.score[key] = cur = grown
        cur[start:need] += probs

    def scores(self, key: tuple[int, int], end: int, num_kv_heads: int, device: Any) -> torch.Tensor:
        """``[end, H_kv]`` scores of positions [0, end) (zero where nothing was recorded)."""
        out = torch.zeros(end, num_kv_heads, device=device)
        cur = self.score.get(key)
        if cur is not None:
            n = min(end, cur.shape[0])
            out[:n] = cur[:n]
        return out


@dataclass
class InfLLMMethod(SelectionMethod):
    """InfLLM-style selection.

    Settings (besides SelectionMethod's ``budget``, ``min_pages``, ``dense_layers``):
        block_size: tokens per memory block (128; a multiple of the engine's page size).
        repr_topk: representative keys averaged per block and KV head (4).
        init_fraction: share of the budget for initial (sink) tokens (128/6272).
        local_fraction: share of the budget for the local window (4096/6272); the rest buys
            ``floor(rest / block_size)`` blocks.
        selection: ``layer`` (one block set per layer, InfLLM's default) | ``kv_head``.
    Per step: budget B = max(budget tokens, min_pages * P); attended <= B + block_size - 1 (the
    remainder), or the whole context when B covers it.
    """

    name: ClassVar[str] = "infllm"
    selection: str = "layer"
    block_size: int = 128
    repr_topk: int = 4
    init_fraction: float = 128 / 6272
    local_fraction: float = 4096 / 6272

    def __post_init__(self) -> None:
        if self.selection == "q_head":
            raise ConfigError(
                "method.selection=q_head is not supported for infllm; allowed: "
                + ", ".join(INFLLM_SELECTIONS)
            )
        super().__post_init__()
        for key in ("init_fraction", "local_fraction"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < value < 1.0:
                raise ConfigError(f"method.{key} must be a number in (0, 1), got {value!r}")
        if self.init_fraction + self.local_fraction > 1.0:
            raise ConfigError(
                "method.init_fraction + method.local_fraction must be <= 1 (the rest buys blocks), got "
                f"{self.init_fraction} + {self.local_fraction}"
            )
        if not _is_int(self.block_size) or self.block_size < 1:
            raise ConfigError(
                "method.block_size must be an integer >= 1 (a multiple of engine.page_size), "
                f"got {self.block_size!r}"
            )
        if not _is_int(self.repr_topk) or not 1 <= self.repr_topk <= self.block_size:
            raise ConfigError(
                f"method.repr_topk must be an integer in [1, block_size={self.block_size}], "
                f"got {self.repr_topk!r}"
            )

    # ---- budget ---------------------------------------------------------------------------------
    def split(self, context: int, page_size: int) -> tuple[int, int, int, int]:
        """``(budget, n_init, n_local, topk)`` at this context length (n_local >= 1: the current token)."""
        budget = max(self.budget.budget_tokens(context), self.min_pages * page_size)
        n_init = math.floor(self.init_fraction * budget + 1e-9)
        n_local = max(1, math.floor(self.local_fraction * budget + 1e-9))
        topk = max(0, (budget - n_init - n_local) // self.block_size)
        return budget, n_init, n_local, topk

    def attended_bound(self, context: int, page_size: int) -> int:
        """init + local + topk blocks (<= budget) plus a remainder of < block_size tokens."""
        budget, n_init, n_local, topk = self.split(context, page_size)
        if budget >= context:
            return context
        return min(context, n_init + n_local + topk * self.block_size + self.block_size - 1)

    # ---- state ------------------------------------------------------------------------------------
    def new_state(self, spec: ModelSpec, batch_size: int, device: torch.device) -> InfLLMState:
        if self.block_size % spec.page_size:
            raise ConfigError(
                f"method.block_size={self.block_size} must be a multiple of engine.page_size={spec.page_size}"
            )
        return InfLLMState()

    # ---- prefill: dense, plus representative scores of the prompt's keys ---------------------------
    def prefill(
        self, layer: int, q: torch.Tensor, cache: Any, info: StepInfo, state: InfLLMState
    ) -> AttnResult:
        result = dense_prefill(layer, q, cache, info)
        if self.is_dense_layer(layer):
            return result
        H, H_kv = q.shape[1], cache.num_kv_heads
        for b in range(q.shape[0]):
            key = (layer, b)
            new = info.positions[b] > state.seen.get(key, -1)
            if not bool(new.any()):
                continue
            pos, qb, lse = info.positions[b][new], q[b][:, new].float(), result.lse[b][:, new]
            n_local = [self.split(p + 1, cache.page_size)[2] for p in pos.tolist()]
            n_local = torch.tensor(n_local, device=pos.device)
            end = int(pos.max()) + 1
            lo = max(0, int((pos - n_local + 1).min()))
            k = cache.keys(layer, b, end)[lo:].float().repeat_interleave(H // H_kv, dim=1)  # [T', H, D]
            kpos = torch.arange(lo, end, device=pos.device)
            dist = pos.unsqueeze(1) - kpos.unsqueeze(0)  # [S, T']
            window = (dist >= 0) & (dist < n_local.unsqueeze(1)) & cache.live_mask(layer, b, end)[lo:]
            logits = torch.einsum("hsd,thd->hst", qb, k) * info.scaling
            probs = torch.exp(logits - lse.unsqueeze(-1)).masked_fill(~window, 0.0).sum(dim=1)  # [H, T']
            state.add(key, lo, probs.view(H_kv, H // H_kv, -1).sum(dim=1).transpose(0, 1))
            state.seen[key] = end - 1
        return result

    # ---- selection --------------------------------------------------------------------------------
    def representatives(
        self, layer: int, cache: Any, b: int, state: InfLLMState, n_init: int, nb: int
    ) -> torch.Tensor:
        """``[nb, H_kv, D]`` representatives of the first ``nb`` blocks, each computed once when formed."""
        key, bs, H_kv = (layer, b), self.block_size, cache.num_kv_heads
        origin, have = state.reprs.get(key, (n_init, None))
        if have is None or origin != n_init:  # a fraction budget moved n_init: block boundaries moved
            have = torch.zeros(0, H_kv, cache.head_dim, device=cache.k.device)
        if have.shape[0] < nb:
            s0, s1 = n_init + have.shape[0] * bs, n_init + nb * bs
            keys = cache.keys(layer, b, s1)[s0:].reshape(-1, bs, H_kv, cache.head_dim)
            scores = state.scores(key, s1, H_kv, keys.device)[s0:].reshape(-1, bs, H_kv)
            have = torch.cat([have, block_representatives(keys, scores, self.repr_topk)])
            state.reprs[key] = (n_init, have)
        return have[:nb]

    def block_scores(
        self, layer: int, q: torch.Tensor, cache: Any, b: int, state: InfLLMState, n_init: int, nb: int
    ) -> torch.Tensor:
        """``[H_sel, nb]``: ``Σ_h q_h · r_{block, kv(h)}`` over the layer's (or a group's) query heads."""
        reprs = self.representatives(layer, cache, b, state, n_init, nb)
        reprs = reprs.repeat_interleave(q.shape[0] // cache.num_kv_heads, dim=1)  # [nb, H, D]
        per_head = torch.einsum("hd,nhd->hn", q.float(), reprs)
        return reduce_head_scores(per_head, self.selection, cache.num_kv_heads)

    def select(
        self, layer: int, q: torch.Tensor, cache: Any, b: int, end: int, state: InfLLMState, scaling: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Sinks + local window + remainder + top-k blocks for ``q [H, D]``; records the local scores."""
        P, bs = cache.page_size, self.block_size
        budget, n_init, n_local, topk = self.split(end, P)
        H_sel = selection_heads(self.selection, q.shape[0], cache.num_kv_heads)
        mask = torch.ones(H_sel, end, dtype=torch.bool, device=q.device)
        if budget < end:  # otherwise every key: exactly full attention
            nb = (end - n_local - n_init) // bs  # full blocks out of the local window
            first_rem = n_init + nb * bs
            if nb > topk:
                mask[:, n_init:first_rem] = False
                if topk > 0:
                    scores = self.block_scores(layer, q, cache, b, state, n_init, nb)
                    chosen = torch.sort(scores, dim=-1, descending=True, stable=True).indices[:, :topk]
                    blocks = torch.zeros(H_sel, nb, dtype=torch.bool, device=q.device)
                    blocks.scatter_(1, chosen, True)
                    mask[:, n_init:first_rem] = blocks.repeat_interleave(bs, dim=1)
        self._record(layer, q, cache, b, end, state, mask, n_local, scaling)
        return mask, mask.sum(dim=-1).float() / P

    def _record(
        self,
        layer: int,
        q: torch.Tensor,
        cache: Any,
        b: int,
        end: int,
        state: InfLLMState,
        mask: torch.Tensor,
        n_local: int,
        scaling: float,
    ) -> None:
        """Add the current query's probabilities (softmax over its selection) to its local-window keys."""
        key, n_local = (layer, b), min(n_local, end)
        if end - 1 <= state.seen.get(key, -1):
            return
        H, H_kv = q.shape[0], cache.num_kv_heads
        G = H // H_kv
        k = cache.keys(layer, b, end).float().repeat_interleave(G, dim=1)  # [end, H, D]
        logits = torch.einsum("hd,thd->ht", q.float(), k) * scaling
        m = mask.expand(H, -1) if mask.shape[0] == 1 else mask.repeat_interleave(H // mask.shape[0], dim=0)
        m = m & cache.live_mask(layer, b, end)
        lse = torch.logsumexp(logits.masked_fill(~m, float("-inf")), dim=-1, keepdim=True)
        probs = torch.exp(logits[:, end - n_local :] - lse).masked_fill(~m[:, end - n_local :], 0.0)
        state.add(key, end - n_local, probs.view(H_kv, G, -1).sum(dim=1).transpose(0, 1))
        state.seen[key] = end - 1
