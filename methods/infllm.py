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

Static form: the selection is a token list (the cache seen as one-token units) built on the device
from the plan's integers: ``[0, n_init)``, the chosen blocks in ascending order, then the
remainder and local window ``[n_init + nb*block_size, c)``, compacted to the front; its width is
fixed per request (the largest selection any context up to the capacity can make). Scores live in
``[L, B, T, H_kv]`` and representatives in ``[L, B, blocks, H_kv, D]``; representatives of blocks
that just formed (or all of them, when a fraction budget moved n_init) are built eagerly in
:meth:`InfLLMMethod.prepare`, before the step, outside any CUDA graph.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from retrobench.methods.base import ConfigError, Forward, ModelSpec, attend_dense
from retrobench.methods.common import Selection, SelectionMethod, reduce_heads

INFLLM_SELECTIONS = ("layer", "kv_head")
#: Prefill's representative scores take a chunk's queries in blocks whose fp32 logits (B·H x rows x
#: keys) stay within this many elements (512 MiB): a 32K-token chunk of an 8B model at once would be
#: 128 GiB (``experiment=latency`` on a GPU prefills 32K tokens a chunk).
PREFILL_LOGITS = 1 << 27


def query_rows(heads: int, S: int, n_local: int, most: int = PREFILL_LOGITS) -> int:
    """Queries a block (all S when they fit): a block of r queries reads at most r + n_local - 1 keys,
    so ``heads * r * (r + n_local)`` logits; halved until within ``most``."""
    rows = S
    while rows > 1 and heads * rows * (rows + n_local) > most:
        rows = (rows + 1) // 2
    return rows


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def block_representatives(keys: torch.Tensor, scores: torch.Tensor, repr_topk: int) -> torch.Tensor:
    """Mean of the ``repr_topk`` highest-scored keys of each block, per KV head.

    ``keys [..., N, L, H_kv, D]``, ``scores [..., N, L, H_kv]`` -> ``[..., N, H_kv, D]`` (fp32). Equal
    scores break toward the earlier token (stable sort), so representatives are deterministic.
    """
    r = min(repr_topk, keys.shape[-3])
    idx = torch.sort(scores, dim=-2, descending=True, stable=True).indices[..., :r, :]  # [..., N, r, H_kv]
    picked = keys.float().gather(-3, idx.unsqueeze(-1).expand(*idx.shape, keys.shape[-1]))
    return picked.mean(dim=-3)


@dataclass
class InfLLMState:
    """Per request: scores ``[L, B, T + 1, H_kv]`` (the last row absorbs padding), representatives
    ``[L, B, blocks, H_kv, D]``; on the host, per sequence, the blocks built and the n_init they
    were built for; the static widths of the selection."""

    score: torch.Tensor
    reprs: torch.Tensor
    page_size: int
    n_init_max: int
    topk_max: int
    tail_max: int
    n_local_max: int
    built: list[int]
    origin: list[int]
    pending: list[tuple[int, int, int, int]]  # (b, n_init, first block, end block) to build before the step


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

    # ---- state and plan ---------------------------------------------------------------------------
    def unit(self, spec: ModelSpec) -> int:
        return 1  # token-level selection: sinks and the window need not be page-aligned

    def new_state(self, spec: ModelSpec, batch: int, capacity: int, device: torch.device) -> InfLLMState:
        if self.block_size % spec.page_size:
            raise ConfigError(
                f"method.block_size={self.block_size} must be a multiple of engine.page_size={spec.page_size}"
            )
        P = spec.page_size
        T = math.ceil(capacity / P) * P
        budget, n_init, n_local, topk = self.split(capacity, P)  # every part grows with the context
        n_init, n_local, topk = min(n_init, capacity), min(n_local, capacity), min(topk, capacity // self.block_size)
        tail = min(capacity, max(self.block_size - 1 + n_local, budget))
        L, H_kv, D = spec.num_layers, spec.num_kv_heads, spec.head_dim
        return InfLLMState(
            score=torch.zeros(L, batch, T + 1, H_kv, device=device),
            reprs=torch.zeros(L, batch, max(1, capacity // self.block_size), H_kv, D, device=device),
            page_size=P, n_init_max=n_init, topk_max=max(1, topk), tail_max=tail, n_local_max=n_local,
            built=[0] * batch, origin=[-1] * batch, pending=[],
        )  # fmt: skip

    def layout(self, end: int, page_size: int) -> dict[str, int]:
        """The selection at context ``end``: sinks, blocks formed / chosen, tail start, local window."""
        budget, n_init, n_local, topk = self.split(end, page_size)
        if budget >= end:  # every key: exactly full attention
            return {"n_init": 0, "nb": 0, "kb": 0, "tail": 0, "local": min(n_local, end), "repr_init": n_init}
        nb = max(0, (end - n_local - n_init) // self.block_size)
        return {"n_init": n_init, "nb": nb, "kb": min(nb, topk), "tail": n_init + nb * self.block_size,
                "local": n_local, "repr_init": n_init}  # fmt: skip

    def plan(
        self, state: InfLLMState, ends: list[int], steps: list[int], phase: str, last_chunk: bool = False
    ) -> dict[str, list[int]]:
        rows = [self.layout(e, state.page_size) for e in ends]
        if phase == "decode":
            for b, row in enumerate(rows):  # representatives to build before this step
                if row["nb"] > row["kb"] > 0:
                    if state.origin[b] != row["repr_init"]:  # block boundaries moved: rebuild all
                        state.origin[b], state.built[b] = row["repr_init"], 0
                    if row["nb"] > state.built[b]:
                        state.pending.append((b, row["repr_init"], state.built[b], row["nb"]))
                        state.built[b] = row["nb"]
        keys = ("n_init", "nb", "kb", "tail", "local")
        values = {k: [row[k] for row in rows] for k in keys}
        values["count"] = [row["n_init"] + row["kb"] * self.block_size + e - row["tail"] for row, e in zip(rows, ends)]
        return values

    def prepare(self, fwd: Forward) -> None:
        """Build the representatives the plan asked for, every sparse layer at once (eager)."""
        state: InfLLMState = fwd.state
        c, bs, first = fwd.cache, self.block_size, self.dense_layers
        for b, n_init, j0, j1 in state.pending:
            pos = torch.arange(n_init + j0 * bs, n_init + j1 * bs, device=state.score.device)
            keys = c.gather_keys(b, pos, layers=slice(first, None))  # [L', n, H_kv, D]
            scores = state.score[first:, b, pos]  # [L', n, H_kv]
            n = j1 - j0
            state.reprs[first:, b, j0:j1] = block_representatives(
                keys.view(keys.shape[0], n, bs, *keys.shape[2:]), scores.view(scores.shape[0], n, bs, -1), self.repr_topk
            )
        state.pending.clear()

    # ---- prefill: dense, plus representative scores of the prompt's keys ---------------------------
    def prefill(self, layer: int, q: torch.Tensor, fwd: Forward) -> tuple[torch.Tensor, torch.Tensor]:
        if self.is_dense_layer(layer):
            return attend_dense(layer, q, fwd, need_lse=False)
        out, lse = attend_dense(layer, q, fwd)  # the LSE weighs the representative scores
        state: InfLLMState = fwd.state
        B, H, S, D = q.shape
        H_kv = fwd.spec.num_kv_heads
        G = H // H_kv
        blocks = fwd.derived("infllm_prefill_blocks", lambda: self._prefill_blocks(fwd, state.page_size, B * H))
        for s0, s1, lo, end, window in blocks:  # [B, H, rows, keys] fp32 logits a block (a 32K chunk's: 128 GiB)
            r = s1 - s0
            keys = fwd.cache.gather_keys_batch(layer, torch.arange(lo, end, device=q.device))  # [B, T', H_kv, D]
            # the G query heads of a KV head as G*r rows of one matmul (no key copied per query head)
            rows = (q[:, :, s0:s1].float() * fwd.scaling).reshape(B, H_kv, G * r, D)
            probs = torch.matmul(rows, keys.float().permute(0, 2, 3, 1))  # [B, H_kv, G*r, T'] logits
            probs.sub_(lse[:, :, s0:s1].reshape(B, H_kv, G * r, 1)).exp_()
            probs.view(B, H_kv, G, r, -1).masked_fill_(~window, 0.0)  # keep each query's local window
            state.score[layer][:, lo:end] += probs.sum(dim=2).transpose(1, 2)
        return out, lse

    def _prefill_blocks(self, fwd: Forward, page_size: int, heads: int) -> list[tuple]:
        """Once per prefill forward, on the host: the query blocks ``(s0, s1, lo, end, window)`` of the
        representative scores: queries s0..s1-1 of the chunk, the keys ``[lo, end)`` their local
        windows reach, and ``window [s1 - s0, end - lo]`` (query i sees key j in its window). Prompt
        chunks hold the same positions in every sequence, ascending."""
        pos = fwd.pos[0].tolist()
        n_local = [self.split(p + 1, page_size)[2] for p in pos]
        rows = query_rows(heads, len(pos), max(n_local), PREFILL_LOGITS)
        blocks, device = [], fwd.pos.device
        for s0 in range(0, len(pos), rows):
            s1 = min(len(pos), s0 + rows)
            lo = max(0, min(p - n + 1 for p, n in zip(pos[s0:s1], n_local[s0:s1])))
            end = pos[s1 - 1] + 1
            p = torch.tensor(pos[s0:s1], device=device).view(-1, 1)
            dist = p - torch.arange(lo, end, device=device).view(1, -1)
            window = (dist >= 0) & (dist < torch.tensor(n_local[s0:s1], device=device).view(-1, 1))
            blocks.append((s0, s1, lo, end, window))
        return blocks

    # ---- selection ----------------------------------------------------------------------------------
    def select(self, layer: int, q: torch.Tensor, fwd: Forward, state: InfLLMState) -> Selection:
        """Sinks + the chosen blocks + remainder and local window, as a token list (static width)."""
        plan, bs = fwd.plan, self.block_size
        H_kv = fwd.spec.num_kv_heads
        reprs = state.reprs[layer]  # [B, blocks, H_kv, D]
        per_head = torch.einsum("bhd,bnhd->bhn", q.float(), reprs.repeat_interleave(q.shape[1] // H_kv, dim=2))
        scores = reduce_heads(per_head, self.selection, H_kv)  # [B, H_sel, blocks]
        formed = torch.arange(scores.shape[-1], device=q.device).view(1, 1, -1) < plan["nb"].view(-1, 1, 1)
        scores = torch.where(formed, scores, torch.full_like(scores, float("-inf")))
        chosen = fwd.ops.topk_forced(scores, plan["kb"], state.topk_max).long()  # [B, H_sel, topk_max]
        chosen = torch.sort(torch.where(chosen < 0, scores.shape[-1], chosen), dim=-1).values  # ascending
        width = min(state.n_init_max + state.topk_max * bs + state.tail_max, state.score.shape[2] - 1)
        i = torch.arange(width, device=q.device).view(1, 1, width)
        a = plan["n_init"].view(-1, 1, 1)
        blocks_end = a + plan["kb"].view(-1, 1, 1) * bs
        count = plan["count"].view(-1, 1, 1)
        r = ((i - a) // bs).clamp(0, state.topk_max - 1).expand(chosen.shape[0], chosen.shape[1], -1)
        block_tok = a + torch.gather(chosen, 2, r) * bs + (i - a) % bs
        tail_tok = plan["tail"].view(-1, 1, 1) + (i - blocks_end)
        tokens = torch.where(i < a, i, torch.where(i < blocks_end, block_tok, tail_tok))
        tokens = torch.where(i < count, tokens, torch.full_like(tokens, -1))
        return Selection(tokens, 1, plan["count"])

    def observe(self, layer: int, q: torch.Tensor, sel: Selection, lse: torch.Tensor, fwd: Forward, state: Any) -> None:
        """Add the current query's probabilities (softmax over its selection) to its local-window keys."""
        B, H, _ = q.shape
        H_kv = fwd.spec.num_kv_heads
        T = state.score.shape[2] - 1

        def window() -> torch.Tensor:  # [B, W]: positions end - n_local .. end - 1, then -1
            i = torch.arange(state.n_local_max, device=q.device).view(1, -1)
            local = fwd.plan["local"].view(-1, 1)
            return torch.where(i < local, fwd.ends.view(-1, 1) - local + i, torch.full_like(i, -1))

        win = fwd.derived("infllm_window", window)
        c = fwd.cache
        logits = fwd.ops.paged_logits(q, c.k[layer], c.page_table, win, fwd.scaling)  # [B, H, W]
        probs = torch.exp(logits - lse.unsqueeze(-1)).view(B, H_kv, H // H_kv, -1).sum(dim=2)  # [B, H_kv, W]
        index = torch.where(win < 0, T, win).unsqueeze(-1).expand(-1, -1, H_kv)
        state.score[layer].scatter_add_(1, index, probs.transpose(1, 2))
